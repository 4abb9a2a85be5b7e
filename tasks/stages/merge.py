"""Stage `merge`: fold a LoRA adapter into its base, or merge several models of one architecture with mergekit.

- `lora`: the adapter's low-rank update is added to the weights it was trained on (peft `merge_and_unload`), giving
  a standalone model that needs no peft at inference. A QLoRA adapter was trained against the 4/8-bit weights, so
  by default it is merged into those weights de-quantized (`qlora_base: dequantized`, what the adapter learned
  to correct); `original` merges it into the full-precision weights instead. The choice is recorded.
- `linear`, `slerp`, `ties`, `dare_ties`, `task_arithmetic`: mergekit merges full models. SLERP interpolates two
  models (t=0 gives the first); TIES, DARE-TIES and task arithmetic combine each model's difference from a common
  `base`. The mergekit configuration is written next to the merged weights.
- `passthrough`: mergekit stacks the `layers` ranges of one source into a new model; keeping fewer layers than the
  source has makes a smaller, faster student for `distill-model` (layer pruning, then distillation).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.errors import TuneryError
from core.files import write_json
from tasks.common import StageResult
from tasks.stages.stage import Job, StageFields, StageInputs, StagePlan
from tasks.train.settings import QuantizationConfig

MERGEKIT_METHODS = ("linear", "slerp", "ties", "dare_ties", "task_arithmetic", "passthrough")
NEEDS_BASE = ("ties", "dare_ties", "task_arithmetic")
# config.json keys that must agree for two checkpoints to be merged tensor by tensor.
SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size")


class MergeConfig(BaseModel):
    """How to merge. `sources` and `base` name registered versions (NAME:N) or earlier stages of the pipeline."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["lora", "linear", "slerp", "ties", "dare_ties", "task_arithmetic", "passthrough"] = Field(
        "lora", description="lora: fold the start version's adapter into its base; the others are mergekit methods.")
    sources: list[str] = Field(default_factory=list, description="Models to merge (mergekit methods; 2 or more, "
                                                                 "exactly 2 for slerp).")
    base: str | None = Field(None, description="ties / dare_ties / task_arithmetic: the model the sources' "
                                               "differences are taken from; default: the pipeline's base model.")
    weights: list[float] | None = Field(None, description="Weight of each source (linear, ties, dare_ties, "
                                                          "task_arithmetic); default equal.")
    t: float = Field(0.5, ge=0, le=1, description="slerp: 0 gives the first source, 1 the second.")
    density: float = Field(0.5, gt=0, le=1, description="ties / dare_ties: share of each difference kept.")
    normalize: bool = Field(True, description="Divide by the sum of the weights (linear, ties, dare_ties).")
    layers: list[tuple[int, int]] | None = Field(None, description="passthrough: the [start, end) layer ranges of "
                                                                   "the source to keep, in order, e.g. [[0, 20], "
                                                                   "[26, 30]].")
    qlora_base: Literal["dequantized", "original"] = Field(
        "dequantized", description="lora on a QLoRA adapter: merge into the de-quantized weights it was trained on, "
                                   "or into the original full-precision weights.")

    @model_validator(mode="after")
    def _consistent(self) -> "MergeConfig":
        if self.method == "lora":
            if self.sources:
                raise ValueError("method lora merges the start version's adapter; use `from` instead of `sources`")
            return self
        if (self.method == "passthrough") != (self.layers is not None):
            raise ValueError("`layers` goes with method passthrough, and passthrough needs `layers`")
        if self.method == "passthrough":
            if len(self.sources) != 1:
                raise ValueError("method passthrough takes the layers of exactly 1 source")
            if any(not 0 <= a < b for a, b in self.layers):
                raise ValueError("each of `layers` is [start, end) with 0 <= start < end")
            return self
        if len(self.sources) < 2:
            raise ValueError(f"method {self.method} needs at least 2 sources")
        if self.method == "slerp" and len(self.sources) != 2:
            raise ValueError("method slerp interpolates exactly 2 sources")
        if self.weights is not None and len(self.weights) != len(self.sources):
            raise ValueError(f"{len(self.weights)} weights for {len(self.sources)} sources")
        if self.base is not None and self.method not in NEEDS_BASE:
            raise ValueError(f"method {self.method} takes no base; only {', '.join(NEEDS_BASE)} do")
        return self


