"""A planned stage run together with its registry record: the lifecycle every stage kind shares.

The stage prepares its job through `RegistryContext` (what it may ask of the registry: versions, model folders,
exports, recording a dataset), then its version is registered as `running`, written into a temporary folder by the
stage's `run`, and only then moved into place and marked `ready`; any error marks it `failed` with the reason and
leaves no artifact. Nothing here knows a stage kind.
"""
from __future__ import annotations

import dataclasses
import shutil
import traceback
from pathlib import Path
from typing import Callable

from pydantic import ValidationError

import registry
from core.errors import TuneryError
from core.home import artifacts_dir, atomic_dir, home
from flows.config import PipelineConfig
from flows.inputs import adapter_base, local_model, model_folder, run_prep
from flows.plan import PlannedStage, plan_stage, trained_on
from tasks.common import StageResult
from registry.records import Export
from tasks.data.prep import PreparedData
from tasks.stages.catalogue import STAGES
from tasks.stages.stage import Job, StageFields


@dataclasses.dataclass(frozen=True)
class RegistryContext:
    """tasks.stages.stage.Context over the registry: what a stage may ask of the flow while it prepares, runs and
    measures."""

    device: str = "auto"
    seed: int = 0

    @property
    def registry_id(self) -> str:
        return registry.instance_id()

    def version(self, ref: str) -> registry.Version:
        return local_model(ref)

    def folder(self, version: registry.Version) -> str:
        return model_folder(version)

    def adapter_base(self, version: registry.Version) -> str:
        return adapter_base(version)

    def exports(self, version: registry.Version) -> list[Export]:
        return registry.exports.list_exports(version.version)

    def record_dataset(self, data: PreparedData) -> None:
        registry.record_dataset(data.info, data.artifact_path)


def stage_of(version: registry.Version) -> StageFields | None:
    """The stage a version was made by, rebuilt from its recorded settings (None for a base or an unknown kind)."""
    kind = STAGES.get(version.stage)
    settings = version.hyperparameters.get(version.stage)
    if kind is None or not isinstance(settings, dict):
        return None
    try:
        return kind.model_validate(settings)
    except ValidationError:  # recorded by a tunery whose settings differed: nothing of its kind to re-measure
        return None


def measure(version: registry.Version, device: str = "auto") -> dict[str, float]:
    """The version's own stage measurements (its kind's `measure`), recorded as training figures."""
    stage = stage_of(version)
    if stage is None or version.status != "ready":
        return {}
    metrics = stage.measure(version, RegistryContext(device=device))
    if metrics:
        registry.record_metrics(version.version, metrics)
    return metrics


def record(version: str, run: Callable[[Path], StageResult], fingerprint: str | None = None,
           preference_pairs: str | None = None) -> registry.Version:
    """Run `run(tmp_folder) -> StageResult` into the version's artifact folder; mark it ready or failed."""
    name, number = version.split(":")
    final = artifacts_dir() / name / number
    try:
        with atomic_dir(final) as tmp:
            result = run(tmp)
        registry.record_history(version, result.history)
        registry.record_metrics(version, result.metrics)
        registry.finish_version(version, str(final), info=result.info, fingerprint=fingerprint,
                                adapter=result.adapter, quantization=result.quantization,
                                preference_pairs=preference_pairs)
    except BaseException as e:
        registry.fail_version(version, _reason(e))
        raise
    return registry.get_version(version)


