"""The Prefect flow behind `tunery run`: one task per stage, one artifact per stage. Wiring only."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.filesystems import LocalFileSystem
from prefect.runtime import flow_run

import registry
from core import metrics as metric_catalogue
from core.errors import RegistryBusy, TuneryError
from core.files import sha256_json
from core.home import home
from flows import promotion, report
from flows.config import BASE_REF, load_config
from flows.evaluate import run_eval
from flows.inputs import run_base, run_prep
from flows.plan import PlannedStage, code_version, plan_stage
from flows.run import run_measured
from tasks.common import resolve_device

# Tasks that use the accelerator carry this tag; every pipeline run (and `tunery serve`) makes sure the server has a
# concurrency limit of 1 on it, so two trainings or evaluations never share one machine's GPU (or CPU) at once.
ACCELERATOR_TAG = "tunery-accelerator"


def ensure_accelerator_limit() -> None:
    """Create the concurrency limit of 1 on ACCELERATOR_TAG on the server runs report to, when it is missing (a
    limit someone set stays as it is). The flow calls it, so runs picked up by workers that `prefect deploy`
    started are limited too, not only those of `tunery serve`."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_concurrency_limit_by_tag(ACCELERATOR_TAG)
        except ObjectNotFound:
            client.create_concurrency_limit(tag=ACCELERATOR_TAG, concurrency_limit=1)


def transient_only(task, task_run, state) -> bool:
    """Retry where trying again can help: I/O errors and a registry held busy by another process. Never bad data,
    a bad config or running out of memory, which fail the same way every time."""
    try:
        state.result()
    except RegistryBusy:
        return True
    except (TuneryError, MemoryError):
        return False
    except (OSError, TimeoutError) as e:
        return "out of memory" not in str(e).lower()
    except Exception:
        return False
    return False


IO_RETRIES = {"retries": 2, "retry_delay_seconds": [5, 30], "retry_condition_fn": transient_only}


def _key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


@task(task_run_name="prep {cfg.name}", **IO_RETRIES)
def prep_task(cfg, config_dir: Path, base: registry.Version):
    result = run_prep(cfg, config_dir, base.artifact_path)
    info = result.info
    create_markdown_artifact(
        key=_key(cfg.name, "prep"),
        markdown=f"### Data for {cfg.name}\n\n| | |\n|---|---|\n| hash | `{info['data_hash'][:16]}` |\n"
                 f"| kind | {info['kind']} |\n| rows read | {info['rows_read']} |\n"
                 f"| duplicates removed | {info['duplicates_removed']} |\n| train / validation | "
                 f"{info['train_rows']} / {info['validation_rows']} |\n| tokens | {info.get('tokens', '-')} |\n",
        description="prepared dataset",
    )
    return result


@task(task_run_name="base {cfg.base_model}", **IO_RETRIES)
def base_task(cfg, config_dir: Path) -> registry.Version:
    return run_base(cfg, config_dir)


def result_storage() -> str:
    """Where cached stage and eval results live: with the registry they describe (TUNERY_HOME/prefect/results),
    whichever Prefect server records the run. Prefect wants the storage saved as a block on that server: one per
    registry, saved (again) by each run, so a run against another server finds the same results."""
    name = f"tunery-results-{registry.instance_id()[:12].lower()}"
    LocalFileSystem(basepath=str(home() / "prefect" / "results")).save(name, overwrite=True)
    return f"local-file-system/{name}"


def stage_cache_key(context, parameters: dict[str, Any]) -> str:
    """Prefect's cache key for a stage: its planned fingerprint (settings, data hash, start and source versions,
    seed, device, code and library versions, registry). Results persist under TUNERY_HOME/prefect/results, so the
    key outlives the flow run and the Prefect server: a later run with unchanged inputs skips the stage (Cached)."""
    return "stage-" + parameters["plan"].fingerprint


def eval_cache_key(context, parameters: dict[str, Any]) -> str:
    """An evaluation is the same while the version, the held-out data, the eval settings and the code are."""
    p = parameters
    return "eval-" + sha256_json({"version": p["version"].version, "data": p["data"].data_hash,
                                  "eval": p["eval_cfg"].model_dump(mode="json"), "code": code_version(),
                                  "device": resolve_device(p["eval_cfg"].device),
                                  "registry": registry.instance_id()})


@task(task_run_name="{plan.kind} {cfg.name} stage {plan.index}", cache_key_fn=stage_cache_key, persist_result=True,
      result_serializer="json", tags=[ACCELERATOR_TAG])
def stage_task(cfg, plan: PlannedStage, data, config_dir: Path) -> registry.Version:
    """Train the planned stage (or find the version its inputs already made) and, when it trained, take its kind's
    own measurements; one artifact tells what it made."""
    version = run_measured(cfg, plan, data, config_dir, flow_run_id=str(flow_run.get_id() or ""), reuse=True)
    create_markdown_artifact(key=_key(cfg.name, plan.stage_id),
                             markdown=report.markdown(report.version_report(version)),
                             description=f"{plan.kind} stage")
    return version


@task(task_run_name="eval {version.version}", cache_key_fn=eval_cache_key, persist_result=True,
      result_serializer="json", tags=[ACCELERATOR_TAG])
def eval_task(version: registry.Version, data, eval_cfg, own: bool = True) -> dict[str, float]:
    """Evaluate the version on the held-out split; with `own`, take its kind's own measurements again first (the
    stage task did not just take them: the version was made earlier, and the measuring code may have changed)."""
    metrics = run_eval(version, data, eval_cfg, own=own)
    measured = registry.get_version(version.version, data.data_hash)
    create_markdown_artifact(key=_key(version.name, "eval"), markdown=report.markdown(report.version_report(measured)),
                             description="the version as measured: its stage's own measurements and the evaluation "
                                         "on the held-out split")
    return metrics


