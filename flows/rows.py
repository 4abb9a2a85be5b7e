"""What a version's record turns into when shown: rows of health verdicts and of export checks, and how a value is
written. The CLI, the Prefect artifacts and the dashboard render these rows, each in its own medium."""
from __future__ import annotations

from typing import Any

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
