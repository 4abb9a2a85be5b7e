"""The pipeline config: one YAML file, validated; an unknown key is an error naming the key and the file."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core import metrics as metric_catalogue
from core.errors import TuneryError, check_name
from core.files import read_utf8
from tasks.data.prep import PrepConfig
from tasks.evaluate.evaluation import EvalConfig
from tasks.export.settings import ExportConfig, GateConfig
from tasks.stages.catalogue import STAGES, TRAINING, Stage
from tasks.stages.sft import SftStage

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
BASE_REF = "base"


class SweepRange(BaseModel):
    """A numeric range to search: integers when low, high (and step) are integers, else floats."""

    model_config = ConfigDict(extra="forbid")

    low: float | int
    high: float | int
    log: bool = Field(False, description="Search the logarithm evenly (learning rates).")
    step: float | int | None = None

    @model_validator(mode="after")
    def _ordered(self) -> "SweepRange":
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("a log range takes no step (Optuna samples it continuously)")
        return self


class SweepConfig(BaseModel):
    """`sweep:` of a config: the settings `tunery sweep` varies (dotted keys as in error messages, e.g.
    `stages[0].learning_rate`), each a range or a list of choices, and the trial budget Optuna spends on them."""

    model_config = ConfigDict(extra="forbid")

    parameters: dict[str, SweepRange | list[Any]] = Field(min_length=1)
    metric: str | None = Field(None, description="The metric that picks the best trial; default: the config's "
                                                 "`metric`. A metric a stage measures counts too.")
    direction: Literal["minimize", "maximize"] | None = Field(
        None, description="Default: the metric's direction in the catalogue (perplexity is minimized, answer_f1 "
                          "maximized, ...).")
    trials: int = Field(8, ge=1, description="How many trials to run.")
    parallel: int = Field(1, ge=1, description="Trials asked for at once (at most the workers that can run them).")
    sampler: Literal["tpe", "random"] = "tpe"
    seed: int = 42


class PipelineConfig(BaseModel):
    """base -> prep -> the stages in order (each starting from the previous one's version) -> eval of each."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Registry name of the trained models; versions become NAME:1, NAME:2, ...")
    base_model: str = Field("default", description="'default' (packaged SmolLM2-135M-Instruct), a local HF folder "
                                                     "with safetensors, or a hub id where a hub is reachable.")
    base_name: str | None = Field(None, description="Registry name of the base model; defaults to its folder name.")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="auto: cuda, then mps, then cpu.")
    seed: int = Field(42, description="Seeds training (weights init of adapters, data order) and merges.")
    data: PrepConfig = Field(description="The data stages train on unless they name their own, and the held-out "
                                         "split every version is evaluated on.")
    stages: list[Stage] = Field(default_factory=lambda: [SftStage(stage="sft")], min_length=1,
                                description="cpt, sft, dpo, merge, distill-prompt and distill-model "
                                            "stages, run in order.")
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig, description="GGUF + Modelfile settings for "
                                                                         "`tunery export` and `tunery promote`.")
    promote: GateConfig | None = Field(None, description="When set, `tunery run` ends by promoting its best "
                                                         "version through this gate.")
    sweep: SweepConfig | None = Field(None, description="What `tunery sweep` searches when given no --set: ranges "
                                                        "and choices of settings, searched by Optuna.")
    metric: str = Field("perplexity", description="The metric that ranks versions: the best version a run "
                                                  "promotes, and a sweep's best trial unless `sweep.metric` says "
                                                  "otherwise. Any metric of the catalogue (core/metrics.py) with a "
                                                  "better direction, measured on the held-out data.")

    @field_validator("metric")
    @classmethod
    def _rankable(cls, v: str) -> str:
        return metric_catalogue.check_rankable(v, "metric")

    @field_validator("name", "base_name")
    @classmethod
    def _valid_name(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                check_name(v)
            except TuneryError as e:
                raise ValueError(str(e)) from None
        return v

    @model_validator(mode="after")
    def _references(self) -> "PipelineConfig":
        """Ids are unique, and a reference to a stage points to an earlier one."""
        ids = [self.stage_id(i) for i in range(len(self.stages))]
        for i, sid in enumerate(ids):
            if sid == BASE_REF or ids.index(sid) != i:
                raise ValueError(f"stages[{i}]: id {sid!r} is taken; give this stage a unique `id`")
            for ref in self.stages[i].references():
                if ref in ids[i:]:
                    raise ValueError(f"stages[{i}]: {ref!r} is not an earlier stage; a stage can only use the "
                                     "results of stages before it")
        return self

    def stage_id(self, index: int) -> str:
        stage = self.stages[index]
        return stage.id or stage.stage

    def eval_config(self) -> EvalConfig:
        """The eval settings, with max_length following training's (its longest) unless set explicitly."""
        if "max_length" in self.eval.model_fields_set:
            return self.eval
        lengths = [s.max_length for s in self.stages if s.stage in TRAINING]
        return self.eval.model_copy(update={"max_length": max(lengths)}) if lengths else self.eval


def load_config(path: str | Path) -> tuple[PipelineConfig, Path]:
    """Read and validate a pipeline YAML; return it with the folder its relative paths are resolved against.

    Raises TuneryError naming the file and, for each problem, the dotted key (`sft.learning_rate`).
    """
    return validate_config(read_raw(path), Path(path))


def read_raw(path: str | Path) -> dict[str, Any]:
    """A config file's settings as written (a mapping), before validation (`tunery sweep` changes a few)."""
    path = Path(path)
    if not path.is_file():
        raise TuneryError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(read_utf8(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise TuneryError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise TuneryError(f"{path}: expected a mapping of settings at the top level")
    return raw


def validate_config(raw: dict[str, Any], path: Path) -> tuple[PipelineConfig, Path]:
    """Validate settings read from `path` (see load_config)."""
    path = Path(path)
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise TuneryError(f"{path}: " + "; ".join(_describe(err) for err in e.errors())) from None
    if cfg.eval.general not in (None, "default"):
        from tasks.evaluate.general import load_suite

        suite = Path(cfg.eval.general)
        cfg.eval.general = str(suite if suite.is_absolute() else path.resolve().parent / suite)
        try:
            load_suite(cfg.eval.general)  # a bad item is named now, before anything trains
        except TuneryError as e:
            raise TuneryError(f"{path}: eval.general: {e}") from None
    judge = cfg.eval.judge
    if judge is not None and judge.kind == "gguf":
        found = Path(judge.model) if Path(judge.model).is_absolute() else path.resolve().parent / judge.model
        if not found.is_file():
            raise TuneryError(f"{path}: eval.judge: {found}: no such GGUF file")
        judge.model = str(found)
    # The contamination checks compare the training rows with the suite the versions are scored on.
    for prep in [cfg.data] + [getattr(s, "data", None) for s in cfg.stages]:
        if isinstance(prep, PrepConfig) and "general" not in prep.contamination.model_fields_set:
            prep.contamination.general = cfg.eval.general
    return cfg, path.resolve().parent


def _describe(err: dict[str, Any]) -> str:
    loc = _user_loc(err["loc"])
    key = ".".join(str(part) for part in loc).replace(".[", "[")
    if err["type"] == "extra_forbidden":
        parent = _model_at(err["loc"][:-1])
        hint = ""
        if parent is not None:
            names = [f.alias or n for n, f in parent.model_fields.items()]
            close = difflib.get_close_matches(str(err["loc"][-1]), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown key '{key}'{hint}"
    if err["type"] == "missing":
        return f"missing required key '{key}'"
    if err["type"] in ("union_tag_not_found", "union_tag_invalid"):
        return f"{key}: needs `stage:` one of {', '.join(STAGES)}"
    message = err["msg"].removeprefix("Value error, ")
    return f"{key}: {message}" if key else message


def _user_loc(loc: tuple) -> list:
    """('stages', 0, 'sft', 'lora', 'r') -> ['stages', '[0]', 'lora', 'r']: drop the union tag users never wrote."""
    out: list = []
    skip_tag = False
    for part in loc:
        if skip_tag:
            skip_tag = False
            if part in STAGES:
                continue
        if isinstance(part, int):
            out.append(f"[{part}]")
            skip_tag = out[-2:-1] == ["stages"]
        else:
            out.append(part)
    return out


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: Any = PipelineConfig
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        if model is PipelineConfig and part == "stages" and len(parts) >= 2 and parts[1] in STAGES:
            model = STAGES[parts[1]]
            parts = parts[2:]
            continue
        fields = model.model_fields if isinstance(model, type) and issubclass(model, BaseModel) else {}
        field = fields.get(str(part)) or next((f for f in fields.values() if f.alias == part), None)
        if field is None:
            return None
        model = field.annotation
        if getattr(model, "__origin__", None) is Union or type(model).__name__ == "UnionType":
            model = next((a for a in model.__args__ if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None
