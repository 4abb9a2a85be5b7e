"""How the CLI draws a version's report, a distilled version's table, export checks and a promotion."""
from __future__ import annotations

import json
from typing import Any

from rich.table import Table

from core import metrics as metric_catalogue
from flows import report
from flows.cli.app import out
from flows.report import check_rows
from flows.report import fmt as _fmt


def _print_distill(version) -> None:
    """A distilled version's closing table (the report's distillation section): what the teacher's prompt cost, what
    the student kept."""
    found = report.section(report.version_report(version), "distill")
    if found is None:
        return
    m, without = version.metrics, " without" if version.stage == "distill-prompt" else ""
    table = Table(title=f"{version.version} ({version.stage}), {found.caption}")
    for col in ("", f"teacher {version.teacher}" + (" with its prompt" if without else ""),
                f"start {version.parents[0]}{without}", f"student {version.version}{without}",
                "student vs teacher"):
        table.add_column(col, justify="left" if not col else "right")
    for r in found.rows:
        table.add_row(r["measure"], _fmt(r["teacher"]), _fmt(r["start"]), _fmt(r["student"]), r["change"])
    out.print(table)
    out.print(f"the student's perplexity is {m['distill_perplexity_reduction']:.0%} lower than its start's, "
              f"{m['distill_gap_closed']:.0%} of the way from its start to the teacher")




def _print_checks(export) -> None:
    table = Table(title=f"{export.export_id}: {export.gguf_file} ({export.size_bytes / 2**20:.1f} MiB)")
    for col in ("check", "file", "passed", "value", "detail"):
        table.add_column(col, justify="right" if col == "value" else "left")
    for row in check_rows(export):
        table.add_row(*row.values())
    out.print(table)
    _print_answers(export)


def _print_answers(export) -> None:
    for sample in export.info.get("answers", []):
        out.print(f"  llama.cpp, through the Modelfile: [bold]{sample['prompt']}[/bold] {sample['answer']}")


def _print_promotion(result: dict[str, Any]) -> None:
    out.print(report.promotion_summary(result))
    if result["promoted"]:
        out.print(f"{result['alias']} -> {result['version']}: {result['path']} ({result['ollama']})")




def _print_report(sections: list[report.Section]) -> None:
    """The version report in the terminal: fields aligned, metrics by group, verdicts coloured."""
    colours = {"ok": "green", "warning": "yellow", "not judged": "dim"}
    for s in sections:
        if s.key != "record":
            out.print(f"[bold]{s.title}[/]" + (f" ({s.caption})" if s.caption else ""), highlight=False)
        if s.kind == "fields":
            for row in s.rows:
                if row["value"]:
                    out.print(f"[bold]{row['field']:>14}[/]  {row['value']}", highlight=False)
        elif s.kind == "json":
            out.print_json(json.dumps(s.data))
        elif s.kind == "metrics":
            for row in s.rows:
                out.print(f"{row['metric']:>22}  {metric_catalogue.fmt(row['metric'], row['value'])}  "
                          f"[dim]{row['group']}[/]", highlight=False)
        elif s.kind == "verdicts":
            for row in s.rows:
                out.print(f"{row['check']:>22}  [{colours[row['state']]}]{row['verdict']}[/]  {row['detail']}",
                          highlight=False)
        elif s.kind == "lines":
            for row in s.rows:
                out.print(f"  {row['text']}", highlight=False)
        elif s.key == "samples":
            for sample in s.rows:
                out.print(f"  [bold]Q:[/] {sample['prompt']}\n  [bold]A:[/] {sample['answer']}", highlight=False)
        else:
            table = Table(show_header=True)
            for col in s.rows[0]:
                table.add_column(col)
            for row in s.rows:
                table.add_row(*(report.cell(k, v) for k, v in row.items()))
            out.print(table)
