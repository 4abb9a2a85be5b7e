"""Training health: verdicts from a run's history, and a NaN loss that stops a run and fails its version."""
from __future__ import annotations

import pytest

import registry
from core.errors import TuneryError
from tasks.stages.sft import SftConfig, train_sft
from tasks.train import health

FAST = {"batch_size": 4, "max_length": 128, "learning_rate": 5e-3}


def test_a_healthy_run_gets_healthy_verdicts(tiny_model_dir, prepared, tmp_path):
    cfg = SftConfig(method="full", **{**FAST, "learning_rate": 3e-3}, max_steps=12, warmup_ratio=0.25,
                    lr_scheduler="cosine")
    result = train_sft(cfg, str(tiny_model_dir), prepared.artifact_path, tmp_path / "out", "cpu")
    h = result.info["health"]
    assert h["loss"]["verdict"] == "falling" and h["learning_rate"]["verdict"] == "as configured"
    assert h["grad_norm"]["ok"] and h["memory"]["verdict"] in ("flat", "growing")
    assert result.metrics["health_warnings"] == sum(v["ok"] is False for v in h.values())


def test_a_run_too_short_to_judge_says_so_and_is_not_counted_healthy(tiny_model_dir, prepared, tmp_path):
    result = train_sft(SftConfig(method="full", **FAST, max_steps=2), str(tiny_model_dir), prepared.artifact_path,
                       tmp_path / "out", "cpu")
    h = result.info["health"]
    assert (h["loss"]["verdict"], h["loss"]["ok"]) == ("too short", None), h["loss"]
    assert (h["memory"]["verdict"], h["memory"]["ok"]) == ("too short", None), h["memory"]
    assert "4 or more" in h["loss"]["detail"]
    assert result.metrics["health_not_judged"] >= 2 and result.metrics["health_warnings"] == 0


@pytest.mark.parametrize("losses, verdict", [([4, 3.5, 3, 2.5, 2, 1.5, 1, 0.9], "falling"),
                                             ([2, 2.01, 1.99, 2, 2, 2.01, 2, 1.99], "flat"),
                                             ([1, 1.2, 1.5, 1.7, 2, 2.2, 2.5, 3], "rising")])
def test_loss_verdicts(losses, verdict):
    assert health.loss_verdict(losses)["verdict"] == verdict


def test_grad_norm_spikes_and_memory_growth_are_flagged():
    assert health.grad_norm_verdict([1.0] * 9 + [50.0])["verdict"] == "spiking"
    assert health.grad_norm_verdict([1.0, 1.2, 0.9, 1.1])["verdict"] == "healthy"
    assert health.memory_verdict([1000 + 100 * i for i in range(12)])["verdict"] == "growing"
    assert health.memory_verdict([1000.0] * 12)["verdict"] == "flat"


def test_a_schedule_that_differs_from_the_configured_one_is_off_schedule():
    rates = health.expected_learning_rates("linear", 1e-3, 0.0, 10)
    points = [(step, rate) for step, rate in enumerate(rates, start=1)]
    assert health.learning_rate_verdict(points, "linear", 1e-3, 0.0, 10)["verdict"] == "as configured"
    assert health.learning_rate_verdict(points, "constant", 1e-3, 0.0, 10)["verdict"] == "off schedule"


def _poison(monkeypatch, kind: str, clean_steps: int) -> dict[str, int]:
    """Make step `clean_steps + 1` of the sft stage go bad in one way, and count the forward passes that ran:
    - "nan loss": the final norm's output (every forward path, trl's fused head included) turns NaN;
    - "inf loss": the trainer's loss is multiplied by infinity;
    - "nan grad norm": the loss stays finite but the gradient flowing back from the final norm turns NaN."""
    from tasks.stages import sft
    from tasks.train import training

    seen = {"forward": 0, "backward": 0}
    real_model, real_trainer = training.trainable_model, sft.scored_sft_trainer

    def patched_model(config, model_path, device):
        model, peft_config, info = real_model(config, model_path, device)
        norm = model.get_decoder().norm

        def forward_hook(module, args, output):
            seen["forward"] += 1
            return output * float("nan") if kind == "nan loss" and seen["forward"] > clean_steps else output

        def backward_hook(module, grad_input, grad_output):
            seen["backward"] += 1
            if seen["backward"] > clean_steps:
                return tuple(None if g is None else g * float("nan") for g in grad_input)

        norm.register_forward_hook(forward_hook)
        if kind == "nan grad norm":
            norm.register_full_backward_hook(backward_hook)
        return model, peft_config, info

    def patched_trainer():
        class Poisoned(real_trainer()):
            def compute_loss(self, *args, **kwargs):
                loss = super().compute_loss(*args, **kwargs)
                return loss * float("inf") if kind == "inf loss" and seen["forward"] > clean_steps else loss

        return Poisoned

    monkeypatch.setattr(sft, "trainable_model", patched_model)
    monkeypatch.setattr(sft, "scored_sft_trainer", patched_trainer)
    return seen


@pytest.mark.parametrize("kind, message", [
    ("nan loss", "the loss became nan at step 3"),
    ("inf loss", "the loss became inf at step 3"),
    ("nan grad norm", "the gradient norm became nan at step 3"),
])
def test_a_bad_step_stops_training_there_and_fails_the_version(tiny_model_dir, garden_rows, tmp_path, monkeypatch,
                                                               tunery_home, kind, message):
    import yaml
    from conftest import write_jsonl

    from flows import inputs, run
    from flows.config import load_config

    # Two clean steps (the estimate needs no probe passes of its own), then a bad one at step 3 of 20.
    seen = _poison(monkeypatch, kind, clean_steps=2)
    write_jsonl(tmp_path / "g.jsonl", garden_rows)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "name": "bad", "base_model": str(tiny_model_dir), "device": "cpu", "data": {"train": "g.jsonl"},
        "stages": [{"stage": "sft", "max_steps": 20, **FAST}]}))
    cfg, config_dir = load_config(tmp_path / "c.yaml")
    base = inputs.run_base(cfg, config_dir)
    data = inputs.run_prep(cfg, config_dir, base.artifact_path)
    with pytest.raises(TuneryError, match=message + ", so training stopped there"):
        run.run_train(cfg, cfg.stages[0], base, data)
    assert seen["forward"] == 3  # training stopped: steps 4-20 never ran
    failed = registry.get_version("bad:1")
    assert failed.status == "failed" and message in failed.error
    assert not (tunery_home / "artifacts" / "bad" / "1").exists()


def test_preflight_estimate_is_recorded_next_to_the_actual_figures(tiny_model_dir, prepared, tmp_path):
    result = train_sft(SftConfig(**FAST, max_steps=6), str(tiny_model_dir), prepared.artifact_path,
                       tmp_path / "out", "cpu")
    m = result.metrics
    assert m["estimate_train_steps"] == m["train_steps"] == 6
    # Tokens are extrapolated from the first batch: the right order of magnitude, not exact.
    assert 0.5 < m["estimate_train_tokens"] / m["train_tokens"] < 2
    assert m["estimate_train_time_s"] > 0 and m["estimate_peak_rss_mb"] > 0
    assert m["train_time_vs_estimate"] == pytest.approx(m["train_runtime_s"] / m["estimate_train_time_s"])
    assert m["peak_rss_vs_estimate"] == pytest.approx(m["train_peak_rss_mb"] / m["estimate_peak_rss_mb"])
