"""Early stopping: with eval_steps and patience, training stops once the validation loss has not improved for
`patience` evaluations, and the version is the best evaluation's weights."""
from __future__ import annotations

import math

import pytest
from conftest import chat, write_jsonl

CROPS = ["apple", "bean", "carrot", "daisy", "endive", "fig", "garlic", "hop", "iris", "kale", "leek", "mint",
         "onion", "pea", "radish", "sage"]


@pytest.fixture
def contradicting(tmp_path):
    """Training answers say yes; the held-out answers to the same kind of question say no: the more the model
    learns, the worse its validation loss gets after the shared format is learned."""
    from tasks.data.prep import PrepConfig, prepare

    write_jsonl(tmp_path / "train.jsonl", [chat(f"Is {c} good?", f"Yes, {c} is good.") for c in CROPS])
    write_jsonl(tmp_path / "held.jsonl", [chat(f"Is {c} good?", f"No, {c} is bad.")
                                          for c in ["pear", "plum", "rose", "yam"]])
    return prepare(PrepConfig(train=["train.jsonl"], validation=["held.jsonl"],
                              contamination={"max_heldout_share": 1, "general": None}), tmp_path)


def test_training_stops_after_patience_and_keeps_the_best_checkpoint(tmp_path, tiny_model_dir, contradicting):
    from tasks.data.prep import load_prepared
    from tasks.evaluate.evaluation import perplexity
    from tasks.models import load_model, load_tokenizer
    from tasks.stages.sft import SftConfig, train_sft

    config = SftConfig(max_steps=40, batch_size=4, learning_rate=2e-2, eval_steps=1, patience=2, max_length=64,
                       warmup_ratio=0, lr_scheduler="constant")
    out = tmp_path / "out"
    result = train_sft(config, str(tiny_model_dir), contradicting.artifact_path, out, device="cpu")
    evals = [(int(h["step"]), h["eval_loss"]) for h in result.history if "eval_loss" in h]
    best_step, best_loss = min(evals, key=lambda e: e[1])
    last_step = evals[-1][0]
    # It stopped at the expected evaluation: `patience` evaluations after the best, long before max_steps.
    assert last_step == best_step + 2 * config.eval_steps < config.max_steps
    assert result.metrics["train_steps"] == last_step and result.metrics["stopped_early"] == 1.0
    assert result.metrics["best_step"] == best_step and result.metrics["best_eval_loss"] == pytest.approx(best_loss)
    assert result.info["early_stopping"] == {"best_step": best_step, "last_step": last_step,
                                             "best_eval_loss": pytest.approx(best_loss), "patience": 2,
                                             "stopped_early": True}
    # The saved adapter is the best checkpoint's: its held-out loss is the best evaluation's, not the last one's.
    _, _, validation = load_prepared(contradicting.artifact_path)
    model = load_model(str(tiny_model_dir), adapter=str(out))
    measured = math.log(perplexity(model, load_tokenizer(str(out)), validation)["perplexity"])
    assert measured == pytest.approx(best_loss, abs=1e-3)
    assert abs(measured - evals[-1][1]) > 1e-2
    assert not (out / "trainer").exists()  # the checkpoints were only a means
    assert (out / "training_curves.png").stat().st_size > 0


def test_patience_needs_eval_steps():
    from tasks.stages.sft import SftConfig

    with pytest.raises(ValueError, match="patience needs eval_steps"):
        SftConfig(patience=2)
    with pytest.raises(ValueError, match="save_steps .* must be a multiple of eval_steps"):
        SftConfig(patience=2, eval_steps=4, save_steps=6)
