"""Each stage run together with its registry record. Used by the Prefect flow and by single-stage CLI commands.

A trained version is registered as `running` before training starts, written into a temporary folder, and only
then moved into place and marked `ready`; any error marks it `failed` with the reason and leaves no artifact.
"""
from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import registry
from flows.config import PipelineConfig
from tasks.common import StageResult, TuneryError, artifacts_dir, atomic_dir
from tasks.evaluation import EvalConfig, evaluate
from tasks.models import DEFAULT_BASE, DEFAULT_NAME, resolve_base_model
from tasks.prep import prepare
from tasks.sft import train_sft


def run_prep(cfg: PipelineConfig, config_dir: Path, base_path: str | None = None) -> StageResult:
    """Prepare the config's data (content-addressed, so a repeat is cheap) and remember the dataset."""
    result = prepare(cfg.data, config_dir, tokenizer_path=base_path)
    registry.record_dataset(result.info, result.artifact_path)
    return result


def base_name(cfg: PipelineConfig, base_path: str) -> str:
    if cfg.base_name:
        return cfg.base_name
    if cfg.base_model == DEFAULT_BASE:
        return DEFAULT_NAME
    return Path(base_path).name.replace("/", "-")[:64] or "base"


def run_base(cfg: PipelineConfig, config_dir: Path) -> dict[str, Any]:
    """Resolve the base model and return its registry version, registering it the first time it is used."""
    path = resolve_base_model(cfg.base_model, config_dir)
    name = base_name(cfg, path)
    for v in registry.list_versions(name=name, status="ready"):
        if v["stage"] == "base" and v["artifact_path"] == path:
            return v
    # base_model names the foundation model the same way on the base version and on everything trained from it.
    identity = DEFAULT_NAME if cfg.base_model == DEFAULT_BASE else path
    version = registry.create_version(name, "base", base_model=identity, info={"source": cfg.base_model})
    registry.finish_version(version, path)
    return registry.get_version(version)


def run_sft(cfg: PipelineConfig, base: dict[str, Any], data: StageResult, flow_run_id: str | None = None
            ) -> dict[str, Any]:
    """Fine-tune `base` on `data` as a new version of `cfg.name`; return the registered version."""
    hyperparameters = {"sft": cfg.sft.model_dump(), "seed": cfg.seed, "device": cfg.device}
    version = registry.create_version(
        cfg.name, "sft", base_model=base["base_model"],
        parents=[base["version"]], hyperparameters=hyperparameters, data_hash=data.info["data_hash"],
        flow_run_id=flow_run_id,
    )
    number = version.split(":")[1]
    final = artifacts_dir() / cfg.name / number
    try:
        with atomic_dir(final) as tmp:
            result = train_sft(cfg.sft, base["artifact_path"], data.artifact_path, tmp, cfg.device, cfg.seed)
        registry.record_history(version, result.history)
        registry.record_metrics(version, result.metrics)
        registry.finish_version(version, str(final), info={**result.info, "base_path": base["artifact_path"]})
    except BaseException as e:
        registry.fail_version(version, _reason(e))
        raise
    return registry.get_version(version)


def run_eval(version: dict[str, Any], data: StageResult, eval_cfg: EvalConfig) -> dict[str, float]:
    """Measure a registered version on the prepared data's validation split and record the metrics."""
    if version["status"] != "ready":
        raise TuneryError(f"{version['version']} is {version['status']}; only ready versions can be evaluated")
    if version["info"].get("adapter"):
        result = evaluate(version["info"]["base_path"], data.artifact_path, eval_cfg, adapter=version["artifact_path"])
    else:
        result = evaluate(version["artifact_path"], data.artifact_path, eval_cfg)
    registry.record_metrics(version["version"], result.metrics, eval_data_hash=data.info["data_hash"])
    return result.metrics


def _reason(e: BaseException) -> str:
    if isinstance(e, TuneryError):
        return str(e)
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    return "".join(traceback.format_exception_only(type(e), e)).strip()
