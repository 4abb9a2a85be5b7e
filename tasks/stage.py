"""What every YAML stage shares, and what a stage is handed when it runs.

A stage kind is one class in its own `tasks/<kind>.py`: its fields (the YAML keys, with help text) on top of
`StageFields`, three class attributes, and `run(inputs, out_dir) -> StageResult`. `tasks/catalogue.py` maps each
kind to its class; the config, the CLI commands, the multi-process launcher and the flow all read that map.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from tasks.common import StageResult
from tasks.prep import PrepConfig


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


class StageFields(BaseModel):
    """Where a stage sits in the chain: its id, what it starts from, and its own data."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    # The YAML `stage:` word, the kind of prepared data it trains on (None: it takes none), and one line for
    # its CLI command's help.
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

    def hyperparameters(self) -> dict[str, Any]:
        return self.model_dump(exclude={"id", "from_", "data", "stage"})

    def references(self) -> list[str]:
        """The stage ids or versions this stage reads from."""
        return [self.from_] if self.from_ else []

    def run(self, inputs: StageInputs, out_dir: Path) -> StageResult:
        raise NotImplementedError


class TrainingStage(StageFields):
    """A stage that trains with its kind's `trainer` (train_cpt, train_sft, ...), on one process or, with
    `processes` > 1, under `accelerate launch` (tasks.launched)."""

    # The kind's trainer: (config, start folder, data folder, out_dir, device, seed, checkpoints) -> StageResult.
    trainer: ClassVar[Callable[..., StageResult]]

    def train(self, start: str, data: str, out_dir: Path, device: str, seed: int,
              checkpoints: str | None = None) -> StageResult:
        return self.trainer(self, start, data, out_dir, device, seed, checkpoints)

    def run(self, inputs: StageInputs, out_dir: Path) -> StageResult:
        if getattr(self, "processes", 1) > 1:
            from tasks.launched import launch

            return launch(self.kind, self, inputs.start, inputs.data, out_dir, inputs.device, inputs.seed,
                          inputs.checkpoints)
        return self.train(inputs.start, inputs.data, out_dir, inputs.device, inputs.seed, inputs.checkpoints)
