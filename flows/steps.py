"""Each stage run together with its registry record. Used by the Prefect flow and by single-stage CLI commands.

A trained version is registered as `running` before training starts, written into a temporary folder, and only
then moved into place and marked `ready`; any error marks it `failed` with the reason and leaves no artifact.
"""
from __future__ import annotations

import shutil
import traceback
from pathlib import Path
from typing import Any

import registry
from core.errors import TuneryError
from core.home import artifacts_dir, atomic_dir, home, home_relative
from flows.config import PipelineConfig
from flows.plan import PlannedStage, plan_stage
from tasks.catalogue import STAGES, Stage
from tasks.common import StageResult, resolve_device
from tasks.distill import make_dataset, preference_pairs, prompt_contexts
from tasks.evaluation import EvalConfig, evaluate
from tasks.merge import MergeStage, check_sources, merge_adapter
from tasks.models import DEFAULT_BASE, DEFAULT_NAME, check_model_folder, resolve_base_model
from tasks.prep import PrepConfig, load_prepared, prepare
from tasks.stage import StageFields, StageInputs
from tasks.training import QuantizationConfig


def run_prep(cfg: PipelineConfig, config_dir: Path, base_path: str | None = None,
             data: PrepConfig | None = None) -> StageResult:
    """Prepare the config's data, or a stage's own (content-addressed, so a repeat is cheap); remember it."""
    result = prepare(data or cfg.data, config_dir, tokenizer_path=base_path)
    registry.record_dataset(result.info, result.artifact_path)
    return result


def load_with_data(config: str | Path):
    """Load a config, resolve (and register) its base model, prepare its data: what single commands need.
    Returns (config, its folder, the base version, the prepared data)."""
    from flows.config import load_config

    cfg, config_dir = load_config(config)
    base = run_base(cfg, config_dir)
    return cfg, config_dir, base, run_prep(cfg, config_dir, base.artifact_path)


def base_name(cfg: PipelineConfig, base_path: str) -> str:
    if cfg.base_name:
        return cfg.base_name
    if cfg.base_model == DEFAULT_BASE:
        return DEFAULT_NAME
    return Path(base_path).name.replace("/", "-")[:64] or "base"


def run_base(cfg: PipelineConfig, config_dir: Path) -> registry.Version:
    """Resolve the base model and return its registry version, registering it the first time it is used."""
    path = resolve_base_model(cfg.base_model, config_dir)
    # base_model names the foundation model the same way on the base version and on everything trained from it.
    identity = DEFAULT_NAME if cfg.base_model == DEFAULT_BASE else path
    return register_model(base_name(cfg, path), path, identity, cfg.base_model)


def register_model(name: str, path: str, identity: str, source: str) -> registry.Version:
    """The registry version of a model folder used as it is (a base, a teacher), registered the first time."""
    for v in registry.list_versions(name=name, status="ready"):
        if v.stage == "base" and home_relative(v.artifact_path) == home_relative(path):
            return v
    version = registry.create_version(name, "base", base_model=identity, info={"source": source})
    registry.finish_version(version, path)
    return registry.get_version(version)


def model_folder(version: registry.Version) -> str:
    """A folder holding the version as a complete model, for training on, merging or exporting.

    Full models are their artifact. An adapter version is merged into its parent's model once and kept under
    TUNERY_HOME/cache/merged (a QLoRA adapter into the de-quantized weights it was trained against).
    """
    if not version.adapter:
        return version.artifact_path
    folder = home() / "cache" / "merged" / version.name / str(version.number)
    if not (folder / "config.json").exists():
        with atomic_dir(folder, replace=True) as tmp:  # a cache
            fold_adapter(version, tmp)
    return str(folder)


def adapter_base(version: registry.Version) -> str:
    """The model folder an adapter version applies to: its first parent's."""
    return model_folder(registry.get_version(version.parents[0]))


def fold_adapter(version: registry.Version, out_dir: Path, qlora_base: str = "dequantized") -> dict[str, Any]:
    """Write an adapter version merged into its parent's model (its first parent) to `out_dir`."""
    quantization = QuantizationConfig(**version.quantization) if version.quantization else None
    return merge_adapter(adapter_base(version), version.artifact_path, out_dir, quantization, qlora_base)


def _record(version: str, run, fingerprint: str | None = None, preference_pairs: str | None = None
            ) -> registry.Version:
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


