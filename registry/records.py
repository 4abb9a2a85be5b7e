"""The typed records the registry's readers return to the CLI, the flows and the dashboard: a model `Version`, an
`Export` with its `Check`s, an `Alias`, a `Promotion`, a `Sweep` with its `Trial`s. Each field that is a column of its table says so in its
metadata (`column`); the registry builds its SELECT lists, row mappings and writes from them, so a new column is a
field here plus a numbered migration.

The fields the pipeline decides with are columns (migration 006): `fingerprint` (reuse of a stage run), `adapter`
and `quantization` (how to merge it back), `teacher` and `preference_pairs` (distillation). `info` holds what a
stage reported for people to read (VersionInfo lists its keys); no decision reads it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, TypedDict

from core.home import home_relative, in_home


class VersionInfo(TypedDict, total=False):
    """The keys a stage's report may hold (all optional; shown by `show`, the run summary and the dashboard)."""

    stage_id: str                 # the stage's id in its config (stage name or kind)
    source: str                   # base versions: the model as the config named it
    method: str                   # training: full | lora | qlora | spectrum
    start_folder: str             # the model folder training started from
    health: dict[str, dict]       # training: verdicts of tasks.train.health (name -> {ok, detail})
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


# How a column's value is written (ENCODE) and read back (DECODE), by codec (see `column`).
ENCODE: dict[str | None, Any] = {
    None: lambda v: v, "bool": bool, "path": home_relative, "time": lambda v: v,
    "json": lambda v: json.dumps(v, sort_keys=True) if v is not None else None}
DECODE: dict[str | None, Any] = {
    None: lambda v: v, "bool": bool, "path": in_home, "json": lambda v: json.loads(v) if v is not None else None,
    "time": lambda v: v.isoformat() + "Z" if v is not None else None}


def select_list(record: type) -> str:
    """The record's columns as a SELECT list (names from the record class, never from user text)."""
    return ", ".join(c for _, c, _ in columns(record))


def decode_row(record: type, row: tuple) -> dict[str, Any]:
    """A row of `select_list(record)` as the record's field values."""
    return {f: DECODE[codec](value) for (f, _, codec), value in zip(columns(record), row)}


def encoded(record: Any) -> tuple[list[str], list[Any]]:
    """A record's columns and their stored values, for an INSERT."""
    cols = columns(type(record))
    return [c for _, c, _ in cols], [ENCODE[codec](getattr(record, f)) for f, _, codec in cols]


class Record:
    """A record whose JSON object (`--json`) is its fields as they are."""

    def json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Check(Record):
    """One llama.cpp check of an export: `passed` None for a measurement (a value, no pass or fail)."""

    name: str
    file: str | None
    passed: bool | None
    value: float | None
    detail: str


@dataclass(frozen=True)
class Export:
    """A GGUF export of a version: exports/NAME/TAG with its Modelfile, and the checks llama.cpp ran on it."""

    export_id: str                # NAME/TAG: the folder exports/NAME/TAG (TAG: vN-QUANT)
    version: str
    quant: str
    path: str = field(metadata=column(codec="path"))
    gguf_file: str
    size_bytes: int
    sha256: str
    modelfile: str
    passed: bool                  # every check that can fail passed
    info: dict[str, Any] = field(metadata=column("info_json", "json"))
    created_at: str | None = field(default=None, metadata=column("created_utc", "time"))
    checks: tuple[Check, ...] = field(default=(), metadata=DERIVED)  # export_checks, in the order they ran

    @property
    def gguf(self) -> Path:
        return Path(self.path) / self.gguf_file

    def check(self, name: str) -> Check | None:
        """The last check of that name, or None."""
        found = [c for c in self.checks if c.name == name]
        return found[-1] if found else None

    def json(self) -> dict[str, Any]:
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "checks"},
                "checks": [c.json() for c in self.checks]}


@dataclass(frozen=True)
class Alias(Record):
    """NAME@ALIAS and the version and export it points at."""

    name: str
    alias: str
    version: str
    export_id: str
    updated_at: str = field(metadata=column("updated_utc", "time"))


@dataclass(frozen=True)
class Promotion(Record):
    """One promotion, refused promotion or rollback of NAME@ALIAS, with the holder before it and the gate's record."""

    id: int
    name: str
    alias: str
    action: str                   # promote | refused | rollback
    version: str
    export_id: str | None
    previous_version: str | None
    previous_export_id: str | None
    gate: dict[str, Any] = field(metadata=column("gate_json", "json"))  # thresholds and verdicts
    ollama: str | None
    recorded_at: str = field(metadata=column("recorded_utc", "time"))


@dataclass(frozen=True)
class Trial(Record):
    """One trial of a sweep: the values it set, how it ended, the version it left and its metric."""

    trial: int
    values: dict[str, Any] = field(metadata=column("values_json", "json"))
    status: str                   # running | ready | failed
    version: str | None
    value: float | None           # the sweep's metric on the held-out data
    seconds: float | None
    error: str | None
    host: str | None
    flow_run_id: str | None


@dataclass(frozen=True)
class Sweep:
    """A sweep: what it varied (`space`), the metric it ranks by and in which direction, and its trials."""

    sweep_id: str
    name: str
    config: str
    method: str                   # grid | tpe | random
    metric: str
    direction: str                # minimize | maximize
    space: dict[str, Any] = field(metadata=column("space_json", "json"))
    status: str
    best_trial: int | None
    host: str | None
    created_at: str = field(metadata=column("created_utc", "time"))
    finished_at: str | None = field(metadata=column("finished_utc", "time"))
    trials: tuple[Trial, ...] = field(default=(), metadata=DERIVED)

    def json(self) -> dict[str, Any]:
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "trials"},
                "trials": [t.json() for t in self.trials]}
