"""Benchmark: tunery's sft and dpo stages against a plain TRL + peft script with the same settings, in one run.

    .venv/bin/python bench/train_speed.py [--json] [--device cpu|cuda] [--model-shape smollm2|qwen2.5-0.5b]
                                          [--steps N] [--rounds R] [--only sft|dpo] [--quick]

The plain arms are what a user's script does: `SFTTrainer` / `DPOTrainer` with a peft `LoraConfig` (same r, alpha
and targets; dropout 0.05 as in TRL's LoRA examples), the same learning rate, schedule, batch, steps, seed and data,
fp32 weights on the CPU (bf16 autocast on CUDA, trl's default there), gradient checkpointing off. The tunery arms
call `train_sft` / `train_dpo` with the stage's defaults for everything the plain arm does not pin (LoRA dropout 0,
a default kept because it passes `bench/parity.py`'s gate against 0.05). Each arm runs in a fresh process, interleaved
(plain, tunery, plain, tunery, ...) so machine noise hits both alike; the per-arm figure is the median over rounds.

Measured per arm, the same way in both (the hooks are installed on `transformers.Trainer` in the arm's process):
- trained tokens/s: answer tokens whose loss is scored (labels != -100, no padding, no prompt) per second of
  `trainer.train()`; dpo reports optimizer steps/s;
- peak RSS (VmHWM) of the arm's process at the end of training, and peak allocated CUDA memory on a GPU;
- mean of the last 5 training losses;
- held-out quality after training, measured the same way for both: the trained adapter saved, loaded on the fp32
  base, and scored with tunery's perplexity (sft) or preference accuracy (dpo) on the held-out split.

A speed-up counts only at equal quality: the report gives the loss and perplexity differences next to the ratios.
`--checkpointing selective` sets tunery's `gradient_checkpointing` (default: the stage's auto, off on the CPU).
`--model-shape qwen2.5-0.5b` trains a random Qwen2 with Qwen2.5-0.5B's shapes (hidden 896, 24 layers, vocabulary
151936), where the LM head and the loss dominate; `--quick` uses a tiny random model and 2 steps (tests run it).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPES = {
    # Qwen2.5-0.5B's architecture (config.json of Qwen/Qwen2.5-0.5B), random-initialised: hub weights are out of reach.
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6),
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}


def settings(args) -> dict:
    """What both arms of a method share. The plain arms take exactly these; tunery's take them plus its defaults."""
    return {
        "sft": dict(r=16, alpha=32, dropout=0.05, target_modules="all-linear", learning_rate=1e-3,
                    lr_scheduler="cosine", warmup_ratio=0.1, batch_size=8, max_length=256, steps=args.steps,
                    seed=0),
        "dpo": dict(r=8, alpha=16, dropout=0.05, target_modules="all-linear", learning_rate=5e-5,
                    lr_scheduler="cosine", warmup_ratio=0.1, batch_size=8, max_length=256, steps=args.steps,
                    seed=0, beta=0.1),
    }


def arm_plan(method: str, family: str, device: str, shared: dict) -> dict:
    """The settings an arm trains with. Plain TRL on CUDA uses bf16 autocast (what `bf16=True` in a user's script
    does); on the CPU, fp32. tunery's arm leaves precision to the stage's `auto` default."""
    plan = {"method": method, "family": family, "device": device, **shared}
    if family == "trl":
        plan["precision"] = "bf16" if device == "cuda" else "fp32"
    return plan


# ------------------------------------------------------------------------------------------------ inside an arm


