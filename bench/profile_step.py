"""Profile training steps of the sft stage on SmolLM2-135M with torch.profiler (CPU time and memory by operator),
grouped into LM head and loss, attention, MLP, LoRA, norms/elementwise, optimizer.

    .venv/bin/python bench/profile_step.py [--plain] [--steps 2] [--batch-size 8] [--model-shape smollm2|qwen2.5-0.5b]

--plain profiles a plain TRL SFTTrainer (trl's own fused head over every position, entropy and top-1 bookkeeping,
random batches); without it, tunery's sft trainer. The first step is a warm-up; the next ones are profiled.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def category(module: str) -> str:
    if "lora" in module:
        return "LoRA"
    for key, name in (("lm_head", "LM head and loss"), ("fused", "LM head and loss"), ("self_attn", "attention"),
                      ("mlp", "MLP"), ("norm", "norms"), ("embed", "embedding"), ("optimizer", "optimizer")):
        if key in module:
            return name
    return "other"


def main() -> None:
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    from bench.train_speed import build_model, prepare_data
    from tasks.models import ensure_default_base_model
    from tasks.stages.sft import SftConfig, scored_sft_trainer
    from tasks.train.training import trainable_model, trainer_arguments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plain", action="store_true")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model-shape", default="smollm2", choices=["smollm2", "qwen2.5-0.5b"])
    args = parser.parse_args()

    base = ensure_default_base_model()
    tmp = Path(tempfile.mkdtemp(prefix="tunery-profile-"))
    model_dir = base if args.model_shape == "smollm2" else build_model(args.model_shape, base, tmp / "model")
    import os
    os.environ["TUNERY_HOME"] = str(tmp / "home")
    data = prepare_data(model_dir)["sft"]
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from tasks.data.prep import load_prepared
    from tasks.models import encode_chat, load_tokenizer

    cfg = SftConfig(max_steps=args.steps + 1, batch_size=args.batch_size, max_length=256, learning_rate=1e-3)
    tok = load_tokenizer(str(model_dir))
    _, rows, _ = load_prepared(data)
    ds = Dataset.from_list([encode_chat(tok, r["messages"], 256) for r in rows])
    model, peft_config, _ = trainable_model(cfg, str(model_dir), "cpu")
    targs = trainer_arguments(cfg, tmp, "cpu", "fp32", 0, has_eval=False, group_by_length=not args.plain)
    targs.update(disable_tqdm=True, logging_steps=100)
    cls = SFTTrainer if args.plain else scored_sft_trainer()
    trainer = cls(model=model, args=SFTConfig(**targs, completion_only_loss=True), train_dataset=ds,
                  processing_class=tok, peft_config=peft_config)
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True)

    class Window(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if state.global_step == 1:
                prof.__enter__()

        def on_train_end(self, a, state, control, **kw):
            prof.__exit__(None, None, None)

    trainer.add_callback(Window())
    trainer.train()
    config = trainer.model.config
    report = breakdown(prof.events(), config.vocab_size, config.intermediate_size, cfg.lora.r)
    print(json.dumps({"trainer": "plain TRL SFTTrainer" if args.plain else "tunery sft", "model": args.model_shape,
                      "steps": args.steps, "batch_size": args.batch_size, **report}, indent=1))


def breakdown(events, vocab: int, intermediate: int, rank: int) -> dict:
    """Self CPU time (s) and allocated memory (MB) of the profiled ops, by part of the model. Matmuls are told
    apart by their shapes (a vocabulary-wide tile is the LM head, a rank-wide one LoRA, an intermediate-wide one
    the MLP, the rest attention projections); the optimizer by its step's record range."""
    head_dims = {vocab, 8192, 32768} | {vocab % 8192, vocab % 32768}
    time_s, memory_mb = defaultdict(float), defaultdict(float)

    def ancestors(e):
        while e is not None:
            yield e.name
            e = e.cpu_parent

    for e in events:
        if e.self_cpu_time_total == 0 and e.self_cpu_memory_usage <= 0:
            continue
        chain = list(ancestors(e))
        dims = {d for shape in (e.input_shapes or []) for d in (shape or [])}
        if any("Optimizer" in n or "adamw" in n.lower() for n in chain):
            part = "optimizer"
        elif any("dropout" in n.lower() or "bernoulli" in n.lower() for n in chain):
            part = "LoRA dropout"
        elif any("scaled_dot_product" in n or "attention" in n.lower() for n in chain):
            part = "attention (softmax(QK)V)"
        elif dims & head_dims:
            part = "LM head and loss"
        elif e.name in ("aten::mm", "aten::addmm", "aten::bmm") and rank in dims:
            part = "LoRA matmuls"
        elif e.name in ("aten::mm", "aten::addmm", "aten::bmm") and intermediate in dims:
            part = "MLP matmuls"
        elif e.name in ("aten::mm", "aten::addmm", "aten::bmm"):
            part = "attention projections"
        else:
            part = "elementwise, norms, copies"
        time_s[part] += e.self_cpu_time_total / 1e6
        memory_mb[part] += max(e.self_cpu_memory_usage, 0) / 2**20
    total = sum(time_s.values())
    return {"total_s": round(total, 2),
            "time_s": {k: round(v, 2) for k, v in sorted(time_s.items(), key=lambda kv: -kv[1])},
            "time_share": {k: round(v / total, 3) for k, v in sorted(time_s.items(), key=lambda kv: -kv[1])},
            "allocated_mb": {k: round(v) for k, v in sorted(memory_mb.items(), key=lambda kv: -kv[1])}}


if __name__ == "__main__":
    main()
