"""The typed record of a model version, as the registry's readers return it to the CLI, the flows and the dashboard.

The fields the pipeline decides with are columns (migration 006): `fingerprint` (reuse of a stage run), `adapter`
and `quantization` (how to merge it back), `teacher` and `preference_pairs` (distillation). `info` holds what a
stage reported for people to read (VersionInfo lists its keys); no decision reads it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
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


def column(name: str | None = None, codec: str | None = None) -> dict[str, Any]:
    """A field's place in its table: the column (default: the field's name) and how its value is stored: `json`
    (a JSON text), `path` (relative to TUNERY_HOME when inside it), `time` (a UTC timestamp, ISO text with Z when
    read), `bool`; None: as it is."""
    return {"column": name, "codec": codec}


DERIVED = {"column": False}  # a field read from other tables or computed, not a column of the record's table


@dataclass(frozen=True)
class Version:
    """One registered version with its lineage, settings and measurements (see registry.store.list_versions).

    Each field that is a column of `versions` says so in its metadata (`column`); registry.store builds its SELECT,
    its row mapping and its typed updates from them, so a new column is a field here plus a migration."""

    version: str                  # NAME:N
    name: str
    number: int
    stage: str                    # base | cpt | sft | dpo | merge | distill-prompt | distill-model
    status: str                   # running | ready | failed
    parents: list[str] = field(metadata=DERIVED)  # version_parents, in order (the start first)
    base_model: str | None = field(metadata=column())
    hyperparameters: dict[str, Any] = field(metadata=column("hyperparameters_json", "json"))
    data_hash: str | None = field(metadata=column())          # the data it was trained on
    # the data `metrics` were measured on (its first evaluation's)
    eval_data_hash: str | None = field(metadata=DERIVED)
    metrics: dict[str, float] = field(metadata=DERIVED)  # training figures plus the evaluation on eval_data_hash
    metrics_on_other_data: dict[str, dict[str, float]] = field(metadata=DERIVED)
    artifact_path: str | None = field(metadata=column(codec="path"))
    info: dict[str, Any] = field(metadata=column("info_json", "json"))  # for people to read: VersionInfo's keys
    samples: list[dict[str, str]] = field(metadata=DERIVED)
    error: str | None = field(metadata=column())
    flow_run_id: str | None = field(metadata=column())
    created_at: str = field(metadata=column("created_utc", "time"))
    finished_at: str | None = field(metadata=column("finished_utc", "time"))
    fingerprint: str | None = field(default=None, metadata=column())  # the stage inputs it was made from (flows.plan)
    adapter: bool = field(default=False, metadata=column(codec="bool"))  # a LoRA adapter on its first parent
    # the QuantizationConfig an adapter was trained against
    quantization: dict[str, Any] | None = field(default=None, metadata=column("quantization_json", "json"))
    teacher: str | None = field(default=None, metadata=column())  # distill: the teacher version
    # distill-model: the prepared preference pairs it made
    preference_pairs: str | None = field(default=None, metadata=column(codec="path"))
    host: str | None = field(default=None, metadata=column())  # the machine (worker) that made it
    # returned by a run that found it instead of training
    reused: bool = field(default=False, compare=False, metadata=DERIVED)

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


def columns(record: type) -> list[tuple[str, str, str | None]]:
    """(field, column, codec) of every field of a record class that is a column of its table, in field order."""
    out = []
    for f in fields(record):
        spec = f.metadata if "column" in f.metadata else column()
        if spec["column"] is not False:
            out.append((f.name, spec["column"] or f.name, spec["codec"]))
    return out