def run_train(cfg: PipelineConfig, stage: StageFields, start: registry.Version, data: StageResult | None,
              stage_id: str | None = None, flow_run_id: str | None = None, fingerprint: str | None = None,
              teacher: registry.Version | None = None, info: dict[str, Any] | None = None,
              preference_pairs: str | None = None) -> registry.Version:
    """Run a stage of the catalogue other than merge (cpt, sft, dpo, ...) from `start` on `data` (None for a kind
    that takes none) as a new version of `cfg.name`; return the version. A distill stage trains its student with sft on the teacher's answers (`data`) and measures it against the
    `teacher`, a parent of the new version next to `start`."""
    # The trainer checks this too; checking here first means a mismatch leaves no failed version behind.
    kind = STAGES[stage.stage].data_kind
    if kind is not None and data.info["kind"] != kind:
        raise TuneryError(f"stage {stage_id or stage.stage} ({stage.stage}) needs {kind} data, but its data holds "
                          f"{data.info['kind']} examples; give the stage its own `data:`")
    hyperparameters = {stage.stage: stage.hyperparameters(), "seed": cfg.seed, "device": cfg.device}
    parents = [start.version]
    if teacher is not None:
        hyperparameters["teacher"] = teacher.version
        parents = list(dict.fromkeys(parents + [teacher.version]))
    version = registry.create_version(
        cfg.name, stage.stage, base_model=start.base_model, parents=parents,
        hyperparameters=hyperparameters, data_hash=data.info["data_hash"] if data else None,
        flow_run_id=flow_run_id, teacher=teacher.version if teacher is not None else None,
    )

    # Checkpoints live outside the version's temporary folder, keyed by the stage's inputs: a failed attempt leaves
    # them for the next attempt at the same stage, and a success removes them.
    checkpoints = home() / "checkpoints" / fingerprint if fingerprint else None

    def train(tmp: Path) -> StageResult:
        start_folder = model_folder(start)
        inputs = StageInputs(start=start_folder, data=data.artifact_path if data else None, device=cfg.device,
                             seed=cfg.seed,
                             teacher=model_folder(teacher) if teacher is not None else None,
                             checkpoints=str(checkpoints) if checkpoints else None)
        result = stage.run(inputs, tmp)
        result.info.update(stage_id=stage_id or stage.stage, start_folder=start_folder, **(info or {}))
        return result

    done = _record(version, train, fingerprint, preference_pairs)
    if checkpoints is not None:
        shutil.rmtree(checkpoints, ignore_errors=True)
    return done


# Export precisions, best first: the teacher answers through the most faithful GGUF it has.
GGUF_ORDER = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_0", "q4_k_m", "q4_k_s", "q4_0")


def teacher_gguf(teacher: registry.Version, backend: str, allow_failed: bool = False
                 ) -> tuple[Path | None, dict[str, Any]]:
    """The GGUF export the teacher answers through (backend auto or llama.cpp), or None for HF generation, and what
    the version records about it: the export, its file and its check status.

    Only an export that passed its llama.cpp checks is used, unless `allow_failed` (then the best failed one)."""
    if backend == "hf":
        return None, {}
    found = sorted(((not e["passed"], GGUF_ORDER.index(e["quant"]) if e["quant"] in GGUF_ORDER else len(GGUF_ORDER),
                     e["export_id"], e) for e in registry.exports.list_exports(teacher.version)
                    if (Path(e["path"]) / e["gguf_file"]).exists()), key=lambda f: f[:3])
    passed = [e for failed, _, _, e in found if not failed]
    failed = [e for bad, _, _, e in found if bad]

    def status(e: dict[str, Any]) -> str:
        names = [c["name"] for c in e["checks"] if c["passed"] is False]
        return "passed" if e["passed"] else f"failed: {', '.join(names) or 'checks'}"

    chosen = passed[0] if passed else failed[0] if failed and allow_failed else None
    if chosen is not None:
        return Path(chosen["path"]) / chosen["gguf_file"], {
            "teacher_export": chosen["export_id"], "teacher_gguf_checks": status(chosen)}
    skipped = f"{failed[0]['export_id']} ({status(failed[0])})" if failed else None
    if backend == "llama.cpp":
        raise TuneryError(f"teacher {teacher.version} has no GGUF export that passed its checks"
                          + (f"; {skipped}: set teacher_allow_failed_export: true to use it anyway" if skipped else
                             f"; run `tunery export {teacher.version} --quant f16`") + ", or set teacher_backend: hf")
    return None, ({"teacher_export_skipped": skipped} if skipped else {})


