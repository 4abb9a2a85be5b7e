"""`tunery run`, `sweep`, `prep`, one command per stage kind, and `eval`."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from core import metrics as metric_catalogue
from core.errors import TuneryError
from flows.cli.app import JsonOpt, _prefect_env, _print_json, command, err, out
from flows.cli.render import _print_answers, _print_distill, _print_promotion
from flows.report import fmt as _fmt

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
    from flows.config import BASE_REF, load_config
    from flows.inputs import run_base, run_prep
    from flows.run import run_stage

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
    """One single-stage command per kind of the stage catalogue (tasks/stages/catalogue.py)."""
    from tasks.stages.catalogue import STAGES

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
