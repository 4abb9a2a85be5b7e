"""The pipeline config: one YAML file, validated; an unknown key is an error naming the key and the file."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tasks.common import TuneryError, check_name
from tasks.evaluation import EvalConfig
from tasks.prep import PrepConfig
from tasks.sft import SftConfig

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


class PipelineConfig(BaseModel):
    """prep -> (register + eval base) -> sft -> eval, for one model name."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Registry name of the fine-tuned model; versions become NAME:1, NAME:2, ...")
    base_model: str = Field("default", description="'default' (packaged SmolLM2-135M-Instruct), a local HF folder "
                                                     "with safetensors, or a hub id where a hub is reachable.")
    base_name: str | None = Field(None, description="Registry name of the base model; defaults to its folder name.")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="auto: cuda, then mps, then cpu.")
    seed: int = Field(42, description="Seeds training (weights init of adapters, data order).")
    data: PrepConfig
    sft: SftConfig = Field(default_factory=SftConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @field_validator("name", "base_name")
    @classmethod
    def _valid_name(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                check_name(v)
            except TuneryError as e:
                raise ValueError(str(e)) from None
        return v

    def eval_config(self) -> EvalConfig:
        """The eval settings, with max_length following training's unless set explicitly."""
        if "max_length" in self.eval.model_fields_set:
            return self.eval
        return self.eval.model_copy(update={"max_length": self.sft.max_length})


def load_config(path: str | Path) -> tuple[PipelineConfig, Path]:
    """Read and validate a pipeline YAML; return it with the folder its relative paths are resolved against.

    Raises TuneryError naming the file and, for each problem, the dotted key (`sft.learning_rate`).
    """
    path = Path(path)
    if not path.is_file():
        raise TuneryError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise TuneryError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise TuneryError(f"{path}: expected a mapping of settings at the top level")
    try:
        return PipelineConfig.model_validate(raw), path.resolve().parent
    except ValidationError as e:
        raise TuneryError(f"{path}: " + "; ".join(_describe(err) for err in e.errors())) from None


def _describe(err: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in err["loc"])
    if err["type"] == "extra_forbidden":
        parent = _model_at(err["loc"][:-1])
        hint = ""
        if parent is not None:
            close = difflib.get_close_matches(str(err["loc"][-1]), list(parent.model_fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown key '{key}'{hint}"
    if err["type"] == "missing":
        return f"missing required key '{key}'"
    message = err["msg"].removeprefix("Value error, ")
    return f"{key}: {message}" if key else message


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: Any = PipelineConfig
    for part in loc:
        field = model.model_fields.get(str(part)) if isinstance(model, type) else None
        if field is None:
            return None
        model = field.annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None
