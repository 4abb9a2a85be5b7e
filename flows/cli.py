"""The `tunery` command. Errors a user can fix print one line to stderr and exit 1, without a traceback."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from core import metrics as metric_catalogue
from core.errors import TuneryError
from core.home import home
from flows import report
from flows.report import check_rows, comparison_rows
from flows.report import fmt as _fmt

# Stdout carries a command's own output only (one JSON document with --json); whatever libraries print while a
# command runs (trainer log lines, progress) goes to stderr.
STDOUT = sys.stdout
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Retrain small language models on a schedule and keep every result comparable.")
# Piped output gets a wide console so version names are not cut; a terminal uses its own width.
out = Console(file=STDOUT, width=None if STDOUT.isatty() else 160)
err = Console(stderr=True)

JsonOpt = typer.Option(False, "--json", help="Print one JSON document to stdout.")
registry_app = typer.Typer(no_args_is_help=True, help="The registry itself: copy it to another backend.")
app.add_typer(registry_app, name="registry")


def _prefect_env() -> None:
    """Keep Prefect's state with tunery's unless the user points Prefect elsewhere; no telemetry."""
    os.environ.setdefault("PREFECT_HOME", str(home() / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, like Ctrl-C's KeyboardInterrupt."""


def _terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def command(fn: Callable | None = None, *, name: str | None = None, group: typer.Typer | None = None) -> Callable:
    """Register a CLI command (of `group`, else top level) whose TuneryError becomes a one-line message and exit
    status 1."""
    if fn is None:
        return functools.partial(command, name=name, group=group)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # SIGTERM unwinds like Ctrl-C, so what the command started (Prefect's temporary server, a training child)
        # is stopped by its own clean-up and exit handlers instead of outliving it. Prefect's runner (`tunery
        # serve`) installs its own graceful handler over this one.
        signal.signal(signal.SIGTERM, _terminated)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                import registry

                if registry.db.exists():  # versions whose process was killed: settle them as failed first
                    for version in registry.settle_interrupted():
                        err.print(f"{version}: its process ended before it finished; marked failed (interrupted)")
                return fn(*args, **kwargs)
        except TuneryError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as e:
            err.print("terminated" if isinstance(e, Terminated) else "interrupted")
            raise typer.Exit(143 if isinstance(e, Terminated) else 130) from None

    return (group or app).command(name=name)(wrapper)


def _jsonable(obj: Any) -> Any:
    """json.dumps' fallback: a registry record (Version, Export, Alias, ...) as its JSON object, anything else as
    text."""
    return obj.json() if callable(getattr(obj, "json", None)) else str(obj)


def _print_json(obj: Any) -> None:
    STDOUT.write(json.dumps(obj, indent=2, default=_jsonable) + "\n")
    STDOUT.flush()


# ---------------------------------------------------------------- pipeline and stages


@command
def run(config: Path = typer.Argument(None, help="Pipeline YAML; default: configs/demo.yaml."),
        as_json: bool = JsonOpt) -> None:
    """Run the pipeline a YAML config describes: prep, base eval, then each stage (cpt/sft/dpo/merge) and its eval."""
    from flows.config import DEMO_CONFIG, load_config

    config = config or DEMO_CONFIG
    cfg, _ = load_config(config)  # fail on a bad config before Prefect starts
    _prefect_env()
    from flows.pipeline import pipeline

    result = pipeline(str(config))
    if as_json:
        _print_json(result)
        return
    table = Table(title=f"{cfg.name}: every version of this run (held-out data {result['data_hash'][:12]})")
    fields, headline = ("version", "stage", "parents", "this run"), metric_catalogue.headline()
    for col in fields:
        table.add_column(col)
    for name in headline:
        table.add_column(metric_catalogue.label(name), justify="right")
    for row in result["rows"]:
        table.add_row(*(_fmt(row[c]) for c in fields), *(metric_catalogue.fmt(k, row[k]) for k in headline))
    out.print(table)
    base, last = result["rows"][0], result["rows"][-1]
    change = (last["perplexity"] - base["perplexity"]) / base["perplexity"]
    out.print(f"perplexity of the data's held-out answers: {base['version']} {base['perplexity']:.2f} -> "
              f"{last['version']} {last['perplexity']:.2f} ({change:+.1%})")
    import registry

    for name in result["versions"][1:]:
        _print_distill(registry.get_version(name))
    if result.get("promotion"):
        _print_answers(result["promotion"]["export"])
        _print_promotion(result["promotion"])