def _install_meters(record: dict) -> None:
    """Wrap transformers.Trainer so every trainer in this process reports train time, scored tokens and losses the
    same way, whichever arm built it."""
    import torch
    from transformers import Trainer

    train, step = Trainer.train, Trainer.training_step

    def training_step(self, model, inputs, *a, **kw):
        if "labels" in inputs:
            record["scored_tokens"] += int((inputs["labels"][..., 1:] != -100).sum())
        elif "completion_mask" in inputs:
            record["scored_tokens"] += int(inputs["completion_mask"][..., 1:].sum())
        return step(self, model, inputs, *a, **kw)

    def timed_train(self, *a, **kw):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        out = train(self, *a, **kw)
        record["train_s"] = time.perf_counter() - began
        record["steps"] = int(self.state.global_step)
        record["losses"] = [h["loss"] for h in self.state.log_history if "loss" in h]
        record["peak_rss_mb"] = _vmhwm_mb()
        if torch.cuda.is_available():
            record["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return out

    Trainer.training_step, Trainer.train = training_step, timed_train


def _vmhwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _script_args(plan: dict, out: Path) -> dict:
    """The trainer arguments a user's script passes, the same for SFTConfig and DPOConfig."""
    return dict(output_dir=str(out / "trainer"), max_steps=plan["steps"],
                per_device_train_batch_size=plan["batch_size"], learning_rate=plan["learning_rate"],
                lr_scheduler_type=plan["lr_scheduler"],
                warmup_steps=plan["warmup_ratio"], seed=plan["seed"], max_length=plan["max_length"], logging_steps=1,
                save_strategy="no", report_to="none", bf16=plan["precision"] == "bf16",
                use_cpu=plan["device"] == "cpu", gradient_checkpointing=False, disable_tqdm=True)


def _script_lora(plan: dict):
    from peft import LoraConfig

    return LoraConfig(r=plan["r"], lora_alpha=plan["alpha"], lora_dropout=plan["dropout"],
                      target_modules=plan["target_modules"], task_type="CAUSAL_LM")


def _plain_sft(plan: dict, model_dir: str, data_dir: str, out: Path) -> None:
    """A user's TRL script: prompt/completion rows from the same prepared data, SFTTrainer with a peft LoRA."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tasks.data.prep import load_prepared

    _, train, _ = load_prepared(data_dir)
    rows = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in train]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(plan["device"])
    trainer = SFTTrainer(model=model, args=SFTConfig(**_script_args(plan, out)), train_dataset=Dataset.from_list(rows),
                         processing_class=tok, peft_config=_script_lora(plan))
    trainer.train()
    trainer.model.save_pretrained(out / "adapter")


def _plain_dpo(plan: dict, model_dir: str, data_dir: str, out: Path) -> None:
    """A user's DPO script: the prepared pairs as they are, DPOTrainer with a peft LoRA (reference = adapter off)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from tasks.data.prep import load_prepared

    _, train, _ = load_prepared(data_dir)
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in train]
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(plan["device"])
    trainer = DPOTrainer(model=model, args=DPOConfig(**_script_args(plan, out), beta=plan["beta"]),
                         train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=_script_lora(plan))
    trainer.train()
    trainer.model.save_pretrained(out / "adapter")


def tunery_config(plan: dict):
    """The stage config of tunery's arm: what the plain arm pins, the stage's own defaults for the rest."""
    lora = {"r": plan["r"], "alpha": plan["alpha"], "target_modules": plan["target_modules"]}
    common = dict(lora=lora, max_steps=plan["steps"], batch_size=plan["batch_size"],
                  gradient_checkpointing=plan.get("gradient_checkpointing", "auto"),
                  learning_rate=plan["learning_rate"], lr_scheduler=plan["lr_scheduler"],
                  warmup_ratio=plan["warmup_ratio"], max_length=plan["max_length"])
    if plan["method"] == "sft":
        from tasks.stages.sft import SftConfig

        return SftConfig(**common)
    from tasks.stages.dpo import DpoConfig

    return DpoConfig(beta=plan["beta"], **common)


def _tunery(plan: dict, model_dir: str, data_dir: str, out: Path) -> None:
    """tunery's stage, called as the flow calls it."""
    from tasks.stages.dpo import train_dpo
    from tasks.stages.sft import train_sft

    train = train_sft if plan["method"] == "sft" else train_dpo
    train(tunery_config(plan), model_dir, data_dir, out / "adapter", plan["device"], plan["seed"])


def held_out_quality(method: str, model_dir: str, adapter: Path, data_dir: str, device: str) -> dict:
    """The trained adapter on the fp32 base, scored on the held-out split the same way for both arms."""
    from tasks.data.prep import load_prepared
    from tasks.evaluate.evaluation import perplexity, preference_accuracy
    from tasks.models import load_model, load_tokenizer

    _, _, held = load_prepared(data_dir)
    model = load_model(model_dir, device=device, adapter=str(adapter), merge=True)
    tok = load_tokenizer(model_dir)
    if method == "sft":
        return {"perplexity": perplexity(model, tok, held, max_length=512, batch_size=8)["perplexity"]}
    return {"preference_accuracy": preference_accuracy(model, tok, held, 512, 8)["preference_accuracy"]}