def teacher_version(ref: str) -> registry.Version:
    """A planned teacher's version; a local model folder (`folder:<path>`) is registered the first time."""
    if not ref.startswith("folder:"):
        return registry.get_version(ref)
    folder = Path(ref.removeprefix("folder:"))
    check_model_folder(folder)
    return register_model(folder.name[:64], str(folder), str(folder), str(folder))


def run_distill(cfg: PipelineConfig, stage: Stage, start: registry.Version, teacher: registry.Version,
                data: StageResult | None, stage_id: str | None = None, flow_run_id: str | None = None,
                fingerprint: str | None = None) -> registry.Version:
    """Ask the teacher, prepare the student's rows (and, when asked, preference pairs), train and measure the
    student; the generated datasets are registered like any prepared data."""
    rows = None
    if data is not None:
        if data.info["kind"] != "chat":
            raise TuneryError(f"stage {stage_id or stage.stage} asks the teacher the user turns of chat data, but its "
                              f"data holds {data.info['kind']} examples; give it chat `data:` or `prompts:`")
        _, train, held = load_prepared(data.artifact_path)
        rows = (train, held)
    contexts = prompt_contexts(stage, rows)
    start_folder, teacher_folder = model_folder(start), model_folder(teacher)
    gguf, teacher_export = teacher_gguf(teacher, stage.teacher_backend, stage.teacher_allow_failed_export)
    # What the teacher's raw answers depend on (how they are trimmed and learned from is applied afterwards).
    generation = {"max_new_tokens", "generation_batch_size", "no_repeat_ngram", "teacher_backend", "system",
                  "examples"}
    # (the GGUF by its path in TUNERY_HOME: the same answers wherever a worker mounts the shared storage)
    key = {"teacher": teacher.version, "gguf": str(gguf) if gguf is None else home_relative(gguf),
           "contexts": contexts, "registry": registry.instance_id(),
           "settings": stage.model_dump(mode="json", include=generation), "device": resolve_device(cfg.device)}
    dataset = make_dataset(stage, teacher_folder, gguf, contexts, start_folder, cfg.device, key)
    registry.record_dataset(dataset.info, dataset.artifact_path)
    info = {"dataset": dataset.artifact_path,
            **{k: dataset.info[k] for k in ("teacher_backend", "teacher_gguf", "generation_s", "unfinished_answers",
                                            "trimmed_answers", "dropped_answers")}, **teacher_export}
    pairs = None
    if getattr(stage, "preference_pairs", False):
        made = preference_pairs(stage, start_folder, dataset.artifact_path, cfg.device)
        registry.record_dataset(made.info, made.artifact_path)
        pairs = made.artifact_path
    return run_train(cfg, stage, start, dataset, stage_id, flow_run_id, fingerprint, teacher=teacher, info=info,
                     preference_pairs=pairs)


def run_merge(cfg: PipelineConfig, stage: MergeStage, start: registry.Version | None,
              sources: list[registry.Version], merge_base: registry.Version | None,
              stage_id: str | None = None, flow_run_id: str | None = None,
              fingerprint: str | None = None) -> registry.Version:
    """Merge `start`'s adapter into its base (method lora) or the `sources` with mergekit; register the result.

    Every source (and, for ties / dare_ties / task_arithmetic, the base they are measured from) is a parent.
    """
    folders: dict[str, str] = {}
    base = None
    if stage.method == "lora":
        if start is None or not start.adapter:
            what = start.version if start else "nothing"
            raise TuneryError(f"merge (lora) needs an adapter version to fold in; {what} is not one")
        parents = [start]
    else:
        parents = sources + ([merge_base] if merge_base is not None else [])
        # Checked before the version is registered: bad inputs leave no failed row behind.
        folders = {s.version: model_folder(s) for s in sources}
        base = (merge_base.version, model_folder(merge_base)) if merge_base is not None else None
        check_sources(folders, base)
    hyperparameters = {"merge": stage.hyperparameters(), "seed": cfg.seed,
                       "sources": [p.version for p in sources]}
    version = registry.create_version(
        cfg.name, "merge", base_model=parents[0].base_model,
        parents=list(dict.fromkeys(p.version for p in parents)), hyperparameters=hyperparameters,
        data_hash=start.data_hash if stage.method == "lora" else None, flow_run_id=flow_run_id,
    )

    if stage.method == "lora":
        inputs = StageInputs(start=start.artifact_path, seed=cfg.seed, quantization=start.quantization,
                             adapter_base=adapter_base(start))
    else:
        inputs = StageInputs(start=start.artifact_path if start else "", sources=folders, merge_base=base,
                             seed=cfg.seed)

    def merge(tmp: Path) -> StageResult:
        result = stage.run(inputs, tmp)
        result.info.update(stage_id=stage_id or "merge")
        return result

    return _record(version, merge, fingerprint)


