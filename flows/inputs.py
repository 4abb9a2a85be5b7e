"""What stages read, as registry versions and folders: the base model (registered the first time it is used), the
prepared data (recorded), a local model folder used as it is (a teacher), and any version as a complete model folder
(an adapter merged into its parent once, then kept in a cache)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import registry
from core.home import atomic_dir, home, home_relative
from flows.config import PipelineConfig, load_config
from tasks.data.prep import PreparedData, PrepConfig, prepare
from tasks.models import DEFAULT_BASE, DEFAULT_NAME, check_model_folder, resolve_base_model
from tasks.stages.merge import merge_adapter
from tasks.train.settings import QuantizationConfig


def run_prep(cfg: PipelineConfig, config_dir: Path, base_path: str | None = None,
             data: PrepConfig | None = None) -> PreparedData:
    """Prepare the config's data, or a stage's own (content-addressed, so a repeat is cheap); remember it."""
    result = prepare(data or cfg.data, config_dir, tokenizer_path=base_path)
    registry.record_dataset(result.info, result.artifact_path)
    return result



def load_with_data(config: str | Path):
    """Load a config, resolve (and register) its base model, prepare its data: what single commands need.
    Returns (config, its folder, the base version, the prepared data)."""
    cfg, config_dir = load_config(config)
    base = run_base(cfg, config_dir)
    return cfg, config_dir, base, run_prep(cfg, config_dir, base.artifact_path)


def base_name(cfg: PipelineConfig, base_path: str) -> str:
    if cfg.base_name:
        return cfg.base_name
    if cfg.base_model == DEFAULT_BASE:
        return DEFAULT_NAME
    return Path(base_path).name.replace("/", "-")[:64] or "base"


def run_base(cfg: PipelineConfig, config_dir: Path) -> registry.Version:
    """Resolve the base model and return its registry version, registering it the first time it is used."""
    path = resolve_base_model(cfg.base_model, config_dir)
    # base_model names the foundation model the same way on the base version and on everything trained from it.
    identity = DEFAULT_NAME if cfg.base_model == DEFAULT_BASE else path
    return register_model(base_name(cfg, path), path, identity, cfg.base_model)


def register_model(name: str, path: str, identity: str, source: str) -> registry.Version:
    """The registry version of a model folder used as it is (a base, a teacher), registered the first time."""
    for v in registry.list_versions(name=name, status="ready"):
        if v.stage == "base" and home_relative(v.artifact_path) == home_relative(path):
            return v
    version = registry.create_version(name, "base", base_model=identity, info={"source": source})
    registry.finish_version(version, path)
    return registry.get_version(version)


def model_folder(version: registry.Version) -> str:
    """A folder holding the version as a complete model, for training on, merging or exporting.

    Full models are their artifact. An adapter version is merged into its parent's model once and kept under
    TUNERY_HOME/cache/merged (a QLoRA adapter into the de-quantized weights it was trained against).
    """
    if not version.adapter:
        return version.artifact_path
    folder = home() / "cache" / "merged" / version.name / str(version.number)
    if not (folder / "config.json").exists():
        with atomic_dir(folder, replace=True) as tmp:  # a cache
            fold_adapter(version, tmp)
    return str(folder)


def adapter_base(version: registry.Version) -> str:
    """The model folder an adapter version applies to: its first parent's."""
    return model_folder(registry.get_version(version.parents[0]))


def fold_adapter(version: registry.Version, out_dir: Path, qlora_base: str = "dequantized") -> dict[str, Any]:
    """Write an adapter version merged into its parent's model (its first parent) to `out_dir`."""
    quantization = QuantizationConfig(**version.quantization) if version.quantization else None
    return merge_adapter(adapter_base(version), version.artifact_path, out_dir, quantization, qlora_base)


def local_model(ref: str) -> registry.Version:
    """A planned version; a local model folder (`folder:<path>`, a teacher) is registered the first time."""
    if not ref.startswith("folder:"):
        return registry.get_version(ref)
    folder = Path(ref.removeprefix("folder:"))
    check_model_folder(folder)
    return register_model(folder.name[:64], str(folder), str(folder), str(folder))
