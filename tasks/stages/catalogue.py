"""The stage catalogue: every stage kind a pipeline config may use, by its YAML `stage:` word.

Each kind is one class in its own module (its fields, `stage` literal, `data_kind`, docstring and the protocol of
tasks/stages/stage.py: `references`, `plan`, `prepare`, `run`, `measure`). The config's union of stage types and the
CLI's single-stage commands come from this map, and the flow calls each stage's hooks without knowing its kind:
adding a stage kind is its module and one entry here.
"""
from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from tasks.stages.cpt import CptStage
from tasks.stages.distill.stages import DistillModelStage, DistillPromptStage
from tasks.stages.dpo import DpoStage
from tasks.stages.merge import MergeStage
from tasks.stages.sft import SftStage
from tasks.stages.stage import StageFields, TrainingStage

STAGES: dict[str, type[StageFields]] = {cls.kind: cls for cls in (
    CptStage, SftStage, DpoStage, MergeStage, DistillPromptStage, DistillModelStage)}
Stage = Annotated[Union[tuple(STAGES.values())], Field(discriminator="stage")]
TRAINING = tuple(k for k, cls in STAGES.items() if issubclass(cls, TrainingStage))