def run_planned(cfg: PipelineConfig, plan: PlannedStage, data: StageResult | None, config_dir: Path,
                flow_run_id: str | None = None, reuse: bool = False) -> registry.Version:
    """Run a planned stage: prepare its own data, register a local teacher, then train, distill or merge.

    `data` is the config's prepared top-level data. With `reuse`, a ready version made from the same inputs (the
    plan's fingerprint) is returned instead of training again; either way the version records its fingerprint.
    """
    stage: Stage = cfg.stages[plan.index]
    if reuse and (found := registry.find_fingerprint(cfg.name, plan.fingerprint)):
        return registry.get_version(found).as_reused()
    if plan.data_from == "stage":
        data = run_prep(cfg, config_dir, registry.get_version(plan.base).artifact_path, stage.data)
    elif plan.data_from == "pairs":
        data = StageResult(stage="prep", artifact_path=plan.data, metrics={}, info=load_prepared(plan.data)[0])
    elif plan.data_from == "none":
        data = None
    if data is not None and data.info["data_hash"] != plan.data_hash:
        raise TuneryError(f"stage {plan.stage_id}: its data changed between planning and running; run again")
    start = registry.get_version(plan.start)
    if isinstance(stage, MergeStage):
        sources = [registry.get_version(v) for v in plan.sources]
        merge_base = registry.get_version(plan.merge_base) if plan.merge_base else None
        return run_merge(cfg, stage, start, sources, merge_base, plan.stage_id, flow_run_id, plan.fingerprint)
    if plan.teacher is not None:
        return run_distill(cfg, stage, start, teacher_version(plan.teacher), data, plan.stage_id, flow_run_id,
                           plan.fingerprint)
    return run_train(cfg, stage, start, data, plan.stage_id, flow_run_id, plan.fingerprint)


def run_stage(cfg: PipelineConfig, index: int, done: dict[str, registry.Version], previous: registry.Version,
              data: StageResult | None, config_dir: Path, flow_run_id: str | None = None,
              reuse: bool = False) -> registry.Version:
    """Plan stage `index` of the config (flows.plan.plan_stage) and run it."""
    plan = plan_stage(cfg, index, done, previous, data, config_dir)
    return run_planned(cfg, plan, data, config_dir, flow_run_id, reuse)


def run_eval(version: registry.Version, data: StageResult, eval_cfg: EvalConfig) -> dict[str, float]:
    """Measure a registered version on the prepared data's validation split and record the metrics."""
    if version.status != "ready":
        raise TuneryError(f"{version.version} is {version.status}; only ready versions can be evaluated")
    if version.adapter:
        result = evaluate(adapter_base(version), data.artifact_path, eval_cfg, adapter=version.artifact_path)
    else:
        result = evaluate(version.artifact_path, data.artifact_path, eval_cfg)
    measured_on = data.info["data_hash"]
    metrics = {**result.metrics, **forgetting(version, result.metrics.get("general_accuracy"), measured_on)}
    registry.record_metrics(version.version, metrics, eval_data_hash=measured_on)
    registry.record_samples(version.version, result.info.get("samples", []), eval_data_hash=measured_on)
    registry.record_answers(version.version, "hf", result.info.get("answers", []), eval_data_hash=measured_on)
    if eval_cfg.judge is not None:
        judged = run_judge(version, eval_cfg.judge, measured_on)
        registry.record_metrics(version.version, judged, eval_data_hash=measured_on)
        metrics.update(judged)
    return metrics


def run_judge(version: registry.Version, cfg, eval_data_hash: str) -> dict[str, float]:
    """The judge's verdicts on the version's held-out answers against its first parent's (tasks.judge), recorded;
    returns the `judge_*` rates (nothing when it has no parent or the parent has no answers on this data)."""
    from tasks.judge import rates
    from tasks.judge import run_judge as judge

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
    from tasks.general import drop_points

    if not version.parents or accuracy is None:
        return {}
    parent = registry.get_version(version.parents[0], eval_data_hash).metrics
    drop = drop_points(parent.get("general_accuracy"), accuracy)
    return {} if drop is None else {"general_drop_pct": drop, "general_accuracy_parent": parent["general_accuracy"]}


def _reason(e: BaseException) -> str:
    if isinstance(e, TuneryError):
        return str(e)
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    return "".join(traceback.format_exception_only(type(e), e)).strip()
