"""The metric catalogue: every metric tunery records, declared once with its unit, better direction, format, group
and meaning, the way lm-evaluation-harness registers metrics with `higher_is_better`.

The entries are written once, in core/metrics.yaml. Everything that ranks, colours or tables a metric reads this
map: `tunery compare` (which change is better), the best version of a run and the best trial of a sweep (`metric:`
in the config), the CLI tables, the Prefect artifacts and the dashboard. Adding a metric is its computation plus
one line in core/metrics.yaml.

Two name forms inherit an entry: `NAME/PART` is NAME measured on one category of the data (`perplexity/support`),
and `gguf_NAME` is NAME measured on the exported GGUF through llama.cpp (`gguf_answer_f1`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml

GROUPS = ("headline", "quality", "answers", "general", "latency", "training", "health", "preference", "judge",
          "distill")
CATALOGUE_FILE = Path(__file__).with_name("metrics.yaml")
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
        """The value as tables write it, in its format; None or NaN as '-'."""
        if missing(value):
            return "-"
        return format(value, self.fmt) if isinstance(value, (int, float)) else str(value)


def missing(value: Any) -> bool:
    """No value to show or rank: None or NaN."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def plain(value: Any) -> str:
    """A value with no catalogue format: 4 significant digits, large numbers whole; None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"
    return str(value)


CATALOGUE: dict[str, Metric] = {}


def register(metric: Metric) -> Metric:
    """Add a metric to the catalogue (a name is declared once)."""
    if metric.name in CATALOGUE and CATALOGUE[metric.name] != metric:
        raise ValueError(f"metric {metric.name!r} is declared twice")
    CATALOGUE[metric.name] = metric
    return metric


def load(path: Path = CATALOGUE_FILE) -> list[Metric]:
    """The entries of a catalogue file (core/metrics.yaml): groups of `name: {better, fmt, unit, label, meaning}`."""
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [Metric(name, spec["better"], spec.get("unit", ""), spec["fmt"], group, spec["meaning"],
                   spec.get("label", "")) for group, entries in doc.items() for name, spec in entries.items()]


for _entry in load():
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
    """A metric's value in its catalogue format (an undeclared one plainly); None or NaN as '-'."""
    found = lookup(name)
    if found is not None:
        return found.format(value)
    return "-" if missing(value) else plain(value)


def check_rankable(name: str, where: str) -> str:
    """A metric that can pick a best version: declared with a direction. Returns it; ValueError names `where`."""
    if better(name) is None:
        ranked = ", ".join(m.name for m in CATALOGUE.values() if m.better and m.group in ("headline", "answers"))
        raise ValueError(f"{where}: {name!r} has no better direction in the metric catalogue (core/metrics.yaml); "
                         f"for example {ranked}")
    return name


def best(items: Iterable[Any], name: str, value=lambda item, name: item.metrics.get(name)) -> Any | None:
    """The item with the best value of metric `name` by its direction (first on ties); None when none has one."""
    scored = [(v, item) for item in items if not missing(v := value(item, name))]
    if not scored:
        return None
    pick = min if better(name) == "lower" else max
    return pick(scored, key=lambda pair: pair[0])[1]
