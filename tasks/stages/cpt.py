"""Stage `cpt`: continued pretraining on raw text, to put a domain's vocabulary and facts into the weights.

Every token of every document is trained on. Documents get an end-of-text token, those longer than `max_length`
are split into pieces, and the pieces are packed best-fit-decreasing into sequences of `max_length` tokens (trl's
`bfd_split` packing). Packed sequences carry their own position ids, so attention never crosses a document boundary.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from tasks.common import StageResult
from tasks.stages.stage import TrainingStage
from tasks.train.training import run_training, start_run, trainable_model, trainer_arguments
from tasks.train.history import history_callback
from tasks.train.settings import TrainingConfig


class CptConfig(TrainingConfig):
    """Continued-pretraining hyperparameters (trl SFTTrainer on text with packing)."""

    max_length: int = Field(512, ge=16, description="Tokens per packed sequence; longer documents are split.")
    learning_rate: float = Field(1e-4, gt=0, lt=1, description="Peak learning rate; keep it below sft's to limit "
                                                              "forgetting.")


def train_cpt(config: CptConfig, model_path: str, data_dir: str | Path, out_dir: str | Path,
              device: str = "auto", seed: int = 0, checkpoints: str | Path | None = None) -> StageResult:
    """Continue pretraining the model in `model_path` on the prepared text in `data_dir`; write it to `out_dir`.

    Records the held-out text perplexity before and after training when the data has a validation split.
    Raises TuneryError for data that is not raw text.
    """
    from datasets import Dataset
    from trl import SFTConfig as TrlSFTConfig

    from tasks.stages.sft import scored_sft_trainer

    run = start_run(CptStage, config, model_path, data_dir, device, seed, checkpoints)
    device, precision, tokenizer, out_dir = run.device, run.precision, run.tokenizer, Path(out_dir)
    train_ds = Dataset.from_list([{"text": r["text"]} for r in run.train_rows])
    val_ds = Dataset.from_list([{"text": r["text"]} for r in run.val_rows]) if run.val_rows else None

    model, peft_config, info = trainable_model(config, model_path, device)
    args = TrlSFTConfig(**trainer_arguments(config, out_dir, device, precision, seed, has_eval=val_ds is not None,
                                            checkpoints=run.checkpoints),
                        dataset_text_field="text", packing=True, packing_strategy="bfd_split",
                        completion_only_loss=False, include_num_input_tokens_seen="all")  # packed: no padding
    history: list[dict[str, float]] = []
    trainer = scored_sft_trainer()(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                                   processing_class=tokenizer, peft_config=peft_config,
                                   callbacks=[history_callback(history)])
    info.update(device=device, precision=precision, packing="bfd_split",
                train_sequences=len(trainer.train_dataset))
    if val_ds is None:
        return run_training(trainer, "cpt", config, tokenizer, out_dir, history, model_path, run.meta["data_hash"],
                            info, checkpoints=run.checkpoints)
    # The held-out text's perplexity (all tokens, packed like training), before and after.
    return run_training(
        trainer, "cpt", config, tokenizer, out_dir, history, model_path, run.meta["data_hash"], info,
        start_metrics={"text_perplexity_start": math.exp(trainer.evaluate()["eval_loss"])},
        after_train=lambda: {"text_perplexity": math.exp(trainer.evaluate()["eval_loss"])},
        checkpoints=run.checkpoints,
    )


class CptStage(TrainingStage, CptConfig):
    """Continued pretraining on raw text; registers the new version (no evaluation)."""

    data_kind: ClassVar[str | None] = "text"
    trainer: ClassVar = staticmethod(train_cpt)
    stage: Literal["cpt"] = "cpt"
