"""What a version's record turns into when shown: its fields, metrics, health verdicts, exports and their checks,
promotions and a comparison of two versions, as rows, and how a value is written. The CLI, the Prefect artifacts and
the dashboard render these rows, each in its own medium."""
from __future__ import annotations

from typing import Any

from registry.records import Version

# A verdict's `ok`: True healthy, False a warning, None too little to judge.
STATES = {True: "ok", False: "warning", None: "not judged"}


def fmt(value: Any) -> str:
    """A number as the tables write it: 4 significant digits, large ones whole; None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"
    return str(value)


def health_rows(info: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per training-health verdict of a version's info: check, verdict, state (ok / warning / not judged),
    detail."""
    return [{"check": check, "verdict": v["verdict"], "state": STATES[v["ok"]], "detail": v["detail"]}
            for check, v in info.get("health", {}).items()]


def check_rows(export: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per llama.cpp check of an export: check, file, passed (yes / NO / - for a measurement), value,
    detail."""
    return [{"check": c["name"], "file": c["file"],
             "passed": "-" if c["passed"] is None else ("yes" if c["passed"] else "NO"), "value": fmt(c["value"]),
             "detail": c["detail"]} for c in export["checks"]]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows as a markdown table (Prefect artifacts)."""
    if not rows:
        return ""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


RECORD_FIELDS = ("version", "stage", "status", "parents", "base_model", "data_hash", "artifact_path", "host",
                 "created_at", "error")


def record_rows(v: Version) -> list[dict[str, str]]:
    """A version's own fields that are set, as {field, value} (lists joined)."""
    rows = []
    for key in RECORD_FIELDS:
        value = getattr(v, key)
        if value not in (None, [], ""):
            rows.append({"field": key, "value": ", ".join(value) if isinstance(value, list) else str(value)})
    return rows


def metric_rows(metrics: dict[str, float]) -> list[dict[str, Any]]:
    """Metrics by name: {metric, value}."""
    return [{"metric": k, "value": metrics[k]} for k in sorted(metrics)]


def export_rows(exports: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One row per export: export id, file, size and the verdict of its checks."""
    rows = []
    for e in exports:
        failed = [c["name"] for c in e["checks"] if c["passed"] is False]
        rows.append({"export": e["export_id"], "file": f"{e['path']}/{e['gguf_file']}",
                     "size": f"{e['size_bytes'] / 2**20:.1f} MiB",
                     "checks": f"failed: {', '.join(failed)}" if failed else "all passed"})
    return rows


def promotion_rows(promotions: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One row per promotion, refusal or rollback: when, alias (NAME@ALIAS), what happened, and the failed gate
    verdicts of a refusal."""
    rows = []
    for p in promotions:
        failed = [x["name"] for x in p["gate"].get("verdicts", []) if not x["passed"]]
        what = {"promote": f"{p['version']} promoted", "refused": f"{p['version']} refused",
                "rollback": f"rolled back to {p['version']}"}[p["action"]]
        if p.get("previous_version"):
            what += f" (was {p['previous_version']})"
        rows.append({"when": p["recorded_at"][:19], "alias": f"{p['name']}@{p['alias']}", "what": what,
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
