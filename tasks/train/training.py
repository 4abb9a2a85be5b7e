"""What the training stages (cpt, sft, dpo) share: the hyperparameters, how the trainable model is built (LoRA,
QLoRA, full, Spectrum), the trl/transformers arguments, the per-step history, and how a run is saved and measured.

Every stage starts from a full model folder (a base, a merge, a full or Spectrum fine-tune, or an adapter version
already merged into its parent) and writes either a LoRA adapter on top of that folder or a complete model.
"""
from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


from core.errors import TuneryError
from core.files import write_json
from tasks.common import StageResult, peak_rss_mb, resolve_device, resolve_precision
from tasks.data.prep import load_prepared
from tasks.models import load_model, load_tokenizer
from tasks.train.health import nan_guard, verdicts
from tasks.train.history import estimate_callback, plot_history
from tasks.train.settings import DATA_KINDS, TrainingConfig


@dataclass
class RunStart:
    """What every training stage resolves before it builds its datasets."""

    meta: dict[str, Any]
    train_rows: list[dict]
    val_rows: list[dict]
    device: str
    precision: str
    tokenizer: Any
    checkpoints: Path | None = None  # where this stage keeps checkpoints (None: none), see trainer_arguments


def start_run(stage: Any, config: TrainingConfig, model_path: str, data_dir: str | Path, device: str,
              seed: int, checkpoints: str | Path | None = None) -> RunStart:
    """Load the prepared data (refusing the wrong kind by name), resolve device and precision, seed, load the
    tokenizer. Raises TuneryError when the data is not the kind the `stage` class trains on (its `data_kind`)."""
    import torch

    meta, train_rows, val_rows = load_prepared(data_dir)
    kind = stage.data_kind
    if meta["kind"] != kind:
        raise TuneryError(f"{stage.kind} needs {DATA_KINDS[kind]}; {data_dir} holds {meta['kind']} examples")
    device = resolve_device(device, quantized=config.quantized)
    precision = resolve_precision(config.precision, device)
    torch.manual_seed(seed)
    return RunStart(meta, train_rows, val_rows, device, precision, load_tokenizer(model_path),
                    Path(checkpoints) if checkpoints else None)


def trainable_model(config: TrainingConfig, model_path: str, device: str):
    """Load `model_path` ready for `config.method`; return (model, peft_config or None, info for the registry).

    lora: the weights stay frozen (4/8-bit for QLoRA) and trl wraps the model with the returned LoRA config.
    full: every weight trains. spectrum: only the top-SNR matrices train, and their names land in `info`.
    """
    from peft import LoraConfig, prepare_model_for_kbit_training

    # Weights that train stay fp32 (bf16/fp16 apply as autocast through the trainer); a frozen LoRA base may be
    # bf16, and peft keeps the adapters fp32 on top of it.
    base_precision = resolve_base_precision(config, device)
    model = load_model(model_path, device=device, precision=base_precision,
                       quantization=config.quantization if config.quantized else None)
    recompute = checkpointing(config, device)
    info: dict[str, Any] = {"method": config.method, "quantization": config.quantization.mode,
                            "base_precision": base_precision, "gradient_checkpointing": recompute}
    if recompute == "selective":
        keep_matmuls_checkpointing(model)
    peft_config = None
    if config.method == "lora":
        if config.quantized:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recompute is True)
        peft_config = LoraConfig(
            r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
            target_modules=config.lora.target_modules, task_type="CAUSAL_LM",
        )
    elif config.method == "spectrum":
        from tasks.train.spectrum import freeze_all_but, select_matrices

        selection = select_matrices(model, config.spectrum.share)
        freeze_all_but(model, selection["selected"])
        info["spectrum"] = selection
    return model, peft_config, info


def checkpointing(config: TrainingConfig, device: str) -> bool | str:
    """The activation checkpointing a stage trains with: True (full), "selective" or False; see the field."""
    if config.gradient_checkpointing == "auto":
        return "selective" if device in ("cuda", "mps") else False
    return config.gradient_checkpointing


def keep_matmuls_checkpointing(model) -> None:
    """Selective activation checkpointing (torch.utils.checkpoint's policy contexts, non-reentrant): each decoder
    layer keeps the outputs of its matrix multiplications whose inner and outer sizes both exceed 64 (the base
    projections) and of attention; everything else in the layer (RMSNorm, RoPE, SiLU and the gate product, LoRA's
    rank-r products, residual adds) is recomputed from them in the backward pass. trl's own selective mode keeps
    attention only and recomputes every projection, which costs a second forward of the layer."""
    import functools

    import torch
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    aten = torch.ops.aten
    attention = {getattr(aten, name).default for name in (
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
    ) if hasattr(aten, name)}
    operands = {aten.mm.default: (0, 1), aten.addmm.default: (1, 2), aten.bmm.default: (0, 1)}

    def policy(ctx, op, *args, **kwargs):
        if op in attention:
            return CheckpointPolicy.MUST_SAVE
        if op in operands:
            a, b = (args[i] for i in operands[op])
            if min(a.shape[-1], b.shape[-1]) > 64:
                return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    model.activation_checkpointing_enable(activation_checkpointing_kwargs={
        "use_reentrant": False, "context_fn": functools.partial(create_selective_checkpoint_contexts, policy)})


