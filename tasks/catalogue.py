"""The stage catalogue: every stage kind a pipeline config may use, by its YAML `stage:` word.

Each kind is one class in its own task module (its fields, `kind`, `data_kind`, `summary` and `run`). The
config's union of stage types, the CLI's single-stage commands, the multi-process launcher, the data kind a stage
needs and the flow's dispatch all come from this map: adding a stage kind is its module and one entry here.
"""
from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from tasks.cpt import CptStage
from tasks.distill import DistillModelStage, DistillPromptStage, DistillStage
from tasks.dpo import DpoStage
from tasks.merge import MergeStage
from tasks.sft import SftStage
from tasks.stage import StageFields, TrainingStage

STAGES: dict[str, type[StageFields]] = {cls.kind: cls for cls in (
    CptStage, SftStage, DpoStage, MergeStage, DistillPromptStage, DistillModelStage)}
Stage = Annotated[Union[tuple(STAGES.values())], Field(discriminator="stage")]
TRAINING = tuple(k for k, cls in STAGES.items() if issubclass(cls, TrainingStage))
DISTILL = tuple(k for k, cls in STAGES.items() if issubclass(cls, DistillStage))
