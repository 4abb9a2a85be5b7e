"""Stage `sft`: supervised fine-tuning with trl on chat examples, as LoRA, QLoRA, a full or a Spectrum fine-tune.

The loss covers the assistant's answer only (the completion tokens of `models.encode_chat`), the same tokens the
eval stage scores, and the LM head projects only those positions (`tasks.train.scored_head`). The loss, learning-rate,
grad-norm and memory history of the run is returned with the result.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from core.errors import TuneryError
from tasks.common import StageResult
from tasks.models import encode_chat
from tasks.stages.stage import TrainingStage
from tasks.train.training import run_training, start_run, trainable_model, trainer_arguments
from tasks.train.history import history_callback
from tasks.train.settings import TrainingConfig


class SftConfig(TrainingConfig):
    """Supervised fine-tuning hyperparameters (trl SFTTrainer)."""


def scored_sft_trainer():
    """trl's SFTTrainer with the LM head and log-softmax only at the answer tokens, and no per-step entropy or
    top-1 accuracy over the vocabulary (trl computes both for its logs; tunery records neither).

    Its length-grouped batch order comes from its own generator seeded with the run's seed, so the batches a run
    sees do not depend on how many random numbers dropout drew before (transformers' sampler takes the global
    generator), and two runs that differ only in a numeric setting train on the same batches."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler
    from trl import SFTTrainer

    from tasks.train.scored_head import install, unwrapped

    class ScoredSFTTrainer(SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.scored_head = install(unwrapped(self.model))

        def _get_train_sampler(self, train_dataset=None):
            sampler = super()._get_train_sampler(train_dataset)
            if isinstance(sampler, LengthGroupedSampler) and sampler.generator is None:
                seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
                sampler.generator = torch.Generator().manual_seed(seed)
            return sampler

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not self.scored_head:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            outputs = model(**inputs, fused_lm_head=True)
            scored = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = -outputs.log_probs.sum() / torch.as_tensor(scored).clamp(min=1)
            # As trl's loss: num_items_in_batch counts every rank's tokens, and DDP averages the gradients.
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            if return_outputs:  # callers that want logits (compute_metrics) get them from a plain forward
                with torch.no_grad():
                    return loss, model(**{k: v for k, v in inputs.items() if k != "labels"})
            return loss

    return ScoredSFTTrainer


def train_sft(config: SftConfig, model_path: str, data_dir: str | Path, out_dir: str | Path,
              device: str = "auto", seed: int = 0, checkpoints: str | Path | None = None) -> StageResult:
    """Fine-tune the model in `model_path` on the prepared chat data in `data_dir`; write the result to `out_dir`.

    Raises TuneryError for data that is not chat data or that leaves nothing to train on after truncation.
    """
    from datasets import Dataset
    from trl import SFTConfig as TrlSFTConfig

    run = start_run(SftStage, config, model_path, data_dir, device, seed, checkpoints)
    device, precision, tokenizer, out_dir = run.device, run.precision, run.tokenizer, Path(out_dir)

    def encode(rows: list[dict]) -> Dataset:
        encoded = [encode_chat(tokenizer, r["messages"], config.max_length) for r in rows]
        return Dataset.from_list([e for e in encoded if any(e["completion_mask"])])

    train_ds, val_ds = encode(run.train_rows), encode(run.val_rows)
    if len(train_ds) == 0:
        raise TuneryError(f"max_length {config.max_length} cuts off every answer; raise max_length")

    model, peft_config, info = trainable_model(config, model_path, device)
    args = TrlSFTConfig(**trainer_arguments(config, out_dir, device, precision, seed, has_eval=len(val_ds) > 0,
                                            checkpoints=run.checkpoints),
                        completion_only_loss=True, include_num_input_tokens_seen="non_padding")
    history: list[dict[str, float]] = []
    trainer = scored_sft_trainer()(
        model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds if len(val_ds) else None,
        processing_class=tokenizer, peft_config=peft_config, callbacks=[history_callback(history)],
    )
    info.update(device=device, precision=precision)
    return run_training(trainer, "sft", config, tokenizer, out_dir, history, model_path, run.meta["data_hash"],
                        info, checkpoints=run.checkpoints)


class SftStage(TrainingStage, SftConfig):
    """Supervised fine-tuning on chat data; registers the new version (no evaluation)."""

    data_kind: ClassVar[str | None] = "chat"
    trainer: ClassVar = staticmethod(train_sft)
    stage: Literal["sft"] = "sft"
