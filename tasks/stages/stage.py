"""What every YAML stage shares, and the protocol a stage kind implements.

A stage kind is one class in its own module: its fields (the YAML keys, with help text) on top of `StageFields`,
three class attributes (`kind`, `data_kind`, `summary`) and four hooks the flow calls without knowing the kind:

- `references()`: what it needs: the stage ids or versions it reads (checked by the config);
- `plan(planner)`: how it plans: the versions it reads beyond its start (merge sources, a teacher) and where its
  training data comes from; the flow hashes them into the stage's fingerprint;
- `prepare(plan, data, ctx) -> Job` then `run(inputs, out_dir) -> StageResult`: how it runs: `prepare` gathers
  the inputs (checks, a teacher's answers) through the flow's `Context` and says what the new version records
  (parents, hyperparameters); the flow registers the version and calls `run` into its temporary folder;
- `measure(version, ctx)`: what it measures about its result beyond the evaluation every version gets (a
  distilled student against its teacher); keyed by the measuring code, so a change there re-measures, not retrains.

`tasks/stages/catalogue.py` maps each kind to its class; the config, the CLI commands and the flow read that map.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, Field

from core.errors import TuneryError
from tasks.common import StageResult
from tasks.data.prep import PreparedData, PrepConfig


def is_path(ref: str) -> bool:
    """A reference given as a local model folder rather than a stage id or a registered version."""
    return "/" in ref or ref.startswith(".")


@dataclasses.dataclass(frozen=True)
class StageInputs:
    """Everything a stage's `run` reads, resolved to folders by the flow: the model it starts from, the prepared
    data it trains on, a teacher, merge sources ({version: folder}) and the base they are measured from, where
    an adapter version's base model is (for `merge` with method lora), and the device, seed and checkpoint
    folder."""

    start: str
    data: str | None = None
    teacher: str | None = None
    sources: dict[str, str] = dataclasses.field(default_factory=dict)
    merge_base: tuple[str, str] | None = None
    adapter_base: str | None = None
    quantization: dict[str, Any] | None = None
    device: str = "auto"
    seed: int = 0
    checkpoints: str | None = None


class Planner(Protocol):
    """What a stage may ask while it is planned (flows/plan.py): nothing is written."""

    config_dir: Path
    start: Any  # the version the stage starts from
    base: Any   # the config's base version

    def resolve(self, ref: str) -> Any:
        """A stage id, 'base' or NAME:N as its ready version (`registry.Version`)."""



class Context(Protocol):
    """What a stage may ask of the flow that runs it (flows/run.py implements it over the registry)."""

    device: str
    seed: int
    registry_id: str

    def version(self, ref: str) -> Any:
        """A planned version (`registry.Version`); a local folder (`folder:<path>`) is registered on first use."""

    def folder(self, version: Any) -> str:
        """The version as a complete model folder (an adapter merged into its parent once, then cached)."""

    def adapter_base(self, version: Any) -> str:
        """The model folder an adapter version applies to."""

    def exports(self, version: Any) -> list[Any]:
        """The version's GGUF exports with their checks (`registry.exports.list_exports`)."""

    def record_dataset(self, data: PreparedData) -> None:
        """Remember a dataset the stage generated, like any prepared data."""


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """A stage's own part of its plan: versions it reads beyond its start, by role (`sources`, `merge_base`,
    `teacher`; a local teacher folder as `folder:<path>`), and where its data comes from: `config` (the top-level
    data), `stage` (its own `data:`), `pairs` (a folder an earlier stage wrote, `data`) or `none`."""

    refs: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    data_from: str = "config"
    data: str | None = None


@dataclasses.dataclass(frozen=True)
class Job:
    """What the flow registers and runs for a stage: the new version's parents (its start first), hyperparameters
    and data hash, the typed fields it records, the `run` inputs, and what is added to the version's info."""

    parents: list[Any]
    inputs: StageInputs
    hyperparameters: dict[str, Any]
    data_hash: str | None = None
    teacher: str | None = None
    preference_pairs: str | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