def run_arm(spec_file: str) -> None:
    import torch

    spec = json.loads(Path(spec_file).read_text())
    plan, out = spec["plan"], Path(spec["out"])
    torch.manual_seed(plan["seed"])
    record = {"scored_tokens": 0}
    _install_meters(record)
    began = time.perf_counter()
    runner = {("trl", "sft"): _plain_sft, ("trl", "dpo"): _plain_dpo}.get((plan["family"], plan["method"]), _tunery)
    runner(plan, spec["model_dir"], spec["data"][plan["method"]], out)
    record["stage_s"] = time.perf_counter() - began
    record.update(held_out_quality(plan["method"], spec["model_dir"], out / "adapter", spec["data"][plan["method"]],
                                   plan["device"]))
    (out / "record.json").write_text(json.dumps(record))


# ------------------------------------------------------------------------------------------------ the driver


def build_model(shape: str, tokenizer_dir: Path, out: Path) -> Path:
    """A random-initialised model of `shape` with the tokenizer of `tokenizer_dir` (token ids fit any vocabulary
    at least as large as the tokenizer's)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = dict(SHAPES[shape])
    cfg.setdefault("vocab_size", len(tok))
    config = AutoConfig.for_model(cfg.pop("model_type"), bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **cfg)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def tiny_tokenizer(out: Path) -> Path:
    """A byte-level BPE tokenizer with a ChatML template trained on the demo text (as the test fixtures do)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [m["content"] for line in (REPO / "data/demo/garden_chat.jsonl").read_text().splitlines()
             for m in json.loads(line)["messages"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=[
        "<|endoftext|>", "<|im_start|>", "<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
                          "{{ '<|im_start|>assistant\n' }}{% endif %}")
    fast.save_pretrained(out)
    return out


def prepare_data(model_dir: Path) -> dict[str, str]:
    from tasks.data.prep import PrepConfig, prepare

    demo = REPO / "data" / "demo"
    return {"sft": prepare(PrepConfig(train=["garden_chat.jsonl"], val_fraction=0.15), demo,
                           str(model_dir)).artifact_path,
            "dpo": prepare(PrepConfig(train=["garden_prefs.jsonl"], val_fraction=0.15), demo).artifact_path}


def _median(records: list[dict], key: str) -> float:
    values = [r[key] for r in records if key in r]
    return statistics.median(values) if values else float("nan")


def summarise(arms: dict[str, list[dict]], method: str) -> dict:
    """Per-arm medians and the ratios tunery / plain TRL."""
    per_arm = {}
    for family in ("trl", "tunery"):
        runs = arms[f"{family}_{method}"]
        per_arm[family] = {
            "tokens_per_s": _median([{"v": r["scored_tokens"] / r["train_s"]} for r in runs], "v"),
            "steps_per_s": _median([{"v": r["steps"] / r["train_s"]} for r in runs], "v"),
            "train_s": _median(runs, "train_s"), "stage_s": _median(runs, "stage_s"),
            "peak_rss_mb": _median(runs, "peak_rss_mb"),
            "final_loss": _median([{"v": statistics.fmean(r["losses"][-5:])} for r in runs], "v"),
            **({"peak_cuda_mb": _median(runs, "peak_cuda_mb")} if "peak_cuda_mb" in runs[0] else {}),
            **({"perplexity": _median(runs, "perplexity")} if method == "sft" else
               {"preference_accuracy": _median(runs, "preference_accuracy")}),
        }
    trl, ours = per_arm["trl"], per_arm["tunery"]
    out = {"peak_rss_ratio": ours["peak_rss_mb"] / trl["peak_rss_mb"],
           "loss_delta_pct": 100 * (ours["final_loss"] / trl["final_loss"] - 1)}
    if "peak_cuda_mb" in ours:
        out["peak_cuda_ratio"] = ours["peak_cuda_mb"] / trl["peak_cuda_mb"]
    if method == "sft":
        out["tokens_per_s_ratio"] = ours["tokens_per_s"] / trl["tokens_per_s"]
        out["perplexity_delta_pct"] = 100 * (ours["perplexity"] / trl["perplexity"] - 1)
        # Equal or better: tunery's batches are length-grouped and the plain arm's random, so the last 5 losses are
        # of different batches; a lower loss or perplexity is not a loss of quality.
        out["equal_quality"] = out["loss_delta_pct"] <= 2 and out["perplexity_delta_pct"] <= 2
    else:
        out["steps_per_s_ratio"] = ours["steps_per_s"] / trl["steps_per_s"]
        out["preference_accuracy_delta"] = ours["preference_accuracy"] - trl["preference_accuracy"]
        out["equal_quality"] = out["preference_accuracy_delta"] >= -0.03
    out["arms"] = per_arm
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document (and nothing else) to stdout")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model-shape", default="smollm2", choices=["smollm2", "qwen2.5-0.5b"],
                        help="smollm2: the packaged SmolLM2-135M-Instruct; qwen2.5-0.5b: random weights, real shapes")
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per arm")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (each runs every arm once)")
    parser.add_argument("--only", choices=["sft", "dpo"], default=None)
    parser.add_argument("--quick", action="store_true", help="a tiny random model, 2 steps, 1 round (for tests)")
    parser.add_argument("--checkpointing", choices=["auto", "selective", "true", "false"], default="auto",
                        help="tunery's gradient_checkpointing (the plain arm never checkpoints)")
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        return run_arm(args.arm)
    if args.quick:
        args.steps, args.rounds = 2, 1
    methods = [args.only] if args.only else ["sft", "dpo"]
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print

    with tempfile.TemporaryDirectory(prefix="tunery-train-bench-") as tmp:
        tmp = Path(tmp)
        os.environ["TUNERY_HOME"] = str(tmp / "home")
        if args.quick:
            model_dir = build_model("tiny", tiny_tokenizer(tmp / "tok"), tmp / "model")
            model_name = "tiny-llama (random)"
        else:
            from tasks.models import ensure_default_base_model

            saved = os.environ.pop("TUNERY_HOME")
            base = ensure_default_base_model()  # the user's converted base, not a second copy
            os.environ["TUNERY_HOME"] = saved
            if args.model_shape == "smollm2":
                model_dir, model_name = base, base.name
            else:
                model_dir = build_model(args.model_shape, base, tmp / "model")
                model_name = f"{args.model_shape} shapes (random weights)"
        data = prepare_data(model_dir)
        shared = settings(args)
        arms: dict[str, list[dict]] = {}
        for rnd in range(args.rounds):
            for method in methods:
                for family in ("trl", "tunery"):
                    name = f"{family}_{method}"
                    out = tmp / f"{name}-{rnd}"
                    out.mkdir()
                    spec = out / "spec.json"
                    plan = arm_plan(method, family, args.device, shared[method])
                    if family == "tunery":
                        plan["gradient_checkpointing"] = {"true": True, "false": False}.get(args.checkpointing,
                                                                                              args.checkpointing)
                    spec.write_text(json.dumps({"plan": plan,
                                                "model_dir": str(model_dir), "data": data, "out": str(out)}))
                    log(f"round {rnd + 1}/{args.rounds}: {name} ...")
                    proc = subprocess.run([sys.executable, __file__, "--arm", str(spec)], cwd=REPO,
                                          stdout=sys.stderr if args.json else None)
                    if proc.returncode != 0:
                        raise SystemExit(f"arm {name} failed (exit {proc.returncode})")
                    record = json.loads((out / "record.json").read_text())
                    arms.setdefault(name, []).append(record)
                    log(f"  {name}: {record['train_s']:.1f} s training, {record['scored_tokens']} scored tokens, "
                        f"peak RSS {record['peak_rss_mb']:.0f} MB")
        import torch

        report = {m: summarise(arms, m) for m in methods}
        report.update(device=args.device, model=model_name, steps=args.steps, rounds=args.rounds,
                      tunery_checkpointing=args.checkpointing,
                      threads=torch.get_num_threads(), settings={m: shared[m] for m in methods})
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for m in methods:
        r = report[m]
        speed = ("tokens_per_s_ratio", "trained tokens/s") if m == "sft" else ("steps_per_s_ratio", "steps/s")
        print(f"{m}: {speed[1]} x{r[speed[0]]:.2f} vs plain TRL, peak RSS x{r['peak_rss_ratio']:.2f}, "
              f"final loss {r['loss_delta_pct']:+.1f}%, "
              + (f"held-out perplexity {r['perplexity_delta_pct']:+.1f}%" if m == "sft" else
                 f"preference accuracy {r['preference_accuracy_delta']:+.3f}")
              + f" ({'equal quality' if r['equal_quality'] else 'QUALITY DIFFERS'})")
        for family, a in r["arms"].items():
            print(f"  {family:7s} " + ", ".join(f"{k} {v:.4g}" for k, v in a.items()))


if __name__ == "__main__":
    main()
