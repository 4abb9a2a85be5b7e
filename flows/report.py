"""One account of a version, and the rows every medium shows: the terminal (`tunery show`, `tunery run`), the
Prefect artifacts and the dashboard each render what `version_report` builds; none composes its own.

A report is a list of `Section`s (record, lineage, hyperparameters, metrics by catalogue group, training, health,
distillation, samples, exports, promotions). A section holds rows of plain values; renderers format them, through
the metric catalogue for metric values.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from core import metrics as metric_catalogue
from registry.records import Export, Promotion, Version, columns

# A verdict's `ok`: True healthy, False a warning, None too little to judge.
STATES = {True: "ok", False: "warning", None: "not judged"}
RECORD_FIELDS = ("version", "stage", "status", "parents", "base_model", "data_hash", "artifact_path", "host",
                 "created_at", "error")
# Columns of a version shown elsewhere in its report (or only of use to the flow); any other column, a new one
# included, is shown with the record's fields.
SHOWN_ELSEWHERE = {"name", "number", "hyperparameters", "info", "flow_run_id", "finished_at", "fingerprint",
                   "adapter", "quantization", "teacher", "preference_pairs"}


@dataclass(frozen=True)
class Section:
    """One part of a report. `kind` says how to draw `rows`: fields ({field, value}), metrics ({group, metric,
    value}), table (any columns), lines ({text}), verdicts ({check, verdict, state, detail}), json (`data`)."""

    key: str
    title: str
    kind: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    caption: str = ""
    data: Any = None


fmt = metric_catalogue.plain  # a value with no catalogue format, as every table writes it


# ---------------------------------------------------------------- rows


def health_rows(info: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per training-health verdict of a version's info: check, verdict, state (ok / warning / not judged),
    detail."""
    return [{"check": check, "verdict": v["verdict"], "state": STATES[v["ok"]], "detail": v["detail"]}
            for check, v in info.get("health", {}).items()]


def check_rows(export: Export) -> list[dict[str, Any]]:
    """One row per llama.cpp check of an export: check, file, passed (yes / NO / - for a measurement), value,
    detail."""
    return [{"check": c.name, "file": c.file, "passed": "-" if c.passed is None else ("yes" if c.passed else "NO"),
             "value": fmt(c.value), "detail": c.detail} for c in export.checks]


def record_rows(v: Version) -> list[dict[str, str]]:
    """A version's own fields that are set, as {field, value} (lists joined)."""
    rows = []
    extra = [f for f, _, _ in columns(Version) if f not in RECORD_FIELDS and f not in SHOWN_ELSEWHERE]
    for key in (*RECORD_FIELDS, *extra):
        value = getattr(v, key)
        if value not in (None, [], ""):
            rows.append({"field": key, "value": ", ".join(value) if isinstance(value, list) else str(value)})
    return rows


def metric_rows(metrics: dict[str, float]) -> list[dict[str, Any]]:
    """Metrics as {group, metric, value}: by catalogue group and order, undeclared ones last (group "other")."""
    order = {name: i for i, name in enumerate(metric_catalogue.CATALOGUE)}
    groups = {g: i for i, g in enumerate(metric_catalogue.GROUPS)}
    entries = {k: metric_catalogue.lookup(k) for k in metrics}

    def place(name: str) -> tuple:
        entry = entries[name]
        return (groups[entry.group], order[entry.name], name) if entry else (len(groups), 0, name)

    return [{"group": entries[k].group if entries[k] else "other", "metric": k, "value": metrics[k]}
            for k in sorted(metrics, key=place)]


def export_rows(exports: list[Export]) -> list[dict[str, str]]:
    """One row per export: export id, file, size and the verdict of its checks."""
    rows = []
    for e in exports:
        failed = [c.name for c in e.checks if c.passed is False]
        rows.append({"export": e.export_id, "file": str(e.gguf), "size": f"{e.size_bytes / 2**20:.1f} MiB",
                     "checks": f"failed: {', '.join(failed)}" if failed else "all passed"})
    return rows


def promotion_rows(promotions: list[Promotion]) -> list[dict[str, str]]:
    """One row per promotion, refusal or rollback: when, alias (NAME@ALIAS), what happened, and the failed gate
    verdicts of a refusal."""
    rows = []
    for p in promotions:
        failed = [x["name"] for x in p.gate.get("verdicts", []) if not x["passed"]]
        what = {"promote": f"{p.version} promoted", "refused": f"{p.version} refused",
                "rollback": f"rolled back to {p.version}"}[p.action]
        if p.previous_version:
            what += f" (was {p.previous_version})"
        rows.append({"when": p.recorded_at[:19], "alias": f"{p.name}@{p.alias}", "what": what,
                     "failed": ", ".join(failed)})
    return rows