@command
def sweep(config: Path = typer.Argument(..., help="Pipeline YAML whose settings the trials vary."),
          sets: list[str] = typer.Option([], "--set", help="KEY=V1,V2,...: try these values of a setting (e.g. "
                                         "stages[0].learning_rate=1e-4,3e-4); several --set make a grid. Without "
                                         "--set, the config's `sweep:` section is searched by Optuna."),
          pool: Optional[str] = typer.Option(None, help="Run each trial as a flow run on this Prefect work pool's "
                                                        "workers (default: in this process)."),
          parallel: Optional[int] = typer.Option(None, min=1, help="Trials started at once (default: the whole "
                                                                   "grid, or sweep.parallel)."),
          as_json: bool = JsonOpt) -> None:
    """A hyperparameter sweep: each trial a run of the config with some settings changed, a registry version and a
    row of the sweep; reports the best trial by the sweep's metric."""
    from flows.sweep import Plan

    plan = Plan(str(config), sets)  # every trial's settings are checked before Prefect starts
    err.print(f"{plan.trials} trials ({plan.method}) of {config}, {plan.direction} {plan.metric}")
    _prefect_env()
    from flows.sweep import sweep_flow

    result = sweep_flow(str(config), sets or None, pool, parallel)
    if as_json:
        _print_json(result)
        return
    keys = list(result["space"])
    table = Table(title=f"sweep {result['sweep_id']}: {result['metric']} ({result['direction']})")
    for col in ("trial", *keys, "version", result["metric"], "seconds", "status"):
        table.add_column(col)
    for t in result["trials"]:
        best = result["best"] and t["trial"] == result["best"]["trial"]
        table.add_row(str(t["trial"]) + (" *" if best else ""), *(_fmt(t["values"].get(k)) for k in keys),
                      t["version"] or "-", _fmt(t["value"]), _fmt(t["seconds"]),
                      t["status"] if t["status"] != "failed" else f"failed: {(t['error'] or '')[:60]}")
    out.print(table)
    if result["best"]:
        b = result["best"]
        out.print(f"best: trial {b['trial']} {b['values']} -> {b['version']} ({result['metric']} {b['value']:.4g}); "
                  f"the dashboard's Sweeps page plots every trial")
    else:
        err.print("no trial finished")
        raise typer.Exit(1)


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


def _base_and_data(config: Path):
    from flows.inputs import load_with_data

    return load_with_data(config)


@command
def prep(config: Path = typer.Argument(..., help="Pipeline YAML whose `data` section to prepare."),
         as_json: bool = JsonOpt) -> None:
    """Validate, normalise, de-duplicate and split the config's data; print where it was written."""
    _, _, _, result = _base_and_data(config)
    if as_json:
        _print_json({"path": result.artifact_path, **result.info})
    else:
        info = result.info
        out.print(f"prepared {info['train_rows']} train / {info['validation_rows']} validation {info['kind']} "
                  f"examples ({info['duplicates_removed']} duplicates removed) -> {result.artifact_path}")
        for part, found in info.get("contamination", {}).items():
            what = "held-out rows" if part == "heldout" else "general-suite items"
            out.print(f"contamination: {found['rows']} of {found['of']} {what} found in the training rows"
                      + "".join(f"\n  {e['row']} ~ {e['train']}: {e['kind']}, {e['detail']}"
                                for e in found["examples"][:5]))


