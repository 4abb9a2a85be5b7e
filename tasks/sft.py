"""Stage `sft`: supervised fine-tuning with trl on chat examples, as LoRA, QLoRA, a full or a Spectrum fine-tune.

The loss covers the assistant's answer only (the completion tokens of `models.encode_chat`), the same tokens the
eval stage scores. The loss, learning-rate, grad-norm and memory history of the run is returned with the result.
"""
from __future__ import annotations

from pathlib import Path

from tasks.common import StageResult, TuneryError
from tasks.models import encode_chat
from tasks.training import (TrainingConfig, history_callback, run_training, start_run, trainable_model,
                            trainer_arguments)


class SftConfig(TrainingConfig):
    """Supervised fine-tuning hyperparameters (trl SFTTrainer)."""


def train_sft(config: SftConfig, model_path: str, data_dir: str | Path, out_dir: str | Path,
              device: str = "auto", seed: int = 0) -> StageResult:
    """Fine-tune the model in `model_path` on the prepared chat data in `data_dir`; write the result to `out_dir`.

    Raises TuneryError for data that is not chat data or that leaves nothing to train on after truncation.
    """
    from datasets import Dataset
    from trl import SFTConfig as TrlSFTConfig
    from trl import SFTTrainer

    run = start_run("sft", config, model_path, data_dir, device, seed)
    device, precision, tokenizer, out_dir = run.device, run.precision, run.tokenizer, Path(out_dir)

    def encode(rows: list[dict]) -> Dataset:
        encoded = [encode_chat(tokenizer, r["messages"], config.max_length) for r in rows]
        return Dataset.from_list([e for e in encoded if any(e["completion_mask"])])

    train_ds, val_ds = encode(run.train_rows), encode(run.val_rows)
    if len(train_ds) == 0:
        raise TuneryError(f"max_length {config.max_length} cuts off every answer; raise max_length")

    model, peft_config, info = trainable_model(config, model_path, device)
    args = TrlSFTConfig(**trainer_arguments(config, out_dir, device, precision, seed, has_eval=len(val_ds) > 0),
                        completion_only_loss=True, include_num_input_tokens_seen="non_padding")
    history: list[dict[str, float]] = []
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds if len(val_ds) else None,
        processing_class=tokenizer, peft_config=peft_config, callbacks=[history_callback(history)],
    )
    info.update(device=device, precision=precision)
    return run_training(trainer, "sft", config, tokenizer, out_dir, history, model_path, run.meta["data_hash"],
                        info)
