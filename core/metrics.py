"""The metric catalogue: every metric tunery records, declared once with its unit, better direction, format, group
and meaning, the way lm-evaluation-harness registers metrics with `higher_is_better`.

Everything that ranks, colours or tables a metric reads this map: `tunery compare` (which change is better), the
best version of a run and the best trial of a sweep (`metric:` in the config), the promotion gate's labels, the CLI
tables, the Prefect artifacts and the dashboard. Adding a metric is its computation plus one `Metric(...)` line here.

Two name forms inherit an entry: `NAME/PART` is NAME measured on one category of the data (`perplexity/support`),
and `gguf_NAME` is NAME measured on the exported GGUF through llama.cpp (`gguf_answer_f1`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Literal

GROUPS = ("headline", "quality", "answers", "general", "latency", "training", "health", "preference", "judge",
          "distill")
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")  # a name is also a (quoted) SQL column alias of the version table


@dataclass(frozen=True)
class Metric:
    """One metric: `better` is "lower", "higher" or None (a count or a size: no direction); `fmt` a format spec;
    `label` the short column title tables use."""

    name: str
    better: Literal["lower", "higher"] | None
    unit: str
    fmt: str
    group: str
    meaning: str
    label: str = ""

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name) or self.group not in GROUPS or self.better not in ("lower", "higher", None):
            raise ValueError(f"bad catalogue entry {self}")

    @property
    def title(self) -> str:
        return self.label or self.name

    def format(self, value: Any) -> str:
        """The value as tables write it; None or NaN as '-'."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return format(value, self.fmt) if isinstance(value, (int, float)) else str(value)


def _m(name: str, better: str | None, unit: str, fmt: str, group: str, meaning: str, label: str = "") -> Metric:
    return Metric(name, better, unit, fmt, group, meaning, label)  # type: ignore[arg-type]


