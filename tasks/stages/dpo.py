"""Stage `dpo`: preference alignment with trl on prompt / chosen / rejected pairs.

`loss` picks the objective: DPO (`sigmoid`) and its variants that trl's DPOTrainer computes (IPO, hinge, robust,
...), KTO (trl's KTOTrainer, on the pairs split into desirable and undesirable answers), and the reference-free
ORPO and SimPO (trl.experimental's ORPOTrainer and CPOTrainer). With LoRA the reference model is the start model
itself with the adapter switched off, so no second copy is held in memory.

Recorded beyond the training metrics, on the held-out pairs: the model's own preference accuracy before and after
(how often the chosen answer is likelier per token than the rejected one) and, for the objectives that define an
implicit reward against the reference (DPO and its variants, KTO), the reward accuracy and margin after training.
The held-out pairs are scored once before and once after training: the start model is the reference, so its
scores serve both the "before" figures and the rewards.

Speed: the LM head projects only the answer tokens (`tasks.train.scored_head`); when the training data is seen more than
once, the reference log-probabilities are computed once before training (trl's `precompute_ref_log_probs`)
instead of at every step.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from core.errors import TuneryError
from tasks.common import StageResult
from tasks.evaluate.evaluation import pair_loglik, preference_stats
from tasks.models import load_model
from tasks.stages.stage import StagePlan, TrainingStage
from tasks.train.training import run_training, start_run, trainable_model, trainer_arguments
from tasks.train.history import history_callback
from tasks.train.settings import TrainingConfig

DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero",
              "apo_down", "sigmoid_norm")
REFERENCE_FREE = ("orpo", "simpo")


class DpoConfig(TrainingConfig):
    """Preference-alignment hyperparameters."""

    loss: Literal["sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero",
                  "apo_down", "sigmoid_norm", "kto", "orpo", "simpo"] = Field(
        "sigmoid", description="sigmoid is DPO; ipo/hinge/robust/... are DPO variants; kto, orpo and simpo use "
                               "their own trl trainers (orpo and simpo need no reference model).")
    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference model (DPO/IPO/KTO), "
                                               "or the odds-ratio weight (ORPO) / reward scale (SimPO).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Assumed share of flipped labels (robust, exo).")
    simpo_gamma: float = Field(0.5, ge=0, description="Target reward margin of SimPO.")
    learning_rate: float = Field(5e-5, gt=0, lt=1, description="Peak learning rate; preference tuning wants it "
                                                               "lower than sft.")
    epochs: float = Field(1, gt=0, description="Passes over the preference pairs (ignored when max_steps > 0).")


def _trainer(config: DpoConfig, model, ref_model, args: dict, train_ds, val_ds, tokenizer, peft_config, callbacks):
    """The trl trainer that computes `config.loss`."""
    common = dict(train_dataset=train_ds, eval_dataset=val_ds, processing_class=tokenizer, peft_config=peft_config,
                  callbacks=callbacks)
    if config.loss in DPO_LOSSES:
        from trl import DPOConfig as TrlDPOConfig
        from trl import DPOTrainer

        from tasks.train.scored_head import install, unwrapped

        # Seen more than once, the pairs' reference log-probabilities are worth computing once, up front.
        passes = (config.max_steps * config.batch_size * config.gradient_accumulation_steps / len(train_ds)
                  if config.max_steps > 0 else config.epochs)
        trl_args = TrlDPOConfig(**args, loss_type=[config.loss], beta=config.beta,
                                label_smoothing=config.label_smoothing, precompute_ref_log_probs=passes > 1)
        trainer = DPOTrainer(model=model, ref_model=ref_model, args=trl_args, **common)
        # trl's DPO logs entropy, mean logits and top-1 accuracy of the answers: the same fields, answer tokens only.
        install(unwrapped(trainer.model), ("log_probs", "entropy", "mean_logits", "is_top1"))
        if trainer.ref_model is not None:
            install(trainer.ref_model)
        return trainer
    if config.loss == "kto":
        from trl import KTOConfig, KTOTrainer
        from trl.data_utils import unpair_preference_dataset

        common["train_dataset"] = unpair_preference_dataset(train_ds)
        common["eval_dataset"] = unpair_preference_dataset(val_ds) if val_ds is not None else None
        return KTOTrainer(model=model, ref_model=ref_model, args=KTOConfig(**args, beta=config.beta), **common)
    if config.loss == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOTrainer(model=model, args=ORPOConfig(**args, beta=config.beta), **common)
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    trl_args = CPOConfig(**args, loss_type="simpo", cpo_alpha=0.0, beta=config.beta, simpo_gamma=config.simpo_gamma)
    return CPOTrainer(model=model, args=trl_args, **common)


def implicit_rewards(policy: list[tuple], reference: list[tuple], beta: float) -> dict[str, float]:
    """DPO's implicit reward of an answer, beta * (log pi(answer) - log pi_ref(answer)), from `pair_loglik` scores
    of the trained and the reference model: the share of pairs whose chosen answer earns the higher reward
    (reward_accuracy) and the mean difference (reward_margin), as trl's rewards/accuracies and rewards/margins."""
    margins = [beta * ((pc - rc) - (pr - rr)) for (pc, _, pr, _), (rc, _, rr, _) in zip(policy, reference)]
    return {"reward_accuracy": sum(m > 0 for m in margins) / len(margins),
            "reward_margin": sum(margins) / len(margins)}


