"""Plan a stage before running it: what it starts from, reads and trains on, and the fingerprint of all of it.

`plan_stage` has no side effects: it reads the config, the registry and the data files, and writes nothing (no
prepared dataset, no registered teacher, no row). The stage itself says what it reads beyond its start and where
its data comes from (its `plan` hook, tasks/stages/stage.py); this module knows no stage kind. The flow computes the
plan once, uses its fingerprint as the Prefect cache key, and hands the plan to the task that runs it
(`flows.run.run_planned`).

The fingerprint covers everything that changes a stage's result: its settings, the hash of the data it trains
on, the versions it starts from and reads (merge sources, a teacher; a local teacher folder by its path), the seed,
the device actually used, the training code (`training_code_version`), the versions of the libraries that compute
a result (RESULT_LIBRARIES), and the registry it is recorded in. Measuring code (MEASURING) is left out: a change
there re-measures versions (the evaluation's cache key holds all the code, `code_version`), it does not retrain.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
from pathlib import Path
from typing import Any

import registry
from core.errors import TuneryError
from core.files import sha256_json
from flows.config import BASE_REF, PipelineConfig
from tasks.common import resolve_device
from tasks.data.prep import PreparedData, prepare
from tasks.stages.stage import StagePlan

ROOT = Path(__file__).resolve().parent.parent
# The libraries whose versions change what a stage or an evaluation computes.
RESULT_LIBRARIES = ("torch", "transformers", "peft", "trl", "mergekit", "llama_cpp_python", "accelerate",
                    "datasets", "tokenizers")


# What only measures a result: the evaluation room (perplexity, answers, scores, the suite, the judge), a kind's own
# measurements (distill) and the metric modules. Left out of the training fingerprint.
MEASURING = ("tasks/evaluate/", "tasks/stages/distill/measure.py", "metrics/")
# The flow code that runs a stage and what it reads (the rest of flows/ only wires, plans and shows).
RUNNING = ("flows/run.py", "flows/inputs.py")


def source_digest(root: Path = ROOT, libraries: tuple[str, ...] = RESULT_LIBRARIES,
                  exclude: tuple[str, ...] = ()) -> str:
    """A hash of the source under root's tasks/ and metrics/ (and the flow code that runs stages), less the paths
    that start with one of `exclude`, and of the library versions."""
    digest = hashlib.sha256()
    for path in sorted([*(root / "tasks").rglob("*.py"), *(root / "metrics").rglob("*.py"),
                        *[root / p for p in RUNNING if (root / p).exists()]]):
        name = path.relative_to(root).as_posix()
        if not (exclude and name.startswith(exclude)):
            digest.update(name.encode() + b"\0" + path.read_bytes())
    for name in libraries:
        try:
            digest.update(f"{name}=={importlib.metadata.version(name)}\n".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{name} absent\n".encode())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """This checkout's source_digest: a change to any code or library re-runs evaluations (and measurements)."""
    return source_digest()


@functools.lru_cache(maxsize=1)
def training_code_version() -> str:
    """The digest of the code that trains (all but MEASURING): a change to it re-runs stages."""
    return source_digest(exclude=MEASURING)


@dataclasses.dataclass(frozen=True)
class PlannedStage:
    """What one stage of a config will do, worked out once. Versions are `NAME:N`; `refs` holds the versions the
    stage reads beyond its start, by role (a teacher given as a local folder is `folder:<path>`, registered when the
    stage runs). `data` is the prepared folder the stage trains on (content-addressed: it may not be written yet),
    `data_from` says where it comes from."""

    index: int
    kind: str
    stage_id: str
    base: str
    start: str
    refs: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    data: str | None = None
    data_hash: str | None = None
    data_from: str = "none"  # config (the top-level data), stage (its own `data:`), pairs (an earlier stage's), none
    device: str = "cpu"
    fingerprint: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_ref(ref: str, done: dict[str, registry.Version]) -> registry.Version:
    """A stage reference: 'base', an earlier stage's id (from `done`), or a registered version NAME:N / NAME."""
    found = done[ref] if ref in done else registry.get_version(ref)
    if found.status != "ready":
        raise TuneryError(f"{found.version} is {found.status}; only ready versions can be used")
    return found


@dataclasses.dataclass(frozen=True)
class Planner:
    """What a stage's `plan` hook may ask (tasks.stages.stage.Planner): references resolved, nothing written."""

    config_dir: Path
    start: registry.Version
    base: registry.Version
    done: dict[str, registry.Version]

    def resolve(self, ref: str) -> registry.Version:
        return resolve_ref(ref, self.done)


def trained_on(stage, own: StagePlan, data: PreparedData | None, config_dir: Path, base_path: str | None
               ) -> PreparedData | None:
    """The data a stage trains on, as its plan says: the config's prepared data, its own `data:` (read and hashed,
    not written), a prepared folder an earlier stage wrote, or none."""
    if own.data_from == "none":
        return None
    if own.data_from == "pairs":
        return PreparedData.load(own.data)
    if own.data_from == "stage":
        return prepare(stage.data, config_dir, tokenizer_path=base_path, write=False)
    return data


def _own(cfg: PipelineConfig, index: int, done: dict[str, registry.Version], previous: registry.Version | None,
         config_dir: Path) -> tuple[registry.Version | None, StagePlan]:
    stage = cfg.stages[index]
    start = resolve_ref(stage.from_, done) if stage.from_ else previous
    return start, stage.plan(Planner(config_dir, start, done.get(BASE_REF), done))


def stage_data(cfg: PipelineConfig, index: int, done: dict[str, registry.Version], data: PreparedData | None,
               config_dir: Path, previous: registry.Version | None = None) -> PreparedData | None:
    """The data stage `index` trains on, as planned."""
    _, own = _own(cfg, index, done, previous, config_dir)
    base = done.get(BASE_REF)
    return trained_on(cfg.stages[index], own, data, config_dir, base.artifact_path if base else None)


def plan_stage(cfg: PipelineConfig, index: int, done: dict[str, registry.Version], previous: registry.Version,
               data: PreparedData | None, config_dir: Path) -> PlannedStage:
    """Plan stage `index` of the config: `done` maps stage ids (and 'base') to their versions, `previous` is the
    version the stage starts from unless it names one, `data` the config's prepared top-level data."""
    stage = cfg.stages[index]
    start, own = _own(cfg, index, done, previous, config_dir)
    trains_on = trained_on(stage, own, data, config_dir, done[BASE_REF].artifact_path)
    device = resolve_device(cfg.device)
    data_hash = trains_on.data_hash if trains_on is not None else None
    inputs: dict[str, Any] = {
        "name": cfg.name, "stage": stage.model_dump(mode="json", exclude={"data", "id", "from_"}),
        "data": data_hash, "start": start.version, "seed": cfg.seed, "device": device,
        "code": training_code_version(), "registry": registry.instance_id(), **own.refs}
    return PlannedStage(
        index=index, kind=stage.stage, stage_id=cfg.stage_id(index), base=done[BASE_REF].version,
        start=start.version, refs=dict(own.refs), data=trains_on.artifact_path if trains_on else None,
        data_hash=data_hash, data_from=own.data_from, device=device, fingerprint=sha256_json(inputs))
