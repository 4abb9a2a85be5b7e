"""The pipeline config: shipped configs validate; unknown keys and impossible values are named with the file."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO

from core.errors import TuneryError
from flows.config import load_config

VALID = {"name": "fern", "data": {"train": "d.jsonl"}}


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates_and_its_data_exists(path):
    cfg, config_dir = load_config(path)
    for data in [cfg.data] + [s.data for s in cfg.stages if s.data is not None]:
        for data_file in data.train + (data.validation or []):
            assert (config_dir / data_file).exists(), data_file


def write(tmp_path: Path, doc) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


def sft(**settings) -> dict:
    return {"stages": [{"stage": "sft", **settings}]}


@pytest.mark.parametrize("patch, message", [
    ({"lerning_rate": 1}, "unknown key 'lerning_rate'"),
    (sft(lerning_rate=1e-4), "unknown key 'stages[0].lerning_rate' (did you mean 'learning_rate'?)"),
    (sft(lora={"rank": 8}), "unknown key 'stages[0].lora.rank'"),
    ({"data": {"train": "d.jsonl", "val_frac": 0.1}}, "unknown key 'data.val_frac' (did you mean 'val_fraction'?)"),
    (sft(learning_rate=-1), "stages[0].learning_rate: Input should be greater than 0"),
    (sft(lora={"r": 0}), "stages[0].lora.r: Input should be greater than or equal to 1"),
    (sft(lora={"dropout": 1.5}), "stages[0].lora.dropout: Input should be less than 1"),
    (sft(batch_size=0), "stages[0].batch_size: Input should be greater than or equal to 1"),
    (sft(max_steps=0), "stages[0]: max_steps must be -1 (use epochs) or a positive number of steps"),
    (sft(epochs=0), "stages[0].epochs: Input should be greater than 0"),
    (sft(method="full", quantization={"mode": "4bit"}), "method full trains full-precision weights"),
    (sft(quantization={"mode": "2bit"}), "stages[0].quantization.mode: Input should be 'none', '8bit' or '4bit'"),
    (sft(lr_scheduler="fancy"), "stages[0].lr_scheduler: Input should be"),
    ({"data": {"train": "d.jsonl", "val_fraction": 1.5}}, "data.val_fraction: Input should be less than 1"),
    ({"device": "tpu"}, "device: Input should be 'auto', 'cpu', 'cuda' or 'mps'"),
    ({"name": "../etc"}, "name: invalid name '../etc'"),
    ({"data": None}, "data: Input should be a valid dictionary"),
    # Stages and how they refer to each other.
    ({"stages": [{"learning_rate": 1e-4}]}, "stages[0]: needs `stage:` one of cpt, sft, dpo, merge"),
    ({"stages": [{"stage": "distil"}]}, "stages[0]: needs `stage:` one of cpt, sft, dpo, merge"),
    ({"stages": []}, "stages: List should have at least 1 item"),
    ({"stages": [{"stage": "dpo", "loss": "magic"}]}, "stages[0].loss: Input should be"),
    ({"stages": [{"stage": "dpo", "bta": 0.1}]}, "unknown key 'stages[0].bta' (did you mean 'beta'?)"),
    ({"stages": [{"stage": "sft", "fro": "base"}]}, "unknown key 'stages[0].fro' (did you mean 'from'?)"),
    ({"stages": [{"stage": "sft"}, {"stage": "sft"}]}, "stages[1]: id 'sft' is taken"),
    ({"stages": [{"stage": "sft", "from": "dpo"}, {"stage": "dpo"}]}, "stages[0]: 'dpo' is not an earlier stage"),
    ({"stages": [{"stage": "merge", "method": "slerp", "sources": ["a:1"]}]}, "method slerp needs at least 2 sources"),
    ({"stages": [{"stage": "merge", "method": "slerp", "sources": ["a:1", "b:1", "c:1"]}]}, "exactly 2 sources"),
    ({"stages": [{"stage": "merge", "method": "linear", "sources": ["a:1", "b:1"], "weights": [1]}]},
     "1 weights for 2 sources"),
    ({"stages": [{"stage": "merge", "sources": ["a:1"]}]}, "use `from` instead of `sources`"),
    ({"stages": [{"stage": "merge", "data": {"train": "x.jsonl"}}]}, "a merge stage takes no data"),
    ({"stages": [{"stage": "cpt", "method": "spectrum", "spectrum": {"share": 0}}]},
     "stages[0].spectrum.share: Input should be greater than 0"),
])
def test_bad_key_or_value_is_named_with_the_file(tmp_path, patch, message):
    doc = {**VALID, **patch}
    path = write(tmp_path, doc)
    with pytest.raises(TuneryError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: ")
    assert message in str(e.value)


def test_missing_required_key(tmp_path):
    with pytest.raises(TuneryError, match="missing required key 'data'"):
        load_config(write(tmp_path, {"name": "fern"}))


def test_invalid_yaml_names_the_line(tmp_path):
    with pytest.raises(TuneryError, match=r"pipeline.yaml line 3: invalid YAML"):
        load_config(write(tmp_path, "name: fern\ndata: {train: a.jsonl}\n- stray list item\n"))


def test_missing_config_file(tmp_path):
    with pytest.raises(TuneryError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_eval_max_length_follows_training_unless_set(tmp_path):
    cfg, _ = load_config(write(tmp_path, {**VALID, **sft(max_length=128)}))
    assert cfg.eval_config().max_length == 128
    cfg, _ = load_config(write(tmp_path, {**VALID, **sft(max_length=128), "eval": {"max_length": 64}}))
    assert cfg.eval_config().max_length == 64


def test_device_fallbacks():
    from tasks.common import resolve_device, resolve_precision

    assert resolve_device("auto", quantized=True) in ("cpu", "cuda")  # never mps with bitsandbytes
    assert resolve_device("cpu") == "cpu"
    assert resolve_precision("auto", "cpu") == "fp32"
    with pytest.raises(TuneryError, match="fp16 is not supported for training on the CPU"):
        resolve_precision("fp16", "cpu")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(TuneryError, match="no CUDA GPU"):
            resolve_device("cuda")
