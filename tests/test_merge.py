"""Stage merge on the tiny model: an adapter folded into its base, and mergekit merges of full models."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.errors import TuneryError
from tasks.models import load_model
from tasks.stages.merge import MergeConfig, merge_adapter, merge_models
from tasks.stages.sft import SftConfig, train_sft

FAST = {"max_steps": 4, "batch_size": 4, "learning_rate": 2e-2, "warmup_ratio": 0.0, "lr_scheduler": "constant",
        "max_length": 128}
INPUT = torch.tensor([[1, 20, 31, 42, 53, 64, 75, 86, 97, 108]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT).logits.float()


def _perturbed_copy(source, out, scale: float, seed: int, only: str = ""):
    """A copy of a checkpoint with seeded noise on its weights (those whose name contains `only`)."""
    shutil.copytree(source, out)
    weights = load_file(str(source / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    for key, value in weights.items():
        if only in key:
            weights[key] = value + scale * torch.randn(value.shape, generator=gen)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def tuned_copy(tiny_model_dir, tmp_path_factory):
    """A second checkpoint of the tiny model's architecture, standing in for a full fine-tune."""
    return _perturbed_copy(tiny_model_dir, tmp_path_factory.mktemp("tuned") / "model", 0.02, seed=1)


def test_merged_lora_equals_base_plus_adapter(tiny_model_dir, prepared, tmp_path):
    train_sft(SftConfig(**FAST), str(tiny_model_dir), prepared.artifact_path, tmp_path / "adapter", "cpu")
    info = merge_adapter(str(tiny_model_dir), str(tmp_path / "adapter"), tmp_path / "merged")
    with_adapter = load_model(str(tiny_model_dir), adapter=str(tmp_path / "adapter")).eval()
    merged = load_model(str(tmp_path / "merged")).eval()
    base = load_model(str(tiny_model_dir)).eval()
    assert (_logits(base) - _logits(with_adapter)).abs().max() > 1e-2  # the adapter does change the output
    assert (_logits(merged) - _logits(with_adapter)).abs().max() < 1e-4
    assert not (tmp_path / "merged" / "adapter_config.json").exists() and info["qlora_base"] is None
    assert (tmp_path / "merged" / "tokenizer_config.json").exists()


def test_qlora_adapter_merges_into_the_dequantized_base(tiny_model_dir, prepared, tmp_path):
    q = {"mode": "4bit", "quant_type": "nf4", "double_quant": True}
    cfg = SftConfig(quantization=q, **FAST)
    train_sft(cfg, str(tiny_model_dir), prepared.artifact_path, tmp_path / "adapter", "cpu")
    info = merge_adapter(str(tiny_model_dir), str(tmp_path / "adapter"), tmp_path / "dq", cfg.quantization)
    merge_adapter(str(tiny_model_dir), str(tmp_path / "adapter"), tmp_path / "orig", cfg.quantization, "original")
    assert info["qlora_base"] == "dequantized"
    trained_form = load_model(str(tiny_model_dir), quantization=cfg.quantization, adapter=str(tmp_path / "adapter"))
    dequantized, original = load_model(str(tmp_path / "dq")).eval(), load_model(str(tmp_path / "orig")).eval()
    reference = _logits(trained_form.eval())
    # Merged into the de-quantized weights, the model computes what the QLoRA model computed in training.
    assert (_logits(dequantized) - reference).abs().max() < 1e-3
    assert (_logits(original) - reference).abs().max() > (_logits(dequantized) - reference).abs().max()
    assert "quantization_config" not in json.loads((tmp_path / "dq" / "config.json").read_text())


def test_slerp_at_t0_reproduces_its_first_source(tiny_model_dir, tuned_copy, tmp_path):
    cfg = MergeConfig(method="slerp", sources=["a", "b"], t=0.0)
    info = merge_models(cfg, {"tuned:1": str(tuned_copy), "base:1": str(tiny_model_dir)}, tmp_path / "m")
    first, merged = load_file(str(tuned_copy / "model.safetensors")), _all_weights(tmp_path / "m")
    assert set(first) == set(merged)
    assert max((first[k] - merged[k]).abs().max().item() for k in first) < 1e-6
    assert info["mergekit_config"]["base_model"] == "tuned:1"
    assert (tmp_path / "m" / "mergekit_config.yml").exists()


def _with_deltas(tiny_model_dir, tmp_path) -> tuple[dict, dict, dict, dict]:
    """The tiny model as base B, plus A = B + dA with every delta positive (0.02..0.03) and C = B + dC with deltas
    of either sign and at most 0.005: known tensors whose merges have known values."""
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    gen = torch.Generator().manual_seed(3)
    d_a = {k: 0.02 + 0.01 * torch.rand(v.shape, generator=gen) for k, v in base.items()}
    d_c = {k: 0.005 * (2 * torch.rand(v.shape, generator=gen) - 1) for k, v in base.items()}
    for name, delta in (("a", d_a), ("c", d_c)):
        shutil.copytree(tiny_model_dir, tmp_path / name)
        save_file({k: (base[k] + delta[k]).contiguous() for k in base}, str(tmp_path / name / "model.safetensors"),
                  metadata={"format": "pt"})
    return base, d_a, d_c, {"a:1": str(tmp_path / "a"), "c:1": str(tmp_path / "c")}


def _ties(base, d_a, d_c, w_a, w_c):
    """TIES at density 1: the sign of w_a*dA + w_c*dC is elected (here always dA's, +); only deltas of that sign
    count, divided by the weights that count."""
    out = {}
    for k in base:
        agrees = (d_c[k] > 0).float()
        out[k] = base[k] + (w_a * d_a[k] + w_c * d_c[k] * agrees) / (w_a + w_c * agrees)
    return out


