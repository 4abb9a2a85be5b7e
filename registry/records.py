"""The typed record of a model version, as the registry's readers return it to the CLI, the flows and the dashboard.

The fields the pipeline decides with are columns (migration 006): `fingerprint` (reuse of a stage run), `adapter`
and `quantization` (how to merge it back), `teacher` and `preference_pairs` (distillation). `info` holds what a
stage reported for people to read (VersionInfo lists its keys); no decision reads it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, TypedDict


class VersionInfo(TypedDict, total=False):
    """The keys a stage's report may hold (all optional; shown by `show`, the run summary and the dashboard)."""

    stage_id: str                 # the stage's id in its config (stage name or kind)
    source: str                   # base versions: the model as the config named it
    method: str                   # training: full | lora | qlora | spectrum
    start_folder: str             # the model folder training started from
    health: dict[str, dict]       # training: verdicts of tasks.health (name -> {ok, detail})
    spectrum: dict[str, Any]      # spectrum: the matrices trained and every matrix's score
    merge: str                    # merge: the method
    mergekit_config: str          # merge with mergekit: the config as run
    dataset: str                  # distill: the teacher's answers as a prepared dataset
    teacher_backend: str          # distill: hf | llama.cpp
    teacher_export: str           # distill: the GGUF export the teacher answered through
    teacher_gguf_checks: str      # distill: that export's check status
    teacher_export_skipped: str   # distill: a failed export not used


@dataclass(frozen=True)
class Version:
    """One registered version with its lineage, settings and measurements (see registry.store.list_versions)."""

    version: str                  # NAME:N
    name: str
    number: int
    stage: str                    # base | cpt | sft | dpo | merge | distill-prompt | distill-model
    status: str                   # running | ready | failed
    parents: list[str]
    base_model: str | None
    hyperparameters: dict[str, Any]
    data_hash: str | None         # the data it was trained on
    eval_data_hash: str | None    # the data `metrics` were measured on (its first evaluation's)
    metrics: dict[str, float]     # training figures plus the evaluation on eval_data_hash
    metrics_on_other_data: dict[str, dict[str, float]]
    artifact_path: str | None
    info: dict[str, Any]          # what its stage reported for people to read: the keys of VersionInfo
    samples: list[dict[str, str]]
    error: str | None
    flow_run_id: str | None
    created_at: str
    finished_at: str | None
    fingerprint: str | None = None        # the stage inputs it was made from (flows.plan)
    adapter: bool = False                 # artifact_path is a LoRA adapter on its first parent
    quantization: dict[str, Any] | None = None  # the QuantizationConfig an adapter was trained against
    teacher: str | None = None            # distill: the teacher version
    preference_pairs: str | None = None   # distill-model: the prepared preference pairs it made
    host: str | None = None               # the machine (worker) that made it
    reused: bool = field(default=False, compare=False)  # returned by a run that found it instead of training

    TYPED: ClassVar[tuple[str, ...]] = ("fingerprint", "adapter", "quantization", "teacher", "preference_pairs")

    def json(self) -> dict[str, Any]:
        """The object `--json` prints: every field, with the typed ones also inside `info` under the keys they had
        before they became columns (quantization as `quantization_config`)."""
        out = {k: v for k, v in self.__dict__.items() if k not in self.TYPED and k != "reused"}
        typed = {"fingerprint": self.fingerprint, "adapter": self.adapter, "quantization_config": self.quantization,
                 "teacher": self.teacher, "preference_pairs": self.preference_pairs}
        out["info"] = {**self.info, **{k: v for k, v in typed.items() if v is not None}}
        if self.reused:
            out["reused"] = True
        return out

    def as_reused(self) -> "Version":
        return replace(self, reused=True)
