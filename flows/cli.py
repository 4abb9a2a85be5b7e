"""The `tunery` command. Errors a user can fix print one line to stderr and exit 1, without a traceback."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from tasks.common import TuneryError, home

# Stdout carries a command's own output only (one JSON document with --json); whatever libraries print while a
# command runs (trainer log lines, progress) goes to stderr.
STDOUT = sys.stdout
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Retrain small language models on a schedule and keep every result comparable.")
# Piped output gets a wide console so version names are not cut; a terminal uses its own width.
out = Console(file=STDOUT, width=None if STDOUT.isatty() else 160)
err = Console(stderr=True)

JsonOpt = typer.Option(False, "--json", help="Print one JSON document to stdout.")


def _prefect_env() -> None:
    """Keep Prefect's state with tunery's unless the user points Prefect elsewhere; no telemetry."""
    os.environ.setdefault("PREFECT_HOME", str(home() / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def command(fn: Callable | None = None, *, name: str | None = None) -> Callable:
    """Register a CLI command whose TuneryError becomes a one-line message and exit status 1."""
    if fn is None:
        return functools.partial(command, name=name)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with contextlib.redirect_stdout(sys.stderr):
                return fn(*args, **kwargs)
        except TuneryError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return app.command(name=name)(wrapper)


def _print_json(obj: Any) -> None:
    STDOUT.write(json.dumps(obj, indent=2, default=str) + "\n")
    STDOUT.flush()


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"
    return str(value)


# ---------------------------------------------------------------- pipeline and stages


@command
def run(config: Path = typer.Argument(None, help="Pipeline YAML; default: configs/demo.yaml."),
        as_json: bool = JsonOpt) -> None:
    """Run the whole pipeline flow (prep, base eval, sft, eval) described by a YAML config."""
    from flows.config import DEMO_CONFIG, load_config

    config = config or DEMO_CONFIG
    cfg, _ = load_config(config)  # fail on a bad config before Prefect starts
    _prefect_env()
    from flows.pipeline import SUMMARY_METRICS, pipeline

    result = pipeline.with_options(flow_run_name=f"{cfg.name}")(str(config))
    if as_json:
        _print_json(result)
        return
    table = Table(title=f"{cfg.name}: base vs fine-tuned (held-out data {result['data_hash'][:12]})")
    columns = ("version", "stage", *SUMMARY_METRICS)
    for col in columns:
        table.add_column(col, justify="left" if col in ("version", "stage") else "right")
    for row in result["rows"]:
        table.add_row(*(_fmt(row[c]) for c in columns))
    out.print(table)
    base, tuned = result["rows"]
    change = (tuned["perplexity"] - base["perplexity"]) / base["perplexity"]
    out.print(f"held-out perplexity {base['perplexity']:.2f} -> {tuned['perplexity']:.2f} ({change:+.1%})")


def _base_and_data(config: Path):
    """Load a config, resolve (and register) its base model, prepare its data: what every single stage needs."""
    from flows import steps
    from flows.config import load_config

    cfg, config_dir = load_config(config)
    base = steps.run_base(cfg, config_dir)
    return cfg, base, steps.run_prep(cfg, config_dir, base["artifact_path"])


@command
def prep(config: Path = typer.Argument(..., help="Pipeline YAML whose `data` section to prepare."),
         as_json: bool = JsonOpt) -> None:
    """Validate, normalise, de-duplicate and split the config's data; print where it was written."""
    _, _, result = _base_and_data(config)
    if as_json:
        _print_json({"path": result.artifact_path, **result.info})
    else:
        info = result.info
        out.print(f"prepared {info['train_rows']} train / {info['validation_rows']} validation {info['kind']} "
                  f"examples ({info['duplicates_removed']} duplicates removed) -> {result.artifact_path}")


