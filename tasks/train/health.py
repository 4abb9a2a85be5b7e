"""Was a training run healthy? Verdicts from its logged history, plus a guard that stops a run whose loss is NaN.

Each verdict is {"verdict": short word, "ok": bool or None, "detail": one sentence with the numbers behind it}; `ok`
is None ("too short", "not logged") when the history holds too little to judge: not a warning, and not healthy either.
- loss: falling / flat / rising (mean of the last quarter of logged losses against the first quarter);
- grad_norm: healthy / spiking / vanishing (any step above 10x the median norm is a spike);
- learning_rate: as configured / off schedule (every logged rate against the configured scheduler's own values);
- memory: flat / growing (resident memory in the last quarter against the second quarter of the run).
"""
from __future__ import annotations

import math
import statistics
from typing import Any

SPIKE_FACTOR = 10.0
TREND = 0.02        # a loss change under 2% counts as flat
MEMORY_GROWTH = 0.10


def nan_guard():
    """A TrainerCallback that stops training at the first logged loss (or grad norm) that is NaN or infinite."""
    from transformers import TrainerCallback

    class NanGuard(TrainerCallback):
        def __init__(self):
            self.bad: tuple[int, float] | None = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            for key in ("loss", "grad_norm"):
                value = (logs or {}).get(key)
                if isinstance(value, (int, float)) and not math.isfinite(value) and self.bad is None:
                    self.bad = (state.global_step, key, float(value))
                    control.should_training_stop = True

    return NanGuard()


def _quarters(values: list[float]) -> tuple[list[float], list[float], list[float]]:
    n = max(1, len(values) // 4)
    return values[:n], values[n:2 * n], values[-n:]


def _too_short(values: list[float], needed: int, what: str) -> dict[str, Any] | None:
    """The "too short" verdict (not judged) when fewer than `needed` values were logged, else None."""
    if len(values) >= needed:
        return None
    return {"verdict": "too short", "ok": None,
            "detail": f"only {len(values)} {what}; {needed} or more are needed for a trend"}


def loss_verdict(losses: list[float]) -> dict[str, Any]:
    if short := _too_short(losses, 4, "logged losses"):
        return short
    first, _, last = _quarters(losses)
    a, b = statistics.fmean(first), statistics.fmean(last)
    change = (b - a) / abs(a) if a else 0.0
    verdict = "falling" if change < -TREND else "rising" if change > TREND else "flat"
    return {"verdict": verdict, "ok": verdict == "falling",
            "detail": f"mean loss {a:.4g} in the first quarter, {b:.4g} in the last ({change:+.1%})"}


def grad_norm_verdict(norms: list[float]) -> dict[str, Any]:
    if not norms:
        return {"verdict": "not logged", "ok": None, "detail": "no grad norms were logged"}
    median = statistics.median(norms)
    if median < 1e-8:
        return {"verdict": "vanishing", "ok": False, "detail": f"median grad norm {median:.2e}"}
    spikes = [i for i, g in enumerate(norms) if g > SPIKE_FACTOR * median]
    if spikes:
        return {"verdict": "spiking", "ok": False,
                "detail": f"{len(spikes)} of {len(norms)} steps above {SPIKE_FACTOR:g}x the median {median:.3g} "
                          f"(max {max(norms):.3g})"}
    return {"verdict": "healthy", "ok": True,
            "detail": f"median {median:.3g}, max {max(norms):.3g} (within {SPIKE_FACTOR:g}x the median)"}


def expected_learning_rates(scheduler: str, learning_rate: float, warmup_ratio: float, total_steps: int
                            ) -> list[float]:
    """The rate the configured scheduler sets for optimizer steps 1..total_steps (the trainer logs it with the step)."""
    import torch
    from transformers import get_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=learning_rate)
    warmup = math.ceil(warmup_ratio * total_steps)
    sched = get_scheduler(scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    rates = []
    for _ in range(total_steps):
        rates.append(sched.get_last_lr()[0])
        optimizer.step()
        sched.step()
    return rates


def learning_rate_verdict(points: list[tuple[int, float]], scheduler: str, learning_rate: float,
                          warmup_ratio: float, total_steps: int) -> dict[str, Any]:
    if not points or total_steps < 1:
        return {"verdict": "not logged", "ok": None, "detail": "no learning rates were logged"}
    expected = expected_learning_rates(scheduler, learning_rate, warmup_ratio, total_steps)
    worst = 0.0
    for step, rate in points:
        if 1 <= step <= total_steps:
            worst = max(worst, abs(rate - expected[step - 1]) / learning_rate)
    ok = worst < 1e-3
    return {"verdict": "as configured" if ok else "off schedule", "ok": ok,
            "detail": f"{scheduler}, peak {learning_rate:g}, warmup {warmup_ratio:g}: largest deviation "
                      f"{worst:.1e} of the peak over {len(points)} logged steps"}


def memory_verdict(rss: list[float]) -> dict[str, Any]:
    if short := _too_short(rss, 8, "memory readings"):
        return short
    _, second, last = _quarters(rss)
    a, b = statistics.median(second), statistics.median(last)
    growth = (b - a) / a
    verdict = "growing" if growth > MEMORY_GROWTH else "flat"
    return {"verdict": verdict, "ok": verdict == "flat",
            "detail": f"resident memory {a:.0f} MB in the second quarter, {b:.0f} MB in the last ({growth:+.1%})"}


def verdicts(history: list[dict[str, float]], scheduler: str, learning_rate: float, warmup_ratio: float,
             total_steps: int) -> dict[str, dict[str, Any]]:
    """All four verdicts for one run's logged history (training-log rows, not evaluation rows)."""
    rows = [h for h in history if "loss" in h]
    return {
        "loss": loss_verdict([h["loss"] for h in rows]),
        "grad_norm": grad_norm_verdict([h["grad_norm"] for h in rows if "grad_norm" in h]),
        "learning_rate": learning_rate_verdict([(int(h["step"]), h["learning_rate"]) for h in rows
                                                if "learning_rate" in h], scheduler, learning_rate, warmup_ratio,
                                               total_steps),
        "memory": memory_verdict([h["rss_mb"] for h in rows if "rss_mb" in h]),
    }