ENTRIES: list[Metric] = [
    # headline: the columns of every table of many versions, in this order
    _m("perplexity", "lower", "", ".3f", "headline", "held-out perplexity of the data's answers", "perplexity"),
    _m("answer_f1", "higher", "", ".3f", "headline", "token F1 of greedy held-out answers against the references",
       "answer F1"),
    _m("general_accuracy", "higher", "", ".3f", "headline", "accuracy on the general-knowledge suite (forgetting)",
       "general acc."),
    _m("tokens_per_s", "higher", "tokens/s", ".1f", "headline", "decode speed at batch 1", "tokens/s"),
    _m("ttft_ms", "lower", "ms", ".0f", "headline", "time to first token at batch 1", "TTFT ms"),
    _m("peak_rss_mb", "lower", "MB", ".0f", "headline", "peak resident memory of the evaluation process",
       "peak RSS MB"),
    # quality: what perplexity is made of
    _m("nll_sum", "lower", "nats", ".1f", "quality", "summed negative log-likelihood of the scored tokens"),
    _m("tokens", None, "tokens", ".0f", "quality", "answer tokens scored for perplexity"),
    _m("eval_rows", None, "rows", ".0f", "quality", "held-out rows evaluated"),
    _m("rows", None, "rows", ".0f", "quality", "held-out rows of a category"),
    _m("text_perplexity", "lower", "", ".3f", "quality", "perplexity of held-out raw text (cpt) after the stage"),
    _m("text_perplexity_start", "lower", "", ".3f", "quality", "the same, of the model the stage started from"),
    # answers: scores of greedy held-out answers (tasks/scores.py SCORERS)
    _m("answer_exact", "higher", "", ".3f", "answers", "share of held-out answers equal to the reference"),
    _m("answer_rougeL", "higher", "", ".3f", "answers", "ROUGE-L F of held-out answers against the references"),
    _m("answer_chrf", "higher", "", ".2f", "answers", "chrF of held-out answers against the references"),
    _m("answer_rows", None, "rows", ".0f", "answers", "held-out answers scored"),
    _m("gen_tokens", None, "tokens", ".1f", "answers", "mean length of the greedy held-out answers"),
    # general: the forgetting check (tasks/general.py)
    _m("general_items", None, "items", ".0f", "general", "general-suite items scored"),
    _m("general_drop_pct", "lower", "points", ".1f", "general", "general accuracy lost against the first parent"),
    _m("general_accuracy_parent", None, "", ".3f", "general", "the first parent's general accuracy"),
    # latency, memory and cost
    _m("tokens_per_s_adapter", "higher", "tokens/s", ".1f", "latency", "decode speed with the LoRA adapter unmerged"),
    _m("ttft_ms_adapter", "lower", "ms", ".0f", "latency", "time to first token with the LoRA adapter unmerged"),
    _m("peak_cuda_mb", "lower", "MB", ".0f", "latency", "peak CUDA memory of the evaluation"),
    _m("cost_per_mtok_usd", "lower", "USD", ".4f", "latency", "cost of a million decoded tokens at eval.price_per_hour"),
    # training
    _m("train_loss", "lower", "", ".4f", "training", "last logged training loss"),
    _m("train_loss_first", None, "", ".4f", "training", "first logged training loss"),
    _m("train_loss_mean", None, "", ".4f", "training", "mean training loss over the run"),
    _m("train_steps", None, "steps", ".0f", "training", "optimizer steps taken"),
    _m("train_runtime_s", None, "s", ".1f", "training", "training wall time"),
    _m("train_peak_rss_mb", "lower", "MB", ".0f", "training", "peak resident memory of the training process"),
    _m("train_peak_cuda_mb", "lower", "MB", ".0f", "training", "peak CUDA memory of training"),
    _m("train_tokens", None, "tokens", ".0f", "training", "input tokens seen by training"),
    _m("train_tokens_per_s", "higher", "tokens/s", ".1f", "training", "training throughput"),
    _m("trainable_params", None, "", ".0f", "training", "parameters that training updated"),
    _m("best_step", None, "steps", ".0f", "training", "the step whose checkpoint was kept (early stopping)"),
    _m("best_eval_loss", "lower", "", ".4f", "training", "validation loss of the kept checkpoint"),
    _m("stopped_early", None, "", ".0f", "training", "1 when early stopping ended training"),
    _m("estimate_train_time_s", None, "s", ".0f", "training", "training time estimated before the run"),
    _m("estimate_peak_rss_mb", None, "MB", ".0f", "training", "peak memory estimated before the run"),
    _m("estimate_train_steps", None, "steps", ".0f", "training", "steps estimated before the run"),
    _m("estimate_train_tokens", None, "tokens", ".0f", "training", "tokens estimated before the run"),
    _m("train_time_vs_estimate", None, "x", ".2f", "training", "measured training time over its estimate"),
    _m("peak_rss_vs_estimate", None, "x", ".2f", "training", "measured peak memory over its estimate"),
    _m("merge_runtime_s", None, "s", ".1f", "training", "merge wall time"),
    # health of a training run (tasks/health.py)
    _m("health_warnings", "lower", "", ".0f", "health", "training-health checks that warned"),
    _m("health_not_judged", None, "", ".0f", "health", "training-health checks with too little to judge"),
    # preference training
    _m("preference_accuracy", "higher", "", ".3f", "preference", "held-out pairs where chosen outscores rejected"),
    _m("preference_accuracy_start", None, "", ".3f", "preference", "the same, of the model the stage started from"),
    _m("preference_margin", "higher", "nats", ".3f", "preference", "mean log-likelihood margin chosen - rejected"),
    _m("reward_accuracy", "higher", "", ".3f", "preference", "pairs where DPO's implicit reward prefers chosen"),
    _m("reward_margin", "higher", "", ".3f", "preference", "mean implicit reward margin chosen - rejected"),
    # the judge (tasks/judge.py)
    _m("judge_win_rate", "higher", "", ".3f", "judge", "judged wins against the first parent (ties count half)"),
    _m("judge_agreement", None, "", ".3f", "judge", "pairs where both answer orders gave the same verdict"),
    _m("judge_wins", None, "", ".0f", "judge", "pairs judged won"),
    _m("judge_losses", None, "", ".0f", "judge", "pairs judged lost"),
    _m("judge_ties", None, "", ".0f", "judge", "pairs judged tied"),
    _m("judge_pairs", None, "", ".0f", "judge", "pairs judged"),
    # distillation: teacher, start and student measured on the held-out teacher answers (tasks/distill.py)
    _m("distill_train_answers", None, "answers", ".0f", "distill", "teacher answers the student learned"),
    _m("distill_heldout_answers", None, "answers", ".0f", "distill", "teacher answers held out"),
    *[_m(f"distill_perplexity_{side}", "lower", "", ".3f", "distill",
         f"perplexity of the held-out teacher answers under the {side}") for side in ("teacher", "start", "student")],
    *[_m(f"distill_bits_per_byte_{side}", "lower", "bits/byte", ".3f", "distill",
         f"bits per byte of the held-out teacher answers under the {side}") for side in ("teacher", "start", "student")],
    *[_m(f"distill_ttft_ms_{side}", "lower", "ms", ".0f", "distill", f"time to first token of the {side}")
      for side in ("teacher", "student")],
    *[_m(f"distill_tokens_per_s_{side}", "higher", "tokens/s", ".1f", "distill", f"decode speed of the {side}")
      for side in ("teacher", "student")],
    *[_m(f"distill_params_{side}", None, "", ".0f", "distill", f"parameters of the {side}")
      for side in ("teacher", "student")],
    _m("distill_prompt_tokens_teacher", None, "tokens", ".0f", "distill", "prompt tokens per request, teacher"),
    _m("distill_prompt_tokens_student", None, "tokens", ".0f", "distill", "prompt tokens per request, student"),
    _m("distill_prompt_tokens_saved", "higher", "tokens", ".0f", "distill", "prompt tokens the student saves"),
    _m("distill_ttft_reduction", "higher", "", ".1%", "distill", "time to first token the student saves"),
    _m("distill_perplexity_reduction", "higher", "", ".1%", "distill", "student perplexity below its start's"),
    _m("distill_gap_closed", "higher", "", ".1%", "distill", "share of the start-to-teacher perplexity gap closed"),
    _m("distill_speedup", "higher", "x", ".2f", "distill", "student decode speed over the teacher's"),
]
CATALOGUE: dict[str, Metric] = {}