class StageFields(BaseModel):
    """Where a stage sits in the chain: its id, what it starts from, and its own data."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    # The YAML `stage:` word, the kind of prepared data it trains on (None: it takes none), and one line for
    # its CLI command's help (see __pydantic_init_subclass__).
    kind: ClassVar[str]
    data_kind: ClassVar[str | None] = None
    summary: ClassVar[str] = ""

    id: str | None = Field(None, description="How later stages refer to this one (`from`, `sources`); default: "
                                             "the stage kind.")
    from_: str | None = Field(None, alias="from", description="What to start from: an earlier stage's id, 'base', "
                                                             "or a registered version NAME:N; default: the previous "
                                                             "stage's result (the base model for the first stage).")
    data: PrepConfig | None = Field(None, description="This stage's own data (text for cpt, pairs for dpo); default: "
                                                      "the top-level data.")

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        """A kind class names itself once, in its `stage` field's literal: `kind` comes from there, and `summary`
        (its CLI command's help) from the first paragraph of its docstring, unless the class sets them."""
        super().__pydantic_init_subclass__(**kwargs)
        field = cls.model_fields.get("stage")
        if field is not None and "kind" not in cls.__dict__:
            cls.kind = field.default
        if "summary" not in cls.__dict__ and cls.__doc__:
            cls.summary = " ".join(cls.__doc__.strip().split("\n\n")[0].split())

    def hyperparameters(self) -> dict[str, Any]:
        return self.model_dump(exclude={"id", "from_", "data", "stage"})

    def references(self) -> list[str]:
        """The stage ids or versions this stage reads from."""
        return [self.from_] if self.from_ else []

    def plan(self, planner: Planner) -> StagePlan:
        """Its data: none for a kind that takes none, else its own `data:` or the top-level data."""
        if self.data_kind is None:
            return StagePlan(data_from="none")
        return StagePlan(data_from="stage" if self.data is not None else "config")

    def prepare(self, plan: Any, data: PreparedData | None, ctx: Context, teacher: Any = None) -> Job:
        """Start from the planned start on `data` (of the kind's `data_kind`, checked); a teacher
        (distillation) is a parent next to the start."""
        if self.data_kind is not None and data.kind != self.data_kind:
            raise TuneryError(f"stage {plan.stage_id} ({self.kind}) needs {self.data_kind} data, but its data holds "
                              f"{data.kind} examples; give the stage its own `data:`")
        start = ctx.version(plan.start)
        parents, hyperparameters = [start], {self.kind: self.hyperparameters(), "seed": ctx.seed, "device": ctx.device}
        if teacher is not None:
            hyperparameters["teacher"] = teacher.version
            parents.append(teacher)
        start_folder = ctx.folder(start)
        inputs = StageInputs(start=start_folder, data=data.artifact_path if data else None, device=ctx.device,
                             seed=ctx.seed, teacher=ctx.folder(teacher) if teacher is not None else None)
        return Job(parents=parents, inputs=inputs, hyperparameters=hyperparameters,
                   data_hash=data.data_hash if data else None,
                   teacher=teacher.version if teacher is not None else None, info={"start_folder": start_folder})

    def run(self, inputs: StageInputs, out_dir: Path) -> StageResult:
        raise NotImplementedError

    def measure(self, version: Any, ctx: Context) -> dict[str, float]:
        """Metrics of this kind beyond the evaluation every version gets; none by default."""
        return {}


class TrainingStage(StageFields):
    """A stage that trains with its kind's `trainer` (train_cpt, train_sft, ...), on one process or, with
    `processes` > 1, under `accelerate launch` (tasks.train.launched)."""

    # The kind's trainer: (config, start folder, data folder, out_dir, device, seed, checkpoints) -> StageResult.
    trainer: ClassVar[Callable[..., StageResult]]

    def train(self, start: str, data: str, out_dir: Path, device: str, seed: int,
              checkpoints: str | None = None) -> StageResult:
        return self.trainer(self, start, data, out_dir, device, seed, checkpoints)

    def run(self, inputs: StageInputs, out_dir: Path) -> StageResult:
        if getattr(self, "processes", 1) > 1:
            from tasks.train.launched import launch

            return launch(self, inputs.start, inputs.data, out_dir, inputs.device, inputs.seed, inputs.checkpoints)
        return self.train(inputs.start, inputs.data, out_dir, inputs.device, inputs.seed, inputs.checkpoints)