@task(task_run_name="promote {version.version}")
def promote_task(version: registry.Version, data, cfg) -> dict[str, Any]:
    """Export the version, check it with llama.cpp and promote it through the config's gate."""
    result = promotion.promote(version.version, data, cfg.export, cfg.promote, cfg.eval_config().prompts,
                               evals=cfg.eval_config())
    checks = report.markdown_table(report.check_rows(result["export"]))
    create_markdown_artifact(
        key=_key(version.name, "promotion"),
        markdown=f"```\n{report.promotion_summary(result)}\n```\n\n### Export checks ({result['export'].export_id})\n\n"
                 f"{checks}",
        description="export, checks and gate decision",
    )
    return result


def _run_name() -> str:
    """A flow run is named after the model it trains (and, once it is done, the version it left: see _rename)."""
    path = Path(flow_run.parameters.get("config_path", "pipeline"))
    try:
        return load_config(path)[0].name
    except Exception:  # a bad config fails the run itself, with its message; the name is only a label
        return path.stem


def _rename(name: str) -> None:
    from prefect.client.orchestration import get_client

    run_id = flow_run.get_id()
    if run_id:
        with get_client(sync_client=True) as client:
            client.update_flow_run(run_id, name=name)


def dashboard_url(version: str) -> str:
    """Where the dashboard shows a version (TUNERY_DASHBOARD_URL, default the local `tunery dashboard`)."""
    import os

    return f"{os.environ.get('TUNERY_DASHBOARD_URL', 'http://127.0.0.1:8501').rstrip('/')}/version?v={version}"


@flow(name="tunery-pipeline", flow_run_name=_run_name)
def pipeline(config_path: str) -> dict[str, Any]:
    """base -> prep -> eval(base) -> each stage in order, each followed by its eval -> (with `promote:`) export and
    promote the run's best version; returns versions, metrics and the gate's decision."""
    cfg, config_dir = load_config(config_path)
    ensure_accelerator_limit()
    for settled in registry.settle_interrupted():
        get_run_logger().warning(f"{settled}: its process ended before it finished; marked failed (interrupted)")
    base = base_task(cfg, config_dir)
    eval_cfg = cfg.eval_config()
    if eval_cfg.judge is not None and eval_cfg.judge.kind == "version":
        try:  # an unknown judge is named before anything trains
            registry.get_version(eval_cfg.judge.model)
        except TuneryError as e:
            raise TuneryError(f"{config_path}: eval.judge: {e}") from None
    data = prep_task(cfg, config_dir, base)
    storage = result_storage()
    evaluate = eval_task.with_options(result_storage=storage)
    results = [(base, evaluate(base, data, eval_cfg))]
    done: dict[str, registry.Version] = {BASE_REF: base}
    previous, this_run = base, str(flow_run.get_id() or "")
    for index, stage in enumerate(cfg.stages):
        plan = plan_stage(cfg, index, done, previous, data, config_dir)  # once, with no side effects
        name = f"{stage.stage} {cfg.name} from {plan.start}"
        cached = stage_task.with_options(task_run_name=name, result_storage=storage)(cfg, plan, data, config_dir)
        # read back from the registry: a result cached by a worker that mounts TUNERY_HOME elsewhere has its paths
        version = registry.get_version(cached.version)
        version = version.as_reused() if cached.reused else version
        measured_now = version.flow_run_id == this_run and not version.reused  # by the stage task, just now
        results.append((version, evaluate(version, data, eval_cfg, own=not measured_now)))
        done[cfg.stage_id(index)] = previous = version
    logger = get_run_logger()
    for v, _ in results[1:]:
        if v.flow_run_id != this_run:
            logger.info(f"{v.version} reused: its inputs are unchanged since flow run {v.flow_run_id}")
    rows = [{"version": v.version, "stage": v.stage, "parents": ", ".join(v.parents),
             "this run": "reused" if i and v.flow_run_id != this_run else ("base" if not i else "trained"),
             **{k: round(m.get(k, float("nan")), 3) for k in metric_catalogue.headline()}}
            for i, (v, m) in enumerate(results)]
    create_table_artifact(key=_key(cfg.name, "summary"), table=rows, description="every version of this run")
    create_link_artifact(key=_key(cfg.name, "dashboard"), link=dashboard_url(previous.version),
                         link_text=f"{previous.version} in the tunery dashboard",
                         description="the run's last version in the dashboard (`tunery dashboard`)")
    reused = previous.flow_run_id != this_run
    _rename(f"{cfg.name} -> {previous.version}" + (" (nothing changed)" if reused else ""))
    promoted = None
    if cfg.promote is not None:
        best = promotion.best_version([v.version for v, _ in results[1:]], data.data_hash, cfg.metric)
        holder = registry.exports.get_alias(cfg.name, cfg.promote.alias)
        if holder and holder.version == best.version and \
                registry.exports.get_export(holder.export_id).quant == cfg.export.quant:
            logger.info(f"{cfg.name}@{cfg.promote.alias} already holds {best.version}: nothing to promote")
        else:
            promoted = promote_task.with_options(task_run_name=f"promote {best.version} to "
                                                               f"{cfg.name}@{cfg.promote.alias}")(best, data, cfg)
    return {"data_hash": data.data_hash, "base": base.version, "tuned": previous.version,
            "versions": [v.version for v, _ in results], "rows": rows, "promotion": promoted}