def register(metric: Metric) -> Metric:
    """Add a metric to the catalogue (a name is declared once)."""
    if metric.name in CATALOGUE and CATALOGUE[metric.name] != metric:
        raise ValueError(f"metric {metric.name!r} is declared twice")
    CATALOGUE[metric.name] = metric
    return metric


for _entry in ENTRIES:
    register(_entry)

EXPORT_PREFIX = "gguf_"  # the same metric measured on the exported GGUF


def lookup(name: str) -> Metric | None:
    """The entry a recorded metric name goes by (see the module docstring), or None for an undeclared one."""
    family = name.split("/")[0]
    found = CATALOGUE.get(family)
    if found is None and family.startswith(EXPORT_PREFIX):
        found = CATALOGUE.get(family[len(EXPORT_PREFIX):])
    return found


def better(name: str) -> str | None:
    """"lower", "higher" or None (no direction, or not declared)."""
    found = lookup(name)
    return found.better if found else None


def is_better(name: str, change: float | None) -> bool | None:
    """Whether a change of the metric is an improvement; None when it has no direction or nothing changed."""
    way = better(name)
    if not change or way is None:
        return None
    return change < 0 if way == "lower" else change > 0


def group(name: str) -> list[Metric]:
    """A group's metrics in catalogue order."""
    return [m for m in CATALOGUE.values() if m.group == name]


def headline() -> tuple[str, ...]:
    """The columns of every table of many versions (run summary, `tunery models`, the dashboard's tables)."""
    return tuple(m.name for m in group("headline"))


def label(name: str) -> str:
    found = CATALOGUE.get(name)
    return found.title if found else name


def fmt(name: str, value: Any) -> str:
    found = lookup(name)
    if found is None:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)
    return found.format(value)


def check_rankable(name: str, where: str) -> str:
    """A metric that can pick a best version: declared with a direction. Returns it; ValueError names `where`."""
    if better(name) is None:
        ranked = ", ".join(m.name for m in CATALOGUE.values() if m.better and m.group in ("headline", "answers"))
        raise ValueError(f"{where}: {name!r} has no better direction in the metric catalogue (core/metrics.py); "
                         f"for example {ranked}")
    return name


def best(items: Iterable[Any], name: str, value=lambda item, name: item.metrics.get(name)) -> Any | None:
    """The item with the best value of metric `name` by its direction (first on ties); None when none has one."""
    scored = [(value(item, name), item) for item in items]
    scored = [(v, item) for v, item in scored if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not scored:
        return None
    pick = min if better(name) == "lower" else max
    return pick(scored, key=lambda pair: pair[0])[1]
