"""Stage eval: perplexity equals a direct token-weighted computation; latency and memory are measured."""
from __future__ import annotations

import math

import pytest
import torch

from tasks.evaluation import EvalConfig, evaluate, latency, perplexity
from tasks.models import encode_chat, load_model, load_tokenizer
from tasks.prep import load_prepared


def direct_perplexity(model, tokenizer, rows, max_length):
    """One example at a time, no padding, loss from transformers' own shifted cross-entropy."""
    nll, count = 0.0, 0
    for r in rows:
        e = encode_chat(tokenizer, r["messages"], max_length)
        ids = torch.tensor([e["input_ids"]])
        labels = ids.clone()
        labels[0, torch.tensor(e["completion_mask"]) == 0] = -100
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss  # mean over scored tokens
        n = int((labels[0, 1:] != -100).sum())
        nll += float(loss) * n
        count += n
    return math.exp(nll / count), count


@pytest.mark.parametrize("batch_size, max_length", [(1, 512), (3, 512), (8, 40)])
def test_perplexity_equals_direct_token_weighted_computation(tiny_model_dir, prepared, batch_size, max_length):
    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    _, train, val = load_prepared(prepared.artifact_path)
    rows = train + val  # mixed lengths, so batches of 3 and 8 carry padding
    expected, count = direct_perplexity(model, tok, rows, max_length)
    got = perplexity(model, tok, rows, max_length=max_length, batch_size=batch_size)
    assert got["tokens"] == count
    assert got["perplexity"] == pytest.approx(expected, rel=1e-4)


def test_perplexity_scores_only_the_answer(tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    short = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}]}
    long_prompt = {"messages": [{"role": "user", "content": "Hi " * 50}, {"role": "assistant", "content": "Yes"}]}
    # Same answer tokens scored, whatever the length of the prompt.
    assert perplexity(model, tok, [short])["tokens"] == perplexity(model, tok, [long_prompt])["tokens"]


def test_latency_reports_median_ttft_and_decode_speed(tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    result = latency(model, tok, ["How deep should I plant garlic?"], max_new_tokens=8, repeats=2, warmup=1)
    assert result["ttft_ms"] > 0 and result["tokens_per_s"] > 0


def test_evaluate_runs_in_a_child_and_measures_its_own_peak_memory(tiny_model_dir, prepared):
    # Grow this process by ~1.5 GB first: the child's peak must not inherit it (Linux keeps ru_maxrss
    # across exec; the measurement reads VmHWM instead).
    ballast = torch.ones(400 * 2**20 // 4 * 4, dtype=torch.float32)  # 1.6 GB, touched
    cfg = EvalConfig(prompts=["Hello?"], max_new_tokens=4, repeats=1, warmup=0, max_length=128)
    result = evaluate(str(tiny_model_dir), prepared.artifact_path, cfg)
    del ballast
    m = result.metrics
    assert {"perplexity", "tokens_per_s", "ttft_ms", "peak_rss_mb"} <= set(m)
    assert 50 < m["peak_rss_mb"] < 1200
    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    _, _, val = load_prepared(prepared.artifact_path)
    assert m["perplexity"] == pytest.approx(perplexity(model, tok, val, 128)["perplexity"], rel=1e-5)


def test_evaluate_reports_a_bad_version_by_name(tmp_path, prepared):
    from tasks.common import TuneryError

    (tmp_path / "broken").mkdir()
    with pytest.raises(TuneryError, match="evaluation of .*broken failed: .*broken: not a model folder"):
        evaluate(str(tmp_path / "broken"), prepared.artifact_path, EvalConfig())