def train_dpo(config: DpoConfig, model_path: str, data_dir: str | Path, out_dir: str | Path,
              device: str = "auto", seed: int = 0, checkpoints: str | Path | None = None) -> StageResult:
    """Align the model in `model_path` with the prepared preference pairs in `data_dir`; write it to `out_dir`.

    Raises TuneryError for data that is not preference pairs.
    """
    from datasets import Dataset

    run = start_run(DpoStage, config, model_path, data_dir, device, seed, checkpoints)
    device, precision, tokenizer, out_dir = run.device, run.precision, run.tokenizer, Path(out_dir)
    train_rows, val_rows = run.train_rows, run.val_rows
    columns = ("prompt", "chosen", "rejected")
    train_ds = Dataset.from_list([{k: r[k] for k in columns} for r in train_rows])
    # Held-out pairs go to the trainer only for a validation-loss curve (eval_steps); the before/after figures
    # below score them once each.
    val_ds = Dataset.from_list([{k: r[k] for k in columns} for r in val_rows]) if val_rows and config.eval_steps \
        else None

    model, peft_config, info = trainable_model(config, model_path, device)
    start, reference = {}, None
    if val_rows:
        reference = pair_loglik(model, tokenizer, val_rows, config.max_length, config.batch_size)
        before = preference_stats(reference)
        start = {f"{k}_start": v for k, v in before.items()}
    # LoRA: trl uses the start model with the adapter disabled as the reference; otherwise it needs its own copy.
    needs_ref = config.loss not in REFERENCE_FREE and peft_config is None
    ref_model = load_model(model_path, device=device).eval() if needs_ref else None
    args = trainer_arguments(config, out_dir, device, precision, seed, has_eval=val_ds is not None,
                             group_by_length=False, checkpoints=run.checkpoints)
    history: list[dict[str, float]] = []
    trainer = _trainer(config, model, ref_model, args, train_ds, val_ds, tokenizer, peft_config,
                       [history_callback(history)])
    info.update(device=device, precision=precision, loss=config.loss)

    def after_train() -> dict[str, float]:
        if not val_rows:
            return {}
        scores = pair_loglik(trainer.model, tokenizer, val_rows, config.max_length, config.batch_size)
        metrics = preference_stats(scores)
        if config.loss not in REFERENCE_FREE:
            metrics.update(implicit_rewards(scores, reference, config.beta))
        return metrics

    return run_training(trainer, "dpo", config, tokenizer, out_dir, history, model_path, run.meta["data_hash"],
                        info, start_metrics=start, after_train=after_train, checkpoints=run.checkpoints)


class DpoStage(TrainingStage, DpoConfig):
    """Preference alignment (DPO, IPO, KTO, ORPO, SimPO, ...) on prompt/chosen/rejected pairs; registers it.

    A `dpo` stage of a pipeline config: its pairs are its own `data`, the top-level data, or those an earlier
    distill-model stage wrote (`pairs_from`)."""

    data_kind: ClassVar[str | None] = "preference"
    trainer: ClassVar = staticmethod(train_dpo)
    stage: Literal["dpo"] = "dpo"
    pairs_from: str | None = Field(None, description="Train on the preference pairs an earlier distill-model stage "
                                                     "(its id) wrote with `preference_pairs: true`.")

    def references(self) -> list[str]:
        return super().references() + ([self.pairs_from] if self.pairs_from else [])

    def plan(self, planner) -> StagePlan:
        """With `pairs_from`, the pairs that distill-model stage wrote are its data."""
        if not self.pairs_from:
            return super().plan(planner)
        path = planner.resolve(self.pairs_from).preference_pairs
        if not path:
            raise TuneryError(f"stage {self.id or self.kind}: pairs_from {self.pairs_from!r} wrote no preference "
                              "pairs; give that distill-model stage `preference_pairs: true`")
        return StagePlan(data_from="pairs", data=path)

    @model_validator(mode="after")
    def _one_source_of_pairs(self) -> "DpoStage":
        if self.pairs_from and self.data is not None:
            raise ValueError("give a dpo stage `data` or `pairs_from`, not both")
        return self
