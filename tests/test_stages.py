"""Stages cpt and dpo and the Spectrum option, on the tiny model: each really trains what it claims to."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import REPO, write_jsonl
from safetensors.torch import load_file

from core.errors import TuneryError
from tasks.data.prep import PrepConfig, load_prepared, prepare
from tasks.models import load_tokenizer
from tasks.stages.cpt import CptConfig, train_cpt
from tasks.stages.dpo import DpoConfig, train_dpo
from tasks.stages.sft import SftConfig, train_sft

FAST = {"batch_size": 4, "warmup_ratio": 0.0, "lr_scheduler": "constant", "max_length": 128}
REFUSALS = ["I don't know.", "No idea, sorry.", "Look it up yourself.", "Can't help with that."]


@pytest.fixture
def text_data(tmp_path, tiny_model_dir):
    """Raw gardening text: the demo answers as documents, one of them far longer than max_length."""
    answers = [json.loads(line)["messages"][-1]["content"]
               for line in (REPO / "data/demo/garden_chat.jsonl").read_text().splitlines()]
    docs = [{"text": a} for a in answers[:20]] + [{"text": " ".join(answers[20:40])}]
    write_jsonl(tmp_path / "notes.jsonl", docs)
    return prepare(PrepConfig(train=["notes.jsonl"], val_fraction=0.1), tmp_path, str(tiny_model_dir))


@pytest.fixture
def preference_data(tmp_path, garden_rows, tiny_model_dir):
    """Toy pairs: the helpful demo answer is chosen over a curt refusal."""
    rows = [{"prompt": r["messages"][0]["content"], "chosen": r["messages"][1]["content"],
             "rejected": REFUSALS[i % len(REFUSALS)]} for i, r in enumerate(garden_rows)]
    write_jsonl(tmp_path / "prefs.jsonl", rows)
    return prepare(PrepConfig(train=["prefs.jsonl"], val_fraction=0.25), tmp_path, str(tiny_model_dir))


def test_cpt_trains_every_token_of_split_and_packed_documents(tiny_model_dir, text_data, tmp_path):
    cfg = CptConfig(**{**FAST, "max_length": 256}, epochs=1, learning_rate=5e-3)
    result = train_cpt(cfg, str(tiny_model_dir), text_data.artifact_path, tmp_path / "out", "cpu")
    _, train_rows, _ = load_prepared(text_data.artifact_path)
    tok = load_tokenizer(str(tiny_model_dir))
    lengths = [len(tok(r["text"])["input_ids"]) + 1 for r in train_rows]  # each document ends with an EOS token
    assert max(lengths) > 2 * 256  # the long document had to be split
    assert result.metrics["train_tokens"] == sum(lengths)  # nothing was truncated away
    # Short documents share sequences: the packed sequences are nearly full.
    assert result.info["train_sequences"] < len(train_rows)
    assert result.info["train_sequences"] <= math.ceil(sum(lengths) / 256) + 1
    assert result.metrics["text_perplexity"] < result.metrics["text_perplexity_start"]


def test_dpo_raises_held_out_preference_accuracy(tiny_model_dir, preference_data, tmp_path):
    cfg = DpoConfig(**FAST, max_steps=12, learning_rate=5e-3, beta=0.1)
    result = train_dpo(cfg, str(tiny_model_dir), preference_data.artifact_path, tmp_path / "out", "cpu")
    m = result.metrics
    print({k: v for k, v in m.items() if "pref" in k or "reward" in k})
    assert m["preference_accuracy"] > m["preference_accuracy_start"]
    assert m["preference_margin"] > m["preference_margin_start"]
    assert m["reward_accuracy"] > 0.5 and m["reward_margin"] > 0
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def _softplus(x: float) -> float:
    import math

    return math.log1p(math.exp(x))


# What each objective's first logged step must show (beta 0.1, SimPO gamma 0.5). At step 1 the LoRA policy is the
# start model, which is also the reference, so the DPO family's losses take their closed form at a zero margin;
# the reference-free ones are checked against the terms their own trainer logs.
FIRST_STEP = {
    "sigmoid": (lambda h: h["loss"] == pytest.approx(0.693147, abs=1e-5), "rewards/margins", "kl"),
    "ipo": (lambda h: h["loss"] == pytest.approx((1 / (2 * 0.1)) ** 2), "rewards/margins", "kl"),
    "hinge": (lambda h: h["loss"] == pytest.approx(1.0), "rewards/margins", "kl"),
    "kto": (lambda h: h["loss"] == pytest.approx(0.5, abs=1e-5), "kl", "rewards/margins"),  # KTOTrainer
    "orpo": (lambda h: h["loss"] == pytest.approx(h["nll_loss"] - 0.1 * h["log_odds_ratio"], abs=1e-4),
             "log_odds_ratio", "kl"),  # ORPOTrainer: NLL minus beta * log sigmoid(log odds ratio)
    "simpo": (lambda h: h["nll_loss"] == 0 and h["loss"] == pytest.approx(
        _softplus(0.5 - h["rewards/margins"]), abs=0.02), "rewards/margins", "log_odds_ratio"),  # CPOTrainer
}


@pytest.mark.parametrize("loss", list(FIRST_STEP))
def test_each_preference_loss_runs_the_trainer_and_loss_it_names(tiny_model_dir, preference_data, tmp_path, loss):
    """Sent to another trainer or loss (KTO, ORPO or SimPO computed by DPOTrainer, IPO as sigmoid), the first
    step's loss or the trainer's own logged terms would differ."""
    cfg = DpoConfig(**FAST, max_steps=2, learning_rate=5e-3, loss=loss, beta=0.1, simpo_gamma=0.5)
    result = train_dpo(cfg, str(tiny_model_dir), preference_data.artifact_path, tmp_path / "out", "cpu")
    first = result.history[0]
    holds, logged, absent = FIRST_STEP[loss]
    assert first["step"] == 1 and holds(first), first
    assert logged in first and absent not in first, sorted(first)
    adapter = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert all(t.abs().max() > 0 for k, t in adapter.items() if "lora_B" in k)
    assert result.info["loss"] == loss and "preference_accuracy" in result.metrics


def test_dpo_refuses_chat_data(tiny_model_dir, prepared, tmp_path):
    with pytest.raises(TuneryError, match="dpo needs preference pairs"):
        train_dpo(DpoConfig(**FAST), str(tiny_model_dir), prepared.artifact_path, tmp_path / "out", "cpu")


def test_spectrum_selects_deterministically_and_trains_only_its_choice(tiny_model_dir, prepared, tmp_path):
    from tasks.models import load_model
    from tasks.train.spectrum import select_matrices

    model = load_model(str(tiny_model_dir))
    first, second = select_matrices(model, 0.5), select_matrices(model, 0.5)
    assert first == second
    # 2 layers x 7 kinds of matrix; half of each kind is one matrix per kind.
    assert len(first["scores"]) == 14 and len(first["selected"]) == 7
    assert {n.split(".", 3)[-1] for n in first["selected"]} == {n.split(".", 3)[-1] for n in first["scores"]}

    cfg = SftConfig(method="spectrum", spectrum={"share": 0.5}, **FAST, max_steps=3, learning_rate=1e-3)
    result = train_sft(cfg, str(tiny_model_dir), prepared.artifact_path, tmp_path / "out", "cpu")
    assert result.info["spectrum"]["selected"] == first["selected"]
    before, after = load_file(str(tiny_model_dir / "model.safetensors")), load_file(str(tmp_path / "out" /
                                                                                       "model.safetensors"))
    moved = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert moved == first["selected"]
    assert result.metrics["trainable_params"] == sum(before[k].numel() for k in first["selected"])


def test_spectrum_refuses_quantization():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="method spectrum trains full-precision weights"):
        SftConfig(method="spectrum", quantization={"mode": "4bit"})