def merge_adapter(base_path: str, adapter_path: str, out_dir: str | Path,
                  quantization: QuantizationConfig | None = None, qlora_base: str = "dequantized") -> dict[str, Any]:
    """Write base + adapter as one fp32 model (with the adapter's tokenizer) into `out_dir`; return what was done."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    quantized = quantization is not None and quantization.mode != "none"
    kwargs: dict[str, Any] = {"trust_remote_code": False, "use_safetensors": True, "dtype": torch.float32}
    if quantized and qlora_base == "dequantized":
        # The adapter learned to correct the de-quantized weights: rebuild exactly those, in fp32.
        q = quantization.model_copy(update={"compute_dtype": "fp32"})
        model = AutoModelForCausalLM.from_pretrained(base_path, quantization_config=q.to_bnb(),
                                                     device_map={"": "cpu"}, **kwargs)
        model = model.dequantize().to(torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
    merged = PeftModel.from_pretrained(model, adapter_path).merge_and_unload()
    if getattr(merged.config, "quantization_config", None) is not None:
        del merged.config.quantization_config
    out_dir = Path(out_dir)
    merged.save_pretrained(out_dir, safe_serialization=True)
    _copy_tokenizer(Path(adapter_path), out_dir)
    info = {"merge": "lora", "merged_adapter": str(adapter_path),
            "qlora_base": qlora_base if quantized else None}
    write_json(out_dir / "tunery_stage.json", {"stage": "merge", "info": info, "base": base_path})
    return info


def _copy_tokenizer(source: Path, out_dir: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "vocab.json", "merges.txt", "tokenizer.model"):
        if (source / name).exists():
            shutil.copy2(source / name, out_dir / name)


def check_sources(sources: dict[str, str], base: tuple[str, str] | None = None) -> None:
    """Refuse, naming them, two inputs that are the same model or models of different architectures."""
    models = {**sources, **({base[0]: base[1]} if base else {})}
    seen: dict[str, str] = {}
    for label, path in models.items():
        key = str(Path(path).resolve())
        if key in seen:
            raise TuneryError(f"cannot merge {label} with {seen[key]}: they are the same model ({path})")
        seen[key] = label
    check_same_architecture(models)


def check_same_architecture(models: dict[str, str]) -> None:
    """Raise TuneryError naming the first model whose shape differs from the first one's."""
    shapes = {}
    for label, path in models.items():
        config = json.loads((Path(path) / "config.json").read_text())
        shapes[label] = {k: config.get(k) for k in SHAPE_KEYS}
    first, reference = next(iter(shapes.items()))
    for label, shape in shapes.items():
        diff = {k: (reference[k], shape[k]) for k in SHAPE_KEYS if shape[k] != reference[k]}
        if diff:
            detail = ", ".join(f"{k} {a} vs {b}" for k, (a, b) in diff.items())
            raise TuneryError(f"cannot merge {label} with {first}: different architecture ({detail})")


def mergekit_config(config: MergeConfig, sources: dict[str, str], base: tuple[str, str] | None) -> dict[str, Any]:
    """The mergekit YAML document for `config`; `sources` maps each source's label to its model folder."""
    paths = list(sources.values())
    weights = config.weights or [1.0] * len(paths)
    doc: dict[str, Any] = {"merge_method": config.method, "dtype": "float32"}
    if config.method == "passthrough":
        doc["slices"] = [{"sources": [{"model": paths[0], "layer_range": [a, b]}]} for a, b in config.layers]
        return doc
    if config.method == "slerp":
        doc.update(base_model=paths[0], models=[{"model": p} for p in paths], parameters={"t": config.t})
        return doc
    models = []
    for path, weight in zip(paths, weights):
        params: dict[str, float] = {"weight": weight}
        if config.method in ("ties", "dare_ties"):
            params["density"] = config.density
        models.append({"model": path, "parameters": params})
    doc["models"] = models
    if config.method in NEEDS_BASE:
        doc["base_model"] = base[1]
    if config.method in ("linear", "ties", "dare_ties"):
        doc["parameters"] = {"normalize": config.normalize}
    return doc


