"""What a training run logs and shows: the per-step history (loss, learning rate, grad norm, memory), the time and
memory estimate made from the first steps, and the training-curves plot saved beside the result."""
from __future__ import annotations

import sys
import time
from pathlib import Path



def history_callback(history: list[dict[str, float]]):
    """A TrainerCallback that keeps every logged value plus the process's memory at that step."""
    import psutil
    import torch
    from transformers import TrainerCallback

    process = psutil.Process()

    class History(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs:
                return
            row = {"step": float(state.global_step), "epoch": float(state.epoch or 0)}
            for key, value in logs.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    row[key] = float(value)
            row["rss_mb"] = process.memory_info().rss / 2**20
            if torch.cuda.is_available():
                row["cuda_allocated_mb"] = torch.cuda.memory_allocated() / 2**20
            history.append(row)

    return History()


def estimate_callback(stage: str, estimate: dict[str, float]):
    """A TrainerCallback that estimates the run from its first two optimizer steps, with no probe of its own.

    Time = the first step (which pays one-time costs: allocator, kernels, the optimizer's state) plus the second
    step's time for each remaining step; memory = peak resident memory after the second step, when the optimizer
    state exists; tokens = the tokens seen so far per step, times the steps. Printed once known, and recorded next
    to the actual figures (`estimate_*`, `*_vs_estimate`).
    """
    from transformers import TrainerCallback

    from tasks.common import peak_rss_mb

    class Estimate(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.began, self.first_step, self.times = time.perf_counter(), state.global_step, []

        def on_step_end(self, args, state, control, **kwargs):
            if len(self.times) >= 2:
                return
            self.times.append(time.perf_counter() - self.began - sum(self.times))
            steps = state.max_steps - self.first_step
            if len(self.times) < min(2, steps):
                return
            done = state.global_step - self.first_step
            per_step = self.times[-1]
            estimate.update({
                "estimate_train_steps": float(state.max_steps),
                "estimate_train_tokens": float(state.num_input_tokens_seen) / max(done, 1) * steps,
                "estimate_train_time_s": self.times[0] + per_step * (steps - 1),
                "estimate_peak_rss_mb": peak_rss_mb(),
            })
            print(f"{stage}: ~{estimate['estimate_train_tokens']:.0f} tokens in {steps} steps, "
                  f"~{estimate['estimate_train_time_s']:.0f} s, ~{estimate['estimate_peak_rss_mb']:.0f} MB peak "
                  "(estimated from the first steps)", file=sys.stderr)

    return Estimate()


def plot_history(history: list[dict[str, float]], path: Path, title: str = "", best_step: float | None = None
                 ) -> None:
    """Save loss (and eval loss), learning rate, grad norm and memory against the step as one PNG; with early
    stopping, a line marks the best evaluation's step (the version's weights)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", "eval_loss"), ("learning_rate",), ("grad_norm",), ("rss_mb",)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3), constrained_layout=True)
    for ax, keys in zip(axes, panels):
        for key in keys:
            points = [(h["step"], h[key]) for h in history if key in h]
            if points:
                ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, markersize=3, label=key)
        if best_step is not None and keys[0] == "loss":
            ax.axvline(best_step, color="green", linestyle="--", linewidth=1, label=f"best (step {best_step:.0f})")
        ax.set_title(keys[0])
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=80)
    plt.close(fig)