@pytest.mark.parametrize("method, weights, expected", [
    ("linear", [1.0, 3.0], lambda b, a, c: {k: b[k] + (a[k] + 3 * c[k]) / 4 for k in b}),
    ("task_arithmetic", [0.3, 0.7], lambda b, a, c: {k: b[k] + 0.3 * a[k] + 0.7 * c[k] for k in b}),
    ("ties", [0.3, 0.7], lambda b, a, c: _ties(b, a, c, 0.3, 0.7)),
    ("dare_ties", [0.3, 0.7], lambda b, a, c: _ties(b, a, c, 0.3, 0.7)),  # density 1: DARE drops nothing
])
def test_each_mergekit_method_computes_its_arithmetic_on_known_tensors(method, weights, expected, tiny_model_dir,
                                                                      tmp_path):
    base, d_a, d_c, sources = _with_deltas(tiny_model_dir, tmp_path)
    cfg = MergeConfig(method=method, sources=["a", "c"], weights=weights, density=1.0)
    info = merge_models(cfg, sources, tmp_path / "m", base=("base:1", str(tiny_model_dir)), seed=1)
    assert info["merge"] == method and [m["model"] for m in info["mergekit_config"]["models"]] == ["a:1", "c:1"]
    merged, want = _all_weights(tmp_path / "m"), expected(base, d_a, d_c)
    assert set(merged) == set(want)
    worst = max((merged[k] - want[k]).abs().max().item() for k in want)
    assert worst < 1e-6, (method, worst)
    copies = [max((merged[k] - base[k] - d[k]).abs().max().item() for k in base) for d in (d_a, d_c)]
    assert min(copies) > 1e-3  # not a copy of either source


def test_dare_drops_a_seeded_share_of_each_difference(tiny_model_dir, tmp_path):
    """DARE at density 0.5: about half of A's deltas are dropped where C disagrees in sign (there the result is
    the base or A's rescaled delta), reproducibly for one seed and differently for another."""
    base, d_a, d_c, sources = _with_deltas(tiny_model_dir, tmp_path)
    cfg = MergeConfig(method="dare_ties", sources=["a", "c"], weights=[0.3, 0.7], density=0.5)
    runs = {}
    for name, seed in (("s1", 1), ("s1b", 1), ("s2", 2)):
        merge_models(cfg, sources, tmp_path / name, base=("base:1", str(tiny_model_dir)), seed=seed)
        runs[name] = _all_weights(tmp_path / name)
    key = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(runs["s1"][key], runs["s1b"][key]) and not torch.equal(runs["s1"][key], runs["s2"][key])
    kept = ((runs["s1"][key] - base[key]).abs() > 1e-7).float().mean().item()
    assert 0.6 < kept < 0.9, kept  # dropped only where both A's and C's deltas were dropped or masked (~1/4)


def test_merging_different_architectures_is_refused(tiny_model_dir, tmp_path):
    shutil.copytree(tiny_model_dir, tmp_path / "wide")
    config = json.loads((tmp_path / "wide" / "config.json").read_text())
    (tmp_path / "wide" / "config.json").write_text(json.dumps({**config, "hidden_size": 128}))
    with pytest.raises(TuneryError, match="cannot merge wide:1 with tiny:1: different architecture .hidden_size"):
        merge_models(MergeConfig(method="linear", sources=["a", "b"]),
                     {"tiny:1": str(tiny_model_dir), "wide:1": str(tmp_path / "wide")}, tmp_path / "m")


def _all_weights(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in folder.glob("*.safetensors"):
        out.update(load_file(str(f)))
    return out


def test_passthrough_keeps_the_chosen_layers_in_order(tiny_model_dir, tmp_path):
    """Layer pruning: [[1, 2], [0, 1]] gives a 2-layer model whose first layer is the source's second."""
    source = _all_weights(tiny_model_dir)
    info = merge_models(MergeConfig(method="passthrough", sources=["tiny"], layers=[[1, 2], [0, 1]]),
                        {"tiny:1": str(tiny_model_dir)}, tmp_path / "m")
    out = _all_weights(tmp_path / "m")
    for key, value in out.items():
        original = key.replace("layers.0.", "layers.X.").replace("layers.1.", "layers.0.").replace("layers.X.",
                                                                                                  "layers.1.")
        assert torch.equal(value, source[original]), key
    pruned = merge_models(MergeConfig(method="passthrough", sources=["tiny"], layers=[[0, 1]]),
                          {"tiny:1": str(tiny_model_dir)}, tmp_path / "p")
    assert json.loads((tmp_path / "p" / "config.json").read_text())["num_hidden_layers"] == 1
    assert load_model(str(tmp_path / "p")).num_parameters() < load_model(str(tiny_model_dir)).num_parameters()
    assert info["mergekit_config"]["slices"][0]["sources"][0]["model"] == "tiny:1"
    assert pruned["merge"] == "passthrough"
    with pytest.raises(TuneryError, match="tiny:1 has 2 layers; `layers` asks for up to 3"):
        merge_models(MergeConfig(method="passthrough", sources=["tiny"], layers=[[0, 3]]),
                     {"tiny:1": str(tiny_model_dir)}, tmp_path / "q")
    with pytest.raises(ValueError, match="passthrough needs `layers`"):
        MergeConfig(method="passthrough", sources=["tiny"])