def resolve_base_precision(config: TrainingConfig, device: str) -> str:
    """The dtype a stage loads its frozen LoRA base in. auto: bf16 on CUDA GPUs with bf16 units, where the
    trainer's autocast already runs every matmul in bf16 (the stored copy then halves the weights' memory); fp32
    elsewhere. On a CPU bf16 is opt-in: the parity gate (bench/parity.py) has not yet been run on a CPU with bf16
    units, and without them torch emulates bf16 matmuls (0.3 GFLOP/s against 176 in fp32 on an AVX2-only CPU
    here), so asking for it there is refused. Weights that train (full, Spectrum) and 4/8-bit bases keep their
    own dtype. Raises TuneryError for bf16 on a device without bf16 units."""
    if config.method != "lora" or config.quantized:
        return "fp32"
    if config.base_precision == "auto":
        return "bf16" if device == "cuda" and has_bf16_units(device) else "fp32"
    if config.base_precision == "bf16" and device in ("cpu", "cuda") and not has_bf16_units(device):
        raise TuneryError(f"base_precision bf16: this {device.upper()} has no bf16 units (a CPU needs avx512_bf16 "
                          "or AMX, a GPU compute capability 8.0), so bf16 matmuls would be emulated, many times "
                          "slower than fp32; use base_precision: fp32 or auto")
    return config.base_precision


def has_bf16_units(device: str) -> bool:
    """Whether `device` multiplies bf16 natively: CUDA with compute capability 8.0+, or a CPU with avx512_bf16 or
    AMX."""
    import torch

    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device == "cpu":
        return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    return False


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere, which reads as "no bf16 units")."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def last_checkpoint(folder: Path | None) -> str | None:
    """The newest checkpoint in a stage's checkpoint folder, if an earlier attempt left one."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if folder is not None and folder.is_dir() else None


def trainer_arguments(config: TrainingConfig, out_dir: Path, device: str, precision: str, seed: int,
                      has_eval: bool, group_by_length: bool = True, checkpoints: Path | None = None
                      ) -> dict[str, Any]:
    """The transformers TrainingArguments every stage passes to its trl config. With `save_steps`, checkpoints go
    to `checkpoints` (the flow keys that folder by the stage's fingerprint, so a rerun of the same stage finds
    them)."""
    checkpoints = checkpoints if config.save_steps else None
    saving = dict(save_strategy="steps", save_steps=config.save_steps, save_total_limit=1) if checkpoints else dict(
        save_strategy="no")
    if config.patience and has_eval:  # patience implies eval_steps (TrainingConfig)
        # Early stopping: a checkpoint at every evaluation (weights only), the best one loaded back at the end.
        saving = dict(save_strategy="steps", save_steps=config.save_steps if checkpoints else config.eval_steps,
                      save_total_limit=1, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                      greater_is_better=False, save_only_model=not checkpoints)
    return dict(
        output_dir=str(checkpoints or out_dir / "trainer"),
        **saving,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,  # transformers 5 reads a value below 1 as a ratio of the total steps
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        logging_nan_inf_filter=False,  # log a NaN loss as NaN (the default hides it), so the guard can stop the run
        eval_strategy="steps" if config.eval_steps and has_eval else "no",
        eval_steps=config.eval_steps,
        report_to="none",
        seed=seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device == "cpu",
        activation_checkpointing=checkpointing(config, device) is True,
        max_length=config.max_length,
        dataloader_pin_memory=device == "cuda",
        disable_tqdm=False,
        # Batches of examples of similar length pad little (transformers' LengthGroupedSampler: shuffled, then
        # sorted within groups of 50 batches, the longest batch first so an out-of-memory shows at step 1). It
        # reads the lengths off `input_ids`, which the preference trainers' datasets do not have (and KTO needs
        # its own fixed order).
        **({"train_sampling_strategy": "group_by_length"} if group_by_length else {}),
    )


def run_training(trainer, stage: str, config: TrainingConfig, tokenizer, out_dir: Path, history: list[dict],
                 model_path: str, data_hash: str, info: dict[str, Any],
                 start_metrics: dict[str, float] | None = None,
                 after_train: Callable[[], dict[str, float]] | None = None,
                 checkpoints: Path | None = None) -> StageResult:
    """Train, save the adapter or model with its tokenizer, curves and record; return metrics and history.

    A NaN or infinite loss stops training at the step it is logged and raises TuneryError naming the step. The
    health verdicts of the run (tasks.train.health) are added to `info`.

    `start_metrics` (measured before training) and what `after_train()` measures join the training metrics, as do
    the estimates made from the first steps (`estimate_*`) and how far the actual figures landed from them
    (`*_vs_estimate`).
    """
    import torch

    output, runtime, estimate = _train_guarded(trainer, stage, config, info, checkpoints)
    losses = [h["loss"] for h in history if "loss" in h]
    if not losses:
        raise TuneryError(f"{stage}: no training step was logged")
    info["health"] = verdicts(history, config.lr_scheduler, config.learning_rate, config.warmup_ratio,
                              int(trainer.state.max_steps))
    info["world_size"] = int(trainer.args.world_size)
    main = trainer.is_world_process_zero()  # under `accelerate launch`, only one process writes the result
    if main:
        trainer.model.save_pretrained(out_dir, safe_serialization=True)
        save_tokenizer(tokenizer, model_path, out_dir)
    metrics = {**(start_metrics or {}), **estimate, **_run_metrics(trainer, output, runtime, losses, info, estimate)}
    if "best_step" in metrics:
        info["early_stopping"] = {"best_step": int(metrics["best_step"]), "last_step": trainer.state.global_step,
                                  "best_eval_loss": metrics["best_eval_loss"], "patience": config.patience,
                                  "stopped_early": bool(metrics["stopped_early"])}
    if after_train is not None:
        metrics.update(after_train())
    if torch.cuda.is_available():
        metrics["train_peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if main:
        write_json(out_dir / "tunery_stage.json", {"stage": stage, "metrics": metrics, "info": info,
                                                   "start_model": model_path, "data_hash": data_hash})
        shutil.rmtree(out_dir / "trainer", ignore_errors=True)
        plot_history(history, out_dir / "training_curves.png", title=f"{stage} ({config.method}) on "
                                                                      f"{Path(model_path).name}",
                     best_step=metrics.get("best_step"))
    return StageResult(stage=stage, artifact_path=str(out_dir), metrics=metrics, history=history, info=info,
                       adapter=config.adapter,
                       quantization=config.quantization.model_dump() if config.quantized else None)


def save_tokenizer(tokenizer, model_path: str, out_dir: Path) -> None:
    """Save the tokenizer beside the trained weights, with the start model's SentencePiece file: transformers 5
    writes tokenizer.json only, and llama.cpp's converter reads a SentencePiece vocabulary from tokenizer.model."""
    tokenizer.save_pretrained(out_dir)
    source = Path(model_path) / "tokenizer.model"
    if source.exists() and not (Path(out_dir) / "tokenizer.model").exists():
        shutil.copy2(source, Path(out_dir) / "tokenizer.model")


