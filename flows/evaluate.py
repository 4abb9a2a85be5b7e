"""Measure a registered version: its kind's own measurements, the evaluation on the held-out split (perplexity,
answers, latency, the general suite), the forgetting drop against its parent, and the judge's verdicts."""
from __future__ import annotations

import registry
from core.errors import TuneryError
from flows.inputs import adapter_base, model_folder
from flows.run import measure
from tasks.data.prep import PreparedData
from tasks.evaluate.evaluation import EvalConfig, evaluate
from tasks.evaluate.general import drop_points
from tasks.evaluate.judge import rates
from tasks.evaluate.judge import run_judge as judge


def run_eval(version: registry.Version, data: PreparedData, eval_cfg: EvalConfig, own: bool = True
             ) -> dict[str, float]:
    """Measure a registered version: with `own`, its kind's own measurements (recorded as training figures), then
    the prepared data's validation split (recorded on that data); return both."""
    if version.status != "ready":
        raise TuneryError(f"{version.version} is {version.status}; only ready versions can be evaluated")
    if version.adapter:
        result = evaluate(adapter_base(version), data.artifact_path, eval_cfg, adapter=version.artifact_path)
    else:
        result = evaluate(version.artifact_path, data.artifact_path, eval_cfg)
    measured_on = data.data_hash
    own = measure(version, eval_cfg.device) if own else {}  # its stage's own (a student against its teacher)
    metrics = {**result.metrics, **forgetting(version, result.metrics.get("general_accuracy"), measured_on)}
    registry.record_metrics(version.version, metrics, eval_data_hash=measured_on)
    registry.record_samples(version.version, result.samples, eval_data_hash=measured_on)
    registry.record_answers(version.version, "hf", result.answers, eval_data_hash=measured_on)
    if eval_cfg.judge is not None:
        judged = run_judge(version, eval_cfg.judge, measured_on)
        registry.record_metrics(version.version, judged, eval_data_hash=measured_on)
        metrics.update(judged)
    return {**own, **metrics}


def run_judge(version: registry.Version, cfg, eval_data_hash: str) -> dict[str, float]:
    """The judge's verdicts on the version's held-out answers against its first parent's (tasks.evaluate.judge),
    recorded; returns the `judge_*` rates (nothing when it has no parent or the parent has no answers on this data)."""
    if not version.parents:
        return {}
    mine = registry.get_answers(version.version, "hf", eval_data_hash)
    theirs = registry.get_answers(version.parents[0], "hf", eval_data_hash)
    if not mine or not theirs:
        return {}
    judge_version = registry.get_version(cfg.model) if cfg.kind == "version" else None
    folder = model_folder(judge_version) if judge_version else None
    verdicts = judge(cfg, mine, theirs, folder)
    name = judge_version.version if judge_version else cfg.model + (f" ({cfg.endpoint_model})" if
                                                                     cfg.endpoint_model else "")
    registry.record_judgements(version.version, version.parents[0], name, verdicts, eval_data_hash)
    return rates(verdicts)


def forgetting(version: registry.Version, accuracy: float | None, eval_data_hash: str) -> dict[str, float]:
    """`general_drop_pct`: how many points of general-suite accuracy (`accuracy`, measured on the version or its
    export) the version lost against its first parent's evaluation on the same data, with that parent accuracy
    (`general_accuracy_parent`); nothing when either was not measured."""
    if not version.parents or accuracy is None:
        return {}
    parent = registry.get_version(version.parents[0], eval_data_hash).metrics
    drop = drop_points(parent.get("general_accuracy"), accuracy)
    return {} if drop is None else {"general_drop_pct": drop, "general_accuracy_parent": parent["general_accuracy"]}

