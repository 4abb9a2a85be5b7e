"""`tunery models`, `show`, `lineage`, `compare` and `registry copy`: reading the registry."""
from __future__ import annotations

from typing import Any, Optional

import typer
from rich.table import Table

from core import metrics as metric_catalogue
from flows import report
from flows.cli.app import JsonOpt, _print_json, command, out, registry_app
from flows.cli.render import _print_report
from flows.report import comparison_rows

# ---------------------------------------------------------------- registry views


@command(name="copy", group=registry_app)
def registry_copy(to: str = typer.Option(..., "--to", help="The empty registry to copy into: "
                                         "postgresql://USER@HOST:PORT/DB or duckdb:///PATH/registry.duckdb."),
                  as_json: bool = JsonOpt) -> None:
    """Copy this registry (TUNERY_REGISTRY_URL, else TUNERY_HOME's DuckDB file) to another backend: every table,
    ids and version numbers kept, then every row compared."""
    from registry.transfer import copy_registry

    report = copy_registry(to)
    if as_json:
        _print_json(report)
        return
    rows = ", ".join(f"{t} {n}" for t, n in report["tables"].items() if n)
    out.print(f"copied {report['from']} -> {report['to']}: {report['versions']} versions ({rows}); "
              f"checked {report['checked']}")


@command
def models(name: Optional[str] = typer.Option(None, help="Only versions of this model name."),
           as_json: bool = JsonOpt) -> None:
    """List every registered version with its key metrics."""
    import registry

    versions = registry.list_versions(name=name)
    if as_json:
        _print_json(versions)
        return
    table = Table()
    headline = metric_catalogue.headline()
    for col in ("version", "stage", "status", "parents", *map(metric_catalogue.label, headline), "created_at"):
        table.add_column(col)
    for v in versions:
        table.add_row(v.version, v.stage, v.status, ", ".join(v.parents) or "-",
                      *(metric_catalogue.fmt(k, v.metrics.get(k)) for k in headline), v.created_at[:19])
    out.print(table if versions else "no versions registered yet; try `tunery run`")


@command
def show(version: str = typer.Argument(..., help="NAME:N or NAME."), as_json: bool = JsonOpt) -> None:
    """Everything recorded about one version: lineage, hyperparameters, data, metrics, exports and aliases."""
    import registry
    from registry import exports as export_store

    v = registry.get_version(version)
    found = export_store.of_version(v)
    if as_json:
        _print_json({**v.json(), "aliases": found["aliases"],
                     "exports": [{k: e.json()[k] for k in ("export_id", "quant", "path", "gguf_file", "size_bytes",
                                                           "passed", "checks")} for e in found["exports"]],
                     "promotions": [{k: p.json()[k] for k in ("action", "alias", "version", "previous_version",
                                                              "export_id", "gate", "ollama", "recorded_at")}
                                    for p in found["promotions"]]})
        return
    _print_report(report.version_report(v, {**found, "children": registry.children(v.version)}))




@command
def lineage(version: str = typer.Argument(..., help="NAME:N or NAME."), as_json: bool = JsonOpt) -> None:
    """The whole ancestry of a version: its parents, their parents, down to the base model."""
    from rich.tree import Tree

    import registry

    root = registry.lineage(version)
    if as_json:
        _print_json(root)
        return

    def label(node: dict[str, Any]) -> str:
        ppl = node["metrics"].get("perplexity")
        extra = f"  perplexity {ppl:.2f}" if ppl is not None else ""
        status = "" if node["status"] == "ready" else f"  [red]{node['status']}[/]"
        return f"[bold]{node['version']}[/]  {node['stage']}{extra}{status}"

    def grow(tree: Tree, node: dict[str, Any]) -> Tree:
        for parent in node["parents"]:
            grow(tree.add(label(parent)), parent)
        return tree

    out.print(grow(Tree(label(root)), root))


@command
def compare(a: str = typer.Argument(..., help="The version before (NAME:N)."),
            b: str = typer.Argument(..., help="The version after (NAME:N)."), as_json: bool = JsonOpt) -> None:
    """Every metric and hyperparameter of two versions side by side, with absolute and relative change."""
    import registry

    result = registry.compare_versions(a, b)
    if as_json:
        _print_json(result)
        return

    def table(kind: str) -> Table:
        t = Table(title=f"{kind}: {result['a']} -> {result['b']}")
        for col in (kind, result["a"], result["b"], "change", "relative"):
            t.add_column(col, justify="left" if col == kind else "right")
        for row in comparison_rows(result, kind):
            colour = {True: "green", False: "red"}.get(row["better"], "")
            change = f"[{colour}]{row['change']}[/]" if colour else row["change"]
            t.add_row(row[kind], row["a"], row["b"], change, row["relative"])
        return t

    if not result["eval_data"]["same"]:
        out.print(f"[yellow]{result['a']} and {result['b']} were never evaluated on the same data "
                  f"({(result['eval_data']['a'] or '-')[:12]} vs {(result['eval_data']['b'] or '-')[:12]}): their "
                  "evaluation metrics are shown without verdicts; `tunery eval` one on the other's config[/]",
                  highlight=False)
    out.print(table("metric"))
    if result["hyperparameters"]:
        out.print(table("hyperparameter"))
