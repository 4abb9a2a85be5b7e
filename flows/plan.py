"""Plan a stage before running it: what it starts from, reads and trains on, and the fingerprint of all of it.

`plan_stage` has no side effects: it reads the config, the registry and the data files, and writes nothing (no
prepared dataset, no registered teacher, no row). The flow computes the plan once, uses its fingerprint as the
Prefect cache key, and hands the plan to the task that runs it (`flows.steps.run_planned`).

The fingerprint covers everything that changes a stage's result: its settings, the hash of the data it trains
on, the versions it starts from, merges or learns from (a local teacher folder by its path), the seed, the device
actually used, the source of every module that computes a result (`tasks/`, `metrics/`, `flows/steps.py`), the
versions of the libraries that do (RESULT_LIBRARIES), and the registry it is recorded in.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
from pathlib import Path
from typing import Any

import registry
from core.errors import TuneryError
from core.files import sha256_json
from flows.config import BASE_REF, PipelineConfig
from tasks.catalogue import DISTILL
from tasks.common import StageResult, resolve_device
from tasks.dpo import DpoStage
from tasks.merge import NEEDS_BASE, MergeStage
from tasks.prep import load_prepared, prepare
from tasks.stage import is_path

ROOT = Path(__file__).resolve().parent.parent
# The libraries whose versions change what a stage or an evaluation computes.
RESULT_LIBRARIES = ("torch", "transformers", "peft", "trl", "mergekit", "llama_cpp_python", "accelerate",
                    "datasets", "tokenizers")


def source_digest(root: Path = ROOT, libraries: tuple[str, ...] = RESULT_LIBRARIES) -> str:
    """A hash of the source under root's tasks/ and metrics/ (and flows/steps.py), and of the library versions."""
    from importlib.metadata import PackageNotFoundError, version

    digest = hashlib.sha256()
    for path in sorted([*(root / "tasks").rglob("*.py"), *(root / "metrics").rglob("*.py"),
                        *[p for p in [root / "flows" / "steps.py"] if p.exists()]]):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    for name in libraries:
        try:
            digest.update(f"{name}=={version(name)}\n".encode())
        except PackageNotFoundError:
            digest.update(f"{name} absent\n".encode())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """This checkout's source_digest: a change to the code or the libraries re-runs stages and evaluations."""
    return source_digest()


@dataclasses.dataclass(frozen=True)
class PlannedStage:
    """What one stage of a config will do, worked out once. Versions are `NAME:N`; a teacher given as a local
    folder is `folder:<path>` (registered when the stage runs). `data` is the prepared folder the stage trains on
    (content-addressed: it may not be written yet), `data_from` says where it comes from."""

    index: int
    kind: str
    stage_id: str
    base: str
    start: str
    sources: tuple[str, ...] = ()
    merge_base: str | None = None
    teacher: str | None = None
    data: str | None = None
    data_hash: str | None = None
    data_from: str = "none"  # config (the top-level data), stage (its own `data:`), pairs (pairs_from), none
    device: str = "cpu"
    fingerprint: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_ref(ref: str, done: dict[str, registry.Version]) -> registry.Version:
    """A stage reference: 'base', an earlier stage's id (from `done`), or a registered version NAME:N / NAME."""
    version = done[ref] if ref in done else registry.get_version(ref)
    if version.status != "ready":
        raise TuneryError(f"{version.version} is {version.status}; only ready versions can be used")
    return version


def _data(cfg: PipelineConfig, index: int, done: dict[str, registry.Version], data: StageResult | None,
          config_dir: Path) -> tuple[str, StageResult | None]:
    """Where stage `index`'s training data comes from and what it is (its own `data` is read and hashed, not
    written): its own `data`, else the config's (a merge, or a distill stage given `prompts`, takes none; a dpo
    stage with `pairs_from` the pairs a distill-model stage wrote)."""
    stage = cfg.stages[index]
    if stage.data_kind is None or (stage.stage in DISTILL and stage.prompts):
        return "none", None
    if isinstance(stage, DpoStage) and stage.pairs_from:
        path = done[stage.pairs_from].preference_pairs
        if not path:
            raise TuneryError(f"stage {cfg.stage_id(index)}: pairs_from {stage.pairs_from!r} wrote no preference "
                              "pairs; give that distill-model stage `preference_pairs: true`")
        return "pairs", StageResult(stage="prep", artifact_path=path, metrics={}, info=load_prepared(path)[0])
    if stage.data is not None:
        return "stage", prepare(stage.data, config_dir, tokenizer_path=done[BASE_REF].artifact_path, write=False)
    return "config", data


def stage_data(cfg: PipelineConfig, index: int, done: dict[str, registry.Version], data: StageResult | None,
               config_dir: Path) -> StageResult | None:
    """The data stage `index` trains on, as planned (see _data)."""
    return _data(cfg, index, done, data, config_dir)[1]


def _teacher(stage, done: dict[str, registry.Version], start: registry.Version, config_dir: Path) -> str | None:
    if stage.stage not in DISTILL:
        return None
    if not stage.teacher:
        return start.version
    if not is_path(stage.teacher):
        return resolve_ref(stage.teacher, done).version
    folder = (config_dir / stage.teacher).resolve()
    if not folder.is_dir():
        raise TuneryError(f"teacher {stage.teacher}: no such model folder ({folder})")
    return f"folder:{folder}"


def plan_stage(cfg: PipelineConfig, index: int, done: dict[str, registry.Version], previous: registry.Version,
               data: StageResult | None, config_dir: Path) -> PlannedStage:
    """Plan stage `index` of the config: `done` maps stage ids (and 'base') to their versions, `previous` is the
    version the stage starts from unless it names one, `data` the config's prepared top-level data."""
    stage = cfg.stages[index]
    start = resolve_ref(stage.from_, done) if stage.from_ else previous
    sources: tuple[str, ...] = ()
    merge_base = teacher = None
    if isinstance(stage, MergeStage):
        sources = tuple(resolve_ref(ref, done).version for ref in stage.sources)
        if stage.method in NEEDS_BASE:
            merge_base = resolve_ref(stage.base or BASE_REF, done).version
    else:
        teacher = _teacher(stage, done, start, config_dir)
    data_from, trains_on = _data(cfg, index, done, data, config_dir)
    device = resolve_device(cfg.device)
    inputs: dict[str, Any] = {
        "name": cfg.name, "stage": stage.model_dump(mode="json", exclude={"data", "id", "from_"}),
        "data": trains_on.info["data_hash"] if trains_on is not None else None, "start": start.version,
        "seed": cfg.seed, "device": device, "code": code_version(), "registry": registry.instance_id(),
    }
    if isinstance(stage, MergeStage):
        inputs["sources"] = list(sources)
        if merge_base is not None:
            inputs["base"] = merge_base
    if teacher is not None:
        inputs["teacher"] = teacher
    return PlannedStage(
        index=index, kind=stage.stage, stage_id=cfg.stage_id(index), base=done[BASE_REF].version,
        start=start.version, sources=sources,
        merge_base=merge_base, teacher=teacher, data=trains_on.artifact_path if trains_on else None,
        data_hash=trains_on.info["data_hash"] if trains_on else None, data_from=data_from, device=device,
        fingerprint=sha256_json(inputs))