def _single_stage(kind: str, config: Path, start: str | None, stage_id: str | None, sources: list[str],
                  as_json: bool) -> None:
    """Run one stage of a config on its own: the first of its kind, or the one with `stage_id`.

    It starts from `start`, else the stage's own `from` when that names a registered version, else the base.
    References to other stages of the config cannot be followed in a single-stage run and must be given here.
    """
    from flows.inputs import run_base, run_prep
    from flows.run import run_stage
    from flows.config import BASE_REF, load_config

    cfg, config_dir = load_config(config)
    indices = [i for i, s in enumerate(cfg.stages) if s.stage == kind and stage_id in (None, cfg.stage_id(i))]
    if not indices:
        which = f"with id {stage_id!r}" if stage_id else f"of kind {kind}"
        raise TuneryError(f"{config}: no {kind} stage {which} in `stages`")
    index = indices[0]
    stage = cfg.stages[index]
    stage_ids = {cfg.stage_id(i) for i in range(len(cfg.stages))}
    updates: dict[str, Any] = {}
    if start:
        updates["from_"] = start
    if sources:
        updates["sources"] = sources
    stage = stage.model_copy(update=updates)
    for ref in stage.references():
        if ref in stage_ids:
            raise TuneryError(f"stage {cfg.stage_id(index)!r} uses stage {ref!r} of this config; a single-stage run "
                              "needs registered versions instead (--from NAME:N, --source NAME:N)")
    cfg = cfg.model_copy(update={"stages": cfg.stages[:index] + [stage] + cfg.stages[index + 1:]})
    # The stage is checked first; only then is the base resolved and the top-level data prepared, if the stage
    # trains on it (a merge takes no data, a stage with its own `data` prepares that instead).
    base = run_base(cfg, config_dir)
    uses_top_level = stage.data_kind is not None and stage.data is None
    data = run_prep(cfg, config_dir, base.artifact_path) if uses_top_level else None
    version = run_stage(cfg, index, {BASE_REF: base}, base, data, config_dir)
    if as_json:
        _print_json(version)
    else:
        out.print(f"registered {version.version} ({kind}, parents {', '.join(version.parents)}) -> "
                  f"{version.artifact_path}")
        _print_distill(version)


ConfigArg = typer.Argument(..., help="Pipeline YAML holding the stage (and the base model and data).")
FromOpt = typer.Option(None, "--from", help="Version to start from (NAME:N); default: the stage's `from`, "
                                            "else the base model.")
StageOpt = typer.Option(None, "--stage", help="Id of the stage to run when the config has several of this kind.")


def _stage_command(kind: str, summary: str, takes_sources: bool) -> None:
    """Register `tunery KIND CONFIG [--from] [--stage] [--source ...] [--json]` for one kind of the catalogue."""
    if takes_sources:
        def run_one(config: Path = ConfigArg, start: Optional[str] = FromOpt, stage: Optional[str] = StageOpt,
                    source: list[str] = typer.Option([], "--source", help="A version to merge (repeat); replaces "
                                                                          "the stage's sources."),
                    as_json: bool = JsonOpt) -> None:
            _single_stage(kind, config, start, stage, source, as_json)
    else:
        def run_one(config: Path = ConfigArg, start: Optional[str] = FromOpt, stage: Optional[str] = StageOpt,
                    as_json: bool = JsonOpt) -> None:
            _single_stage(kind, config, start, stage, [], as_json)
    run_one.__doc__ = summary
    run_one.__name__ = kind.replace("-", "_")
    command(run_one, name=kind)


def _stage_commands() -> None:
    """One single-stage command per kind of the stage catalogue (tasks/catalogue.py)."""
    from tasks.catalogue import STAGES

    for kind, cls in STAGES.items():
        _stage_command(kind, cls.summary, "sources" in cls.model_fields)


_stage_commands()


@command(name="eval")
def eval_command(version: str = typer.Argument(..., help="NAME:N or NAME (its newest ready version)."),
                 config: Path = typer.Option(..., "--config", "-c", help="Pipeline YAML whose data and eval "
                                                                         "settings to use."),
                 as_json: bool = JsonOpt) -> None:
    """Measure a registered version on the config's held-out data and record the metrics."""
    import registry
    from flows.evaluate import run_eval

    v = registry.get_version(version)
    cfg, _, _, data = _base_and_data(config)
    metrics = run_eval(v, data, cfg.eval_config())
    if as_json:
        _print_json({"version": v.version, "metrics": metrics})
    else:
        for k, val in metrics.items():
            out.print(f"{k:>14}  {_fmt(val)}")


# ---------------------------------------------------------------- export, promote, rollback

QuantOpt = typer.Option(None, "--quant", help="f32, f16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0, ...; default: the "
                                              "config's export.quant (q4_k_m).")
ConfigOpt = typer.Option(None, "--config", "-c", help="Pipeline YAML whose data (held-out checks), eval prompts, "
                                                      "export and promote settings to use; default: the demo's.")


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


@command
def export(version: str = typer.Argument(..., help="NAME:N or NAME."), quant: Optional[str] = QuantOpt,
           config: Optional[Path] = ConfigOpt, as_json: bool = JsonOpt) -> None:
    """Write a version as GGUF + Modelfile under TUNERY_HOME/exports/NAME/vN-QUANT and check it with llama.cpp."""
    from flows.promotion import export_from_config

    result = export_from_config(version, config, quant, progress=err.print)
    if as_json:
        _print_json(result)
        return
    _print_checks(result)
    out.print(f"{result['path']} ({'all checks passed' if result['passed'] else 'SOME CHECKS FAILED'})")