def _train_guarded(trainer, stage: str, config: TrainingConfig, info: dict[str, Any], checkpoints: Path | None
                   ) -> tuple[Any, float, dict[str, float]]:
    """trainer.train() from the newest checkpoint in `checkpoints` (if any), watched for a NaN or infinite loss and
    estimating time and memory from its first steps; returns (its output, seconds, the estimates)."""
    import torch

    estimate: dict[str, float] = {}
    trainer.add_callback(estimate_callback(stage, estimate))
    guard = nan_guard()
    trainer.add_callback(guard)
    if trainer.args.load_best_model_at_end:
        from transformers import EarlyStoppingCallback

        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=config.patience))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    resume = last_checkpoint(checkpoints) if config.save_steps else None
    if resume:
        info["resumed_from"] = Path(resume).name
        print(f"{stage}: resuming from {resume}", file=sys.stderr)
    output = trainer.train(resume_from_checkpoint=resume)
    runtime = time.perf_counter() - start
    if guard.bad is not None:
        step, key, value = guard.bad
        what = "loss" if key == "loss" else "gradient norm"
        raise TuneryError(f"{stage}: the {what} became {value} at step {step}, so training stopped there; lower the "
                          "learning rate or check the data")
    return output, runtime, estimate


def _run_metrics(trainer, output, runtime: float, losses: list[float], info: dict[str, Any],
                 estimate: dict[str, float]) -> dict[str, float]:
    """What a finished run measured: losses, steps, time, memory, trainable parameters, health counts, tokens, and
    how far time and memory landed from the estimates."""
    metrics = {
        "train_loss": losses[-1],
        "train_loss_first": losses[0],
        "train_loss_mean": float(output.training_loss),
        "train_steps": float(trainer.state.global_step),
        "train_runtime_s": runtime,
        "train_peak_rss_mb": peak_rss_mb(),
        "trainable_params": float(sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)),
        "health_warnings": float(sum(v["ok"] is False for v in info["health"].values())),
        "health_not_judged": float(sum(v["ok"] is None for v in info["health"].values())),
    }
    tokens_seen = float(getattr(trainer.state, "num_input_tokens_seen", 0) or 0)
    if tokens_seen:
        metrics["train_tokens"] = tokens_seen
        metrics["train_tokens_per_s"] = tokens_seen / runtime if runtime > 0 else 0.0
    if trainer.args.load_best_model_at_end and trainer.state.best_metric is not None:
        metrics.update(best_step=float(trainer.state.best_global_step), best_eval_loss=float(trainer.state.best_metric),
                       stopped_early=float(trainer.state.global_step < trainer.state.max_steps))
    if estimate:
        metrics["train_time_vs_estimate"] = runtime / max(estimate["estimate_train_time_s"], 1e-9)
        metrics["peak_rss_vs_estimate"] = metrics["train_peak_rss_mb"] / estimate["estimate_peak_rss_mb"]
    return metrics