def comparison_rows(result: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    """registry.compare_versions' metrics (kind "metric") or hyperparameters ("hyperparameter") as written rows:
    {kind, a, b, change, relative, better}; `better` True / False / None colours the change."""
    rows = []
    for row in result["metrics" if kind == "metric" else "hyperparameters"]:
        change = fmt(row["change"])
        if row["change"] is None and row.get("changed"):
            change = "changed"
        rows.append({kind: row[kind], "a": fmt(row["a"]), "b": fmt(row["b"]), "change": change,
                     "relative": f"{row['relative_change']:+.1%}" if row["relative_change"] is not None else "-",
                     "better": row.get("better")})
    return rows


def teacher_label(info: dict[str, Any]) -> str:
    """How the teacher answered, in words: `hf`, or `llama.cpp on NAME/TAG (passed)` or `(failed: CHECKS)`."""
    if info.get("teacher_export"):
        return f"llama.cpp on {info['teacher_export']} ({info['teacher_gguf_checks']})"
    return info.get("teacher_backend", "hf") + (f"; skipped {info['teacher_export_skipped']}" if info.get(
        "teacher_export_skipped") else "")


def distill_rows(metrics: dict[str, float]) -> list[dict[str, Any]]:
    """A distilled version's measurements as rows (measure, teacher, start, student, change). Empty for a version
    that was not distilled."""
    m = metrics
    if "distill_perplexity_student" not in m:
        return []

    def row(measure: str, teacher: float | None, start: float | None, student: float | None, change: str) -> dict:
        return {"measure": measure, "teacher": teacher, "start": start, "student": student, "change": change}

    rows = []
    if "distill_prompt_tokens_saved" in m:
        rows.append(row("prompt tokens per request", m["distill_prompt_tokens_teacher"], None,
                        m["distill_prompt_tokens_student"], f"-{m['distill_prompt_tokens_saved']:.0f}"))
    rows.append(row("time to first token (ms)", m["distill_ttft_ms_teacher"], None, m["distill_ttft_ms_student"],
                    f"{-m['distill_ttft_reduction']:+.0%}"))
    if "distill_tokens_per_s_teacher" in m:
        rows.append(row("decode tokens/s", m["distill_tokens_per_s_teacher"], None, m["distill_tokens_per_s_student"],
                        f"x{m['distill_speedup']:.2f}"))
        rows.append(row("parameters (M)", m["distill_params_teacher"] / 1e6, None, m["distill_params_student"] / 1e6,
                        f"x{m['distill_params_student'] / m['distill_params_teacher']:.2f}"))
    gap = m["distill_perplexity_student"] / m["distill_perplexity_teacher"] - 1
    rows.append(row("perplexity of held-out teacher answers", m["distill_perplexity_teacher"],
                    m["distill_perplexity_start"], m["distill_perplexity_student"], f"{gap:+.0%}"))
    return rows


def training_lines(v: Version) -> list[str]:
    """What training did, in sentences: loss, steps, time and memory, early stopping, spectrum, mergekit."""
    m, info, lines = v.metrics, v.info, []
    if "train_loss" in m:
        lines.append(f"loss {m['train_loss_first']:.3f} -> {m['train_loss']:.3f} in {m['train_steps']:.0f} steps, "
                     f"{m['train_runtime_s']:.0f} s, peak RSS {m['train_peak_rss_mb']:.0f} MB")
    if "best_step" in m:
        stopped = "stopped early" if m.get("stopped_early") else "ran to the end"
        lines.append(f"early stopping: the version is step {m['best_step']:.0f}'s weights (best validation loss "
                     f"{m['best_eval_loss']:.4g}); training {stopped} at step {m.get('train_steps', float('nan')):.0f}")
    if "spectrum" in info:
        lines.append(f"spectrum trained {len(info['spectrum']['selected'])} of {len(info['spectrum']['scores'])} "
                     "matrices")
    if "mergekit_config" in info:
        lines.append(f"mergekit: `{info['mergekit_config']}`")
    return lines


# ---------------------------------------------------------------- the report


def version_report(v: Version, around: dict[str, Any] | None = None) -> list[Section]:
    """Everything recorded about a version, in the order every medium shows it. `around` (children, exports,
    aliases, promotions: `registry.exports.of_version` plus `children`) adds lineage and export sections."""
    sections = [Section("record", v.version, "fields", record_rows(v))]
    if around is not None:
        sections.append(Section("lineage", "lineage", "fields", [
            {"field": "parents", "value": ", ".join(v.parents)}, {"field": "children",
                                                                  "value": ", ".join(around.get("children", []))},
            {"field": "aliases", "value": ", ".join(around.get("aliases", []))}]))
    if v.hyperparameters:
        sections.append(Section("hyperparameters", "hyperparameters", "json", data=v.hyperparameters))
    if v.metrics:
        where = f"evaluated on data {v.eval_data_hash[:12]}" if v.eval_data_hash else ""
        sections.append(Section("metrics", "metrics", "metrics", metric_rows(v.metrics), where))
    for data, measured in v.metrics_on_other_data.items():
        sections.append(Section(f"metrics:{data}", "metrics on other data", "metrics", metric_rows(measured),
                                f"evaluated on data {data[:12]}; not used by compare, best-version or the gate"))
    if lines := training_lines(v):
        sections.append(Section("training", "training", "lines", [{"text": line} for line in lines]))
    if health := health_rows(v.info):
        sections.append(Section("health", "training health", "verdicts", health))
    if distilled := distill_rows(v.metrics):
        without = ": the teacher with its long system prompt, start and student without" if \
            v.stage == "distill-prompt" else ""
        sections.append(Section("distill", "distillation", "table", distilled,
                                f"teacher {v.teacher} ({teacher_label(v.info)}), start {v.parents[0]}; measured on "
                                f"{v.metrics['distill_heldout_answers']:.0f} held-out teacher answers{without}"))
    if v.samples:
        sections.append(Section("samples", "sample answers", "table", list(v.samples)))
    if around is not None:
        if around.get("exports"):
            sections.append(Section("exports", "exports", "table", export_rows(around["exports"])))
        if around.get("promotions"):
            sections.append(Section("promotions", "promotions", "table", promotion_rows(around["promotions"])))
    return sections


def section(report: list[Section], key: str) -> Section | None:
    return next((s for s in report if s.key == key), None)


# ---------------------------------------------------------------- markdown (Prefect artifacts)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows as a markdown table (Prefect artifacts)."""
    if not rows:
        return ""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def cell(key: str, value: Any) -> str:
    return metric_catalogue.fmt(key, value) if isinstance(value, float) else fmt(value)


def markdown(report: list[Section]) -> str:
    """A report as markdown: a heading per section, tables for rows."""
    out = []
    for s in report:
        out.append(f"### {s.title}\n" + (f"\n{s.caption}\n" if s.caption else ""))
        if s.kind == "json":
            out.append("```json\n" + json.dumps(s.data, indent=2) + "\n```\n")
        elif s.kind == "lines":
            out.append("\n".join(f"- {r['text']}" for r in s.rows) + "\n")
        elif s.kind == "verdicts":
            out.append("\n".join(f"- {r['check']}: **{r['verdict']}** ({r['detail']})" for r in s.rows) + "\n")
        elif s.kind == "metrics":
            out.append(markdown_table([{"group": r["group"], "metric": r["metric"],
                                        "value": metric_catalogue.fmt(r["metric"], r["value"])} for r in s.rows]))
        else:
            out.append(markdown_table([{k: cell(k, v) for k, v in r.items()} for r in s.rows]))
    return "\n".join(out)


# ---------------------------------------------------------------- promotions


def promotion_summary(result: dict[str, Any]) -> str:
    """A promotion's gate decision in a few lines, for the terminal, the Prefect artifact and the dashboard."""
    lines = [f"{'PROMOTED' if result['promoted'] else 'REFUSED'} {result['version']} -> {result['alias']}"]
    for v in result["gate"]:
        value = v["value"] if not isinstance(v["value"], float) else f"{v['value']:.4g}"
        threshold = v["threshold"] if not isinstance(v["threshold"], float) else f"{v['threshold']:.4g}"
        lines.append(f"  {'ok  ' if v['passed'] else 'FAIL'} {v['name']}: {value} (needs {threshold}) {v['detail']}")
    return "\n".join(lines)