def merge_models(config: MergeConfig, sources: dict[str, str], out_dir: str | Path,
                 base: tuple[str, str] | None = None, seed: int = 0) -> dict[str, Any]:
    """Merge the models in `sources` (label -> folder) with mergekit into `out_dir`.

    `base` is (label, folder) of the common ancestor for ties / dare_ties / task_arithmetic. Returns the info
    recorded with the version, including the mergekit configuration with labels in place of folder paths.
    """
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    if config.method in NEEDS_BASE and base is None:
        raise TuneryError(f"method {config.method} needs a base model")
    check_sources(sources, base)
    if config.method == "passthrough":
        n = json.loads((Path(next(iter(sources.values()))) / "config.json").read_text())["num_hidden_layers"]
        if max(b for _, b in config.layers) > n:
            raise TuneryError(f"passthrough: {next(iter(sources))} has {n} layers; `layers` asks for up to "
                              f"{max(b for _, b in config.layers)}")
    doc = mergekit_config(config, sources, base)
    out_dir = Path(out_dir)
    try:
        run_merge(MergeConfiguration.model_validate(doc), str(out_dir),
                  MergeOptions(copy_tokenizer=True, trust_remote_code=False, random_seed=seed, quiet=True,
                               write_model_card=False, safe_serialization=True))
    except (RuntimeError, ValueError, KeyError) as e:
        raise TuneryError(f"mergekit {config.method} failed: {e}") from None
    # mergekit copies the tokenizer of its base model; make sure the chat template came along.
    _copy_tokenizer(Path(base[1] if config.method in NEEDS_BASE else next(iter(sources.values()))), out_dir)
    (out_dir / "mergekit_config.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    labels = {path: label for label, path in sources.items()}
    if base:
        labels[base[1]] = base[0]
    portable = json.loads(json.dumps(doc))
    if "base_model" in portable:
        portable["base_model"] = labels.get(portable["base_model"], portable["base_model"])
    for entry in portable.get("models", []) + [s for part in portable.get("slices", []) for s in part["sources"]]:
        entry["model"] = labels.get(entry["model"], entry["model"])
    info = {"merge": config.method, "mergekit_config": portable}
    write_json(out_dir / "tunery_stage.json", {"stage": "merge", "info": info})
    return info


class MergeStage(StageFields, MergeConfig):
    """A `merge` stage of a pipeline config: it takes no data."""

    summary: ClassVar[str] = ("Fold an adapter into its base, or merge versions with mergekit; registers the merged "
                              "version.")
    stage: Literal["merge"] = "merge"

    def references(self) -> list[str]:
        return super().references() + list(self.sources) + ([self.base] if self.base else [])

    def plan(self, planner) -> StagePlan:
        """The sources, and for ties / dare_ties / task_arithmetic the base they are measured from (default: the
        config's base)."""
        refs = {"sources": tuple(planner.resolve(ref).version for ref in self.sources)}
        if self.method in NEEDS_BASE:
            refs["merge_base"] = ((planner.resolve(self.base) if self.base else planner.base).version,)
        return StagePlan(refs=refs, data_from="none")

    def prepare(self, plan: Any, data: StageResult | None, ctx: Any) -> Job:
        """lora: the start's adapter folded into its base; else mergekit on the sources, checked before anything is
        registered. Every source (and the base they are measured from) is a parent."""
        start = ctx.version(plan.start)
        sources = [ctx.version(v) for v in plan.refs.get("sources", ())]
        hyperparameters = {"merge": self.hyperparameters(), "seed": ctx.seed, "sources": [s.version for s in sources]}
        if self.method == "lora":
            if not start.adapter:
                raise TuneryError(f"merge (lora) needs an adapter version to fold in; {start.version} is not one")
            inputs = StageInputs(start=start.artifact_path, seed=ctx.seed, quantization=start.quantization,
                                 adapter_base=ctx.adapter_base(start))
            return Job(parents=[start], inputs=inputs, hyperparameters=hyperparameters, data_hash=start.data_hash)
        merge_base = [ctx.version(v) for v in plan.refs.get("merge_base", ())]
        folders = {s.version: ctx.folder(s) for s in sources}
        base = (merge_base[0].version, ctx.folder(merge_base[0])) if merge_base else None
        check_sources(folders, base)
        inputs = StageInputs(start=start.artifact_path, sources=folders, merge_base=base, seed=ctx.seed)
        return Job(parents=sources + merge_base, inputs=inputs, hyperparameters=hyperparameters)

    @model_validator(mode="after")
    def _no_data(self) -> "MergeStage":
        if self.data is not None:
            raise ValueError("a merge stage takes no data")
        return self

    def run(self, inputs: StageInputs, out_dir: Path) -> StageResult:
        """lora: the adapter (`inputs.start`) folded into `inputs.adapter_base`; else mergekit on the sources."""
        began = time.perf_counter()
        if self.method == "lora":
            quantization = QuantizationConfig(**inputs.quantization) if inputs.quantization else None
            info = merge_adapter(inputs.adapter_base, inputs.start, out_dir, quantization, self.qlora_base)
        else:
            info = merge_models(self, inputs.sources, out_dir, base=inputs.merge_base, seed=inputs.seed)
        return StageResult(stage="merge", artifact_path=str(out_dir), history=[], info=info,
                           metrics={"merge_runtime_s": time.perf_counter() - began})
