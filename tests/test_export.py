"""GGUF export (issue 5, first part): the file transformers reads back holds the model's weights and tokenizer."""
from __future__ import annotations

import pytest
import torch

from tasks.common import TuneryError
from tasks.export import write_gguf
from tasks.models import load_model, load_tokenizer


@pytest.mark.parametrize("outtype, tolerance", [("f32", 0.0), ("f16", 1e-3)])
def test_tiny_gguf_read_back_by_transformers_reproduces_the_weights(tiny_model_dir, tmp_path, outtype, tolerance):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = write_gguf(tiny_model_dir, tmp_path / f"tiny-{outtype}.gguf", outtype)
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    original = load_model(str(tiny_model_dir))
    ours, theirs = original.state_dict(), back.state_dict()
    assert set(ours) == set(theirs)
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    assert worst <= tolerance, worst  # the q/k permutation round-trips exactly
    tok = load_tokenizer(str(tiny_model_dir))
    tok_back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    text = "Water tomatoes deeply, twice a week! <|im_start|>user\nHi<|im_end|>"
    assert tok_back(text)["input_ids"] == tok(text)["input_ids"]
    assert tok_back.chat_template == tok.chat_template


def test_unsupported_architecture_is_named(tiny_model_dir, tmp_path):
    import json
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    with pytest.raises(TuneryError, match="cannot export model_type 'gpt_neox' to GGUF"):
        write_gguf(tmp_path / "m", tmp_path / "x.gguf")


def test_rope_base_and_logits_survive_the_round_trip(tiny_model_dir, tmp_path):
    """SmolLM2 uses rope_theta 100000: the exported file must carry it, or every logit drifts."""
    import json
    import shutil

    from transformers import AutoModelForCausalLM

    shutil.copytree(tiny_model_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["rope_parameters"] = {"rope_theta": 100000.0, "rope_type": "default"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    (tmp_path / "out").mkdir()
    write_gguf(tmp_path / "m", tmp_path / "out" / "m.gguf", "f32")
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), gguf_file="m.gguf", dtype=torch.float32)
    assert back.config.rope_parameters["rope_theta"] == 100000.0
    ids = torch.tensor([[1, 20, 31, 42, 53, 64, 75, 86]])
    with torch.no_grad():
        assert torch.equal(load_model(str(tmp_path / "m"))(ids).logits, back(ids).logits)
