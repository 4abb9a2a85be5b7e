"""Stage sft on the tiny model: LoRA, QLoRA (bitsandbytes 4-bit on the CPU) and full fine-tuning really train."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from core.errors import TuneryError
from tasks.stages.sft import SftConfig, train_sft

FAST = {"max_steps": 8, "batch_size": 4, "learning_rate": 5e-3, "warmup_ratio": 0.0, "lr_scheduler": "constant",
        "max_length": 128}


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_lora_trains_the_adapter_and_lowers_the_loss(tiny_model_dir, prepared, tmp_path):
    result = train_sft(SftConfig(**FAST), str(tiny_model_dir), prepared.artifact_path, tmp_path / "out", "cpu")
    adapter = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    lora_b = [t for k, t in adapter.items() if "lora_B" in k]
    # peft initialises every B matrix to zero: after training, each one has moved.
    assert lora_b and all(t.abs().max() > 0 for t in lora_b)
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert {"learning_rate", "grad_norm", "rss_mb"} <= set(result.history[0])
    assert result.metrics["train_tokens"] > 0 and result.metrics["train_peak_rss_mb"] > 0
    assert (tmp_path / "out" / "training_curves.png").stat().st_size > 1000
    # The base checkpoint on disk is untouched (LoRA trains a separate adapter).
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_full_finetune_changes_every_weight_matrix(tiny_model_dir, prepared, tmp_path):
    train_sft(SftConfig(method="full", **{**FAST, "learning_rate": 1e-3, "max_steps": 3}), str(tiny_model_dir),
              prepared.artifact_path, tmp_path / "out", "cpu")
    before, after = _weights(tiny_model_dir), _weights(tmp_path / "out")
    moved = [k for k in before if "proj" in k and not torch.equal(before[k], after[k])]
    assert len(moved) == len([k for k in before if "proj" in k]) > 0


def test_qlora_4bit_runs_on_the_cpu(tiny_model_dir, prepared, tmp_path):
    cfg = SftConfig(quantization={"mode": "4bit", "quant_type": "nf4", "double_quant": True}, **FAST)
    result = train_sft(cfg, str(tiny_model_dir), prepared.artifact_path, tmp_path / "out", "cpu")
    adapter = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert all(t.abs().max() > 0 for k, t in adapter.items() if "lora_B" in k)
    assert result.info["quantization"] == "4bit"


def test_lora_target_modules_and_rank_are_applied(tiny_model_dir, prepared, tmp_path):
    cfg = SftConfig(lora={"r": 4, "target_modules": ["q_proj", "v_proj"]}, **{**FAST, "max_steps": 1})
    train_sft(cfg, str(tiny_model_dir), prepared.artifact_path, tmp_path / "out", "cpu")
    adapter = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert {k.split(".")[-3] for k in adapter} == {"q_proj", "v_proj"}
    assert all(t.shape[0] == 4 for k, t in adapter.items() if "lora_A" in k)


def test_max_length_that_cuts_every_answer_is_refused(tiny_model_dir, prepared, tmp_path):
    with pytest.raises(TuneryError, match="cuts off every answer"):
        train_sft(SftConfig(**{**FAST, "max_length": 16}), str(tiny_model_dir), prepared.artifact_path,
                  tmp_path / "out", "cpu")


@pytest.mark.parametrize("mode", [True, "selective"])
def test_gradient_checkpointing_with_lora_still_trains(tiny_model_dir, prepared, tmp_path, mode):
    from tasks.train.training import checkpointing

    assert checkpointing(SftConfig(), "cpu") is False and checkpointing(SftConfig(), "cuda") == "selective"
    cfg = SftConfig(gradient_checkpointing=mode, **{**FAST, "max_steps": 2})
    result = train_sft(cfg, str(tiny_model_dir), prepared.artifact_path, tmp_path / "out", "cpu")
    assert result.info["gradient_checkpointing"] == mode
    adapter = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert all(t.abs().max() > 0 for k, t in adapter.items() if "lora_B" in k)