@command
def sft(config: Path = typer.Argument(..., help="Pipeline YAML (its data, base_model and sft sections)."),
        as_json: bool = JsonOpt) -> None:
    """Fine-tune the config's base model on its data and register the new version (no evaluation)."""
    from flows import steps

    cfg, base, data = _base_and_data(config)
    version = steps.run_sft(cfg, base, data)
    if as_json:
        _print_json(version)
    else:
        out.print(f"registered {version['version']} -> {version['artifact_path']}")


@command(name="eval")
def eval_command(version: str = typer.Argument(..., help="NAME:N or NAME (its newest ready version)."),
                 config: Path = typer.Option(..., "--config", "-c", help="Pipeline YAML whose data and eval "
                                                                         "settings to use."),
                 as_json: bool = JsonOpt) -> None:
    """Measure a registered version on the config's held-out data and record the metrics."""
    import registry
    from flows import steps

    v = registry.get_version(version)
    cfg, _, data = _base_and_data(config)
    metrics = steps.run_eval(v, data, cfg.eval_config())
    if as_json:
        _print_json({"version": v["version"], "metrics": metrics})
    else:
        for k, val in metrics.items():
            out.print(f"{k:>14}  {_fmt(val)}")


# ---------------------------------------------------------------- registry views


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
    for col in ("version", "stage", "status", "parents", "perplexity", "tokens_per_s", "ttft_ms", "peak_rss_mb",
                "created_at"):
        table.add_column(col)
    for v in versions:
        m = v["metrics"]
        table.add_row(v["version"], v["stage"], v["status"], ", ".join(v["parents"]) or "-",
                      *(_fmt(m.get(k)) for k in ("perplexity", "tokens_per_s", "ttft_ms", "peak_rss_mb")),
                      v["created_at"][:19])
    out.print(table if versions else "no versions registered yet; try `tunery run`")


@command
def show(version: str = typer.Argument(..., help="NAME:N or NAME."), as_json: bool = JsonOpt) -> None:
    """Everything recorded about one version: lineage, hyperparameters, data, metrics."""
    import registry

    v = registry.get_version(version)
    if as_json:
        _print_json(v)
        return
    for key in ("version", "stage", "status", "parents", "base_model", "data_hash", "artifact_path", "created_at",
                "error"):
        if v.get(key) not in (None, [], ""):
            out.print(f"[bold]{key:>14}[/]  {', '.join(v[key]) if isinstance(v[key], list) else v[key]}",
                      highlight=False)
    if v["hyperparameters"]:
        out.print("[bold]hyperparameters[/]")
        out.print_json(json.dumps(v["hyperparameters"]))
    if v["metrics"]:
        out.print("[bold]metrics[/]")
        for k, val in sorted(v["metrics"].items()):
            out.print(f"{k:>22}  {_fmt(val)}")


@command
def compare(a: str = typer.Argument(..., help="The version before (NAME:N)."),
            b: str = typer.Argument(..., help="The version after (NAME:N)."), as_json: bool = JsonOpt) -> None:
    """Metrics of two versions side by side, with the change from the first to the second."""
    import registry

    result = registry.compare_versions(a, b)
    if as_json:
        _print_json(result)
        return
    table = Table(title=f"{result['a']} -> {result['b']}")
    for col in ("metric", result["a"], result["b"], "change", "relative"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for row in result["metrics"]:
        colour = {True: "green", False: "red"}.get(row["better"], "")
        rel = f"{row['relative_change']:+.1%}" if row["relative_change"] is not None else "-"
        table.add_row(row["metric"], _fmt(row["a"]), _fmt(row["b"]),
                      f"[{colour}]{_fmt(row['change'])}[/]" if colour else _fmt(row["change"]), rel)
    out.print(table)
    for row in result["hyperparameters"]:
        out.print(f"  {row['hyperparameter']}: {row['a']} -> {row['b']}")


@command
def setup() -> None:
    """Prepare the default base model (download and convert once); safe to re-run."""
    from tasks.models import ensure_default_base_model

    out.print(f"default base model: {ensure_default_base_model()}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