@command
def promote(version: str = typer.Argument(..., help="NAME:N or NAME."),
            alias: Optional[str] = typer.Option(None, "--alias", help="Default: the config's promote.alias, "
                                                                       "else production."),
            quant: Optional[str] = QuantOpt, config: Optional[Path] = ConfigOpt, as_json: bool = JsonOpt) -> None:
    """Export, check and gate a version; on a pass move NAME@ALIAS to it (and `ollama create` where installed)."""
    from flows.promotion import promote_from_config, refused_message

    result = promote_from_config(version, config, alias, quant, progress=err.print)
    if as_json:
        _print_json(result)
    else:
        _print_checks(result["export"])
        _print_promotion(result)
    if not result["promoted"]:
        raise TuneryError(refused_message(result))


@command
def rollback(alias: str = typer.Argument(..., help="NAME@ALIAS, e.g. fern@production."),
             as_json: bool = JsonOpt) -> None:
    """Move NAME@ALIAS, its export folder link and Ollama's model back to the version it held before."""
    from flows.promotion import rollback as run_rollback

    result = run_rollback(alias)
    if as_json:
        _print_json(result)
        return
    out.print(f"{result['alias']}: {result['previous']} -> {result['version']} ({result['path']}; {result['ollama']})")


@command
def chat(target: str = typer.Argument(..., help="NAME:N, NAME (its newest ready version) or NAME@ALIAS."),
         system: Optional[str] = typer.Option(None, "--system", help="The system prompt; default: the Modelfile's "
                                                                    "SYSTEM, else none."),
         backend: str = typer.Option("auto", "--backend", help="gguf (the export, as Ollama serves it), hf "
                                                              "(transformers) or auto: gguf when there is an export "
                                                              "that passed its checks."),
         temperature: Optional[float] = typer.Option(None, "--temperature", min=0.0,
                                                     help="0 for greedy; default: the Modelfile's, else Ollama's 0.8."),
         seed: int = typer.Option(0, "--seed"),
         max_tokens: int = typer.Option(512, "--max-tokens", min=1, help="Most tokens per answer.")) -> None:
    """Talk with a version: answers stream as they are generated, each followed by its tokens/s. Lines starting
    /reset, /system TEXT and /quit control the conversation; end of input ends it."""
    import sys

    from flows.chat import Settings, converse, resolve

    if backend not in ("auto", "gguf", "hf"):
        raise TuneryError(f"--backend must be auto, gguf or hf, got {backend!r}")
    found = resolve(target, backend)
    interactive = sys.stdin.isatty()

    def read() -> str | None:
        try:
            return input("you> " if interactive else "")
        except EOFError:
            return None

    converse(found, Settings(system=system, temperature=temperature, seed=seed, max_tokens=max_tokens), read,
             STDOUT)


@command
def dashboard(host: str = typer.Option("127.0.0.1", help="Address to listen on; the default keeps it on this "
                                                         "machine. Use 0.0.0.0 only on a network you trust."),
              port: int = typer.Option(8501, help="Port to listen on.")) -> None:
    """Serve the Streamlit dashboard: versions, comparisons, quality vs speed, lineage, promote and roll back."""
    import registry

    app = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"
    err.print(f"tunery dashboard on http://{host}:{port} (registry {registry.db.describe()})")
    sys.stderr.flush()
    # This process becomes the Streamlit server (no child): SIGTERM or Ctrl-C stop the server itself, and nothing
    # is left holding the port.
    os.execv(sys.executable, [
        sys.executable, "-m", "streamlit", "run", str(app), "--server.address", host, "--server.port", str(port),
        "--server.headless", "true", "--browser.gatherUsageStats", "false", "--global.developmentMode", "false",
        "--client.toolbarMode", "viewer"])


@command
def serve(prefect_yaml: Path = typer.Option(None, "--prefect-file", help="Default: deployments/prefect.yaml.")) -> None:
    """Serve the scheduled retraining deployments on this machine (runs start at each cron tick)."""
    from flows import serve as serving

    _prefect_env()
    serving.serve(prefect_yaml or serving.PREFECT_YAML)


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


@command
def setup() -> None:
    """Prepare the default base model (download and convert once); safe to re-run."""
    from tasks.models import ensure_default_base_model

    out.print(f"default base model: {ensure_default_base_model()}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