def run_job(cfg: PipelineConfig, stage: StageFields, stage_id: str, job: Job, flow_run_id: str | None = None,
            fingerprint: str | None = None) -> registry.Version:
    """Register the job's version, run the stage into it, and settle it (see `record`)."""
    parents = list(dict.fromkeys(p.version for p in job.parents))
    version = registry.create_version(
        cfg.name, stage.stage, base_model=job.parents[0].base_model, parents=parents,
        hyperparameters=job.hyperparameters, data_hash=job.data_hash, flow_run_id=flow_run_id, teacher=job.teacher)
    # Checkpoints live outside the version's temporary folder, keyed by the stage's inputs: a failed attempt leaves
    # them for the next attempt at the same stage, and a success removes them.
    checkpoints = home() / "checkpoints" / fingerprint if fingerprint else None
    inputs = dataclasses.replace(job.inputs, checkpoints=str(checkpoints) if checkpoints else None)

    def run(tmp: Path) -> StageResult:
        result = stage.run(inputs, tmp)
        result.info.update(stage_id=stage_id, **job.info)
        return result

    done = record(version, run, fingerprint, job.preference_pairs)
    if checkpoints is not None:
        shutil.rmtree(checkpoints, ignore_errors=True)
    return done


def run_planned(cfg: PipelineConfig, plan: PlannedStage, data: PreparedData | None, config_dir: Path,
                flow_run_id: str | None = None, reuse: bool = False) -> registry.Version:
    """Run a planned stage: prepare its own data, then let the stage prepare its job (a teacher's answers, checks
    of merge sources) and run it. Its kind's own measurements are the evaluation's (`measure`), not done here.

    `data` is the config's prepared top-level data. With `reuse`, a ready version made from the same inputs (the
    plan's fingerprint) is returned instead of training again; either way the version records its fingerprint.
    """
    stage = cfg.stages[plan.index]
    if reuse and (found := registry.find_fingerprint(cfg.name, plan.fingerprint)):
        return registry.get_version(found).as_reused()
    if plan.data_from == "stage":
        data = run_prep(cfg, config_dir, registry.get_version(plan.base).artifact_path, stage.data)
    else:
        data = trained_on(stage, plan, data, config_dir, None)
    if data is not None and data.data_hash != plan.data_hash:
        raise TuneryError(f"stage {plan.stage_id}: its data changed between planning and running; run again")
    job = stage.prepare(plan, data, RegistryContext(device=cfg.device, seed=cfg.seed))
    return run_job(cfg, stage, plan.stage_id, job, flow_run_id, plan.fingerprint)


def run_measured(cfg: PipelineConfig, plan: PlannedStage, data: PreparedData | None, config_dir: Path,
                 flow_run_id: str | None = None, reuse: bool = False) -> registry.Version:
    """`run_planned`, then its kind's own measurements of a version it made (a reused version is returned as found:
    the evaluation re-measures it when the measuring code changed)."""
    version = run_planned(cfg, plan, data, config_dir, flow_run_id, reuse)
    if version.reused:
        return version
    measure(version, cfg.device)
    return registry.get_version(version.version)


def run_stage(cfg: PipelineConfig, index: int, done: dict[str, registry.Version], previous: registry.Version,
              data: PreparedData | None, config_dir: Path, flow_run_id: str | None = None,
              reuse: bool = False) -> registry.Version:
    """Plan stage `index` of the config (flows.plan.plan_stage) and run and measure it: a stage run on its own
    (`tunery sft`, ...)."""
    return run_measured(cfg, plan_stage(cfg, index, done, previous, data, config_dir), data, config_dir,
                        flow_run_id, reuse)


def run_train(cfg: PipelineConfig, stage: StageFields, start: registry.Version, data: PreparedData | None,
              stage_id: str | None = None) -> registry.Version:
    """Train a stage of its kind from `start` on `data` outside any config chain (no plan, no reuse)."""
    plan = PlannedStage(index=-1, kind=stage.stage, stage_id=stage_id or stage.stage, base=start.version,
                        start=start.version)
    job = stage.prepare(plan, data, RegistryContext(device=cfg.device, seed=cfg.seed))
    return run_job(cfg, stage, plan.stage_id, job)


def _reason(e: BaseException) -> str:
    if isinstance(e, TuneryError):
        return str(e)
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    return "".join(traceback.format_exception_only(type(e), e)).strip()
