"""The two distill stage kinds: a teacher (planned like any version it reads) answers, the student trains with sft
on its answers, and its measurements against the teacher are the kind's own (`measure`)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar, Literal

from core.errors import TuneryError
from core.home import datasets_dir
from tasks.common import StageResult
from tasks.data.prep import PreparedData
from tasks.stages.distill.measure import distill_metrics
from tasks.stages.distill.settings import DistillModelConfig, DistillPromptConfig
from tasks.stages.distill.teacher import ask
from tasks.stages.sft import SftStage, train_sft
from tasks.stages.stage import Job, StageInputs, StagePlan, TrainingStage, is_path


class DistillStage(TrainingStage):
    """What the two distill stages share: a teacher to answer, a student trained with sft on its answers."""

    data_kind: ClassVar[str | None] = "chat"

    def references(self) -> list[str]:
        teacher = getattr(self, "teacher", None)
        return super().references() + ([teacher] if teacher and not is_path(teacher) else [])

    def plan(self, planner) -> StagePlan:
        """The teacher: the start model unless named (a local folder by its resolved path); no data with `prompts`."""
        data_from = "none" if self.prompts else super().plan(planner).data_from
        return StagePlan(refs={"teacher": (self._teacher(planner),)}, data_from=data_from)

    def _teacher(self, planner) -> str:
        if not self.teacher:
            return planner.start.version
        if not is_path(self.teacher):
            return planner.resolve(self.teacher).version
        folder = (planner.config_dir / self.teacher).resolve()
        if not folder.is_dir():
            raise TuneryError(f"teacher {self.teacher}: no such model folder ({folder})")
        return f"folder:{folder}"

    def prepare(self, plan: Any, data: PreparedData | None, ctx: Any, teacher: Any = None) -> Job:
        """Ask the teacher first (its answers are the student's data), then train from the start on them."""
        teacher = ctx.version(plan.refs["teacher"][0])
        dataset, pairs, info = ask(self, plan.stage_id, ctx.version(plan.start), teacher, data, ctx)
        job = super().prepare(plan, dataset, ctx, teacher=teacher)
        return dataclasses.replace(job, preference_pairs=pairs, info={**job.info, **info})

    def run(self, inputs: StageInputs, out_dir: Path) -> StageResult:
        """Train the student from the start on the teacher's answers (`inputs.data`) with sft."""
        if self.processes > 1:
            from tasks.train.launched import launch

            return launch(self, inputs.start, inputs.data, out_dir, inputs.device, inputs.seed, inputs.checkpoints,
                          trainer=SftStage)
        return train_sft(self, inputs.start, inputs.data, out_dir, inputs.device, inputs.seed, inputs.checkpoints)

    def measure(self, version: Any, ctx: Any) -> dict[str, float]:
        """The student against its teacher and its start on the held-out teacher answers (`distill_*` metrics)."""
        start = ctx.version(version.parents[0])
        teacher = ctx.folder(ctx.version(version.teacher))
        dataset = str(datasets_dir() / version.data_hash[:16])
        student = version.artifact_path
        return distill_metrics(self, teacher, ctx.folder(start), student, dataset, ctx.device,
                               adapter=version.adapter)


class DistillPromptStage(DistillStage, DistillPromptConfig):
    """A `distill-prompt` stage of a pipeline config."""

    summary: ClassVar[str] = ("Bake a long system prompt into the weights: the teacher answers with it, the student "
                              "learns without it.")
    stage: Literal["distill-prompt"] = "distill-prompt"


class DistillModelStage(DistillStage, DistillModelConfig):
    """A `distill-model` stage of a pipeline config."""

    summary: ClassVar[str] = ("Teach a smaller student (the stage's start) to answer the data's prompts like a bigger "
                              "teacher.")
    stage: Literal["distill-model"] = "distill-model"
