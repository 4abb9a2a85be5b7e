"""Stage eval: perplexity equals a direct token-weighted computation; latency and memory are measured."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import REPO

from tasks.data.prep import load_prepared
from tasks.evaluate.evaluation import EvalConfig, evaluate, latency, perplexity
from tasks.models import encode_chat, load_model, load_tokenizer


def direct_perplexity(model, tokenizer, rows, window):
    """One example at a time, no padding, loss from transformers' own shifted cross-entropy. An example longer
    than `window` is scored window by window (starts every window // 2 tokens), each answer token once."""
    stride = window // 2
    nll, count = 0.0, 0
    for r in rows:
        e = encode_chat(tokenizer, r["messages"], 10**9)
        ids, mask = e["input_ids"], e["completion_mask"]
        begin, scored_to = 0, 1
        while True:
            end = min(begin + window, len(ids))
            labels = torch.full((1, end - begin), -100)
            for t in range(max(scored_to, begin + 1), end):
                if mask[t]:
                    labels[0, t - begin] = ids[t]
            n = int((labels[0, 1:] != -100).sum())
            if n:
                with torch.no_grad():
                    loss = model(input_ids=torch.tensor([ids[begin:end]]), labels=labels).loss
                nll += float(loss) * n
                count += n
            scored_to = end
            if end >= len(ids):
                break
            begin += stride
    return math.exp(nll / count), count


@pytest.mark.parametrize("batch_size, window", [(1, 512), (3, 512), (8, 40), (1, 24)])
def test_perplexity_equals_direct_token_weighted_computation(tiny_model_dir, prepared, batch_size, window):
    """Batched (with padding) or not, and with answers longer than the window (40 and 24 tokens)."""
    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    _, train, val = load_prepared(prepared.artifact_path)
    rows = train + val  # mixed lengths, so batches of 3 and 8 carry padding
    expected, count = direct_perplexity(model, tok, rows, window)
    got = perplexity(model, tok, rows, max_length=window, batch_size=batch_size)
    # Nothing is truncated: every answer token is scored whatever the window.
    assert got["tokens"] == count == sum(sum(encode_chat(tok, r["messages"], 10**9)["completion_mask"][1:])
                                         for r in rows)
    assert got["perplexity"] == pytest.approx(expected, rel=1e-4)


def test_perplexity_is_a_local_evaluate_metric(tiny_model_dir):
    import evaluate

    from tasks.evaluate.evaluation import METRIC_DIR

    texts = ["Water tomatoes deeply two or three times a week.", "Mulch keeps the soil cool. " * 30]
    metric = evaluate.load(str(METRIC_DIR))
    result = metric.compute(predictions=texts, model_id=str(tiny_model_dir), window=32, stride=16, batch_size=2,
                            device="cpu")
    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    ids = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    rows_nll, rows_n = 0.0, 0
    for seq in ids:  # a naive one-window-at-a-time reference
        begin, scored_to = 0, 1
        while True:
            end = min(begin + 32, len(seq))
            labels = torch.tensor([[-100] * (max(scored_to, begin + 1) - begin) +
                                   seq[max(scored_to, begin + 1):end]])
            with torch.no_grad():
                loss = model(input_ids=torch.tensor([seq[begin:end]]), labels=labels).loss
            n = end - max(scored_to, begin + 1)
            rows_nll, rows_n = rows_nll + float(loss) * n, rows_n + n
            scored_to = end
            if end >= len(seq):
                break
            begin += 16
    assert len(ids[1]) > 32 and result["tokens"] == rows_n == sum(len(s) - 1 for s in ids)
    assert result["perplexity"] == pytest.approx(math.exp(rows_nll / rows_n), rel=1e-4)
    assert len(result["perplexities"]) == 2


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
    from core.errors import TuneryError

    (tmp_path / "broken").mkdir()
    with pytest.raises(TuneryError, match="evaluation of .*broken failed: .*broken: not a model folder"):
        evaluate(str(tmp_path / "broken"), prepared.artifact_path, EvalConfig())


def test_categories_add_up_and_samples_are_stripped(tiny_model_dir, tmp_path):
    """Per-category perplexities are token-weighted parts of the overall one; answers carry no template tokens."""
    from conftest import write_jsonl

    from tasks.data.prep import PrepConfig, prepare
    from tasks.evaluate.evaluation import measure

    rows = []
    for i, r in enumerate(json.loads(line) for line in
                          (REPO / "data/demo/garden_chat.jsonl").read_text().splitlines()[:30]):
        rows.append({**r, "category": ("support", "marketing", "care")[i % 3]})
    write_jsonl(tmp_path / "d.jsonl", rows)
    data = prepare(PrepConfig(train=["d.jsonl"], val_fraction=0.4), tmp_path, str(tiny_model_dir))
    cfg = EvalConfig(prompts=["How deep?", "When?"], max_new_tokens=6, repeats=1, warmup=0, generation_rows=2,
                     answer_tokens=6, price_per_hour=0.5)
    metrics, samples, answers = measure(str(tiny_model_dir), data.artifact_path, cfg, progress=False)
    cats = [k.split("/")[1] for k in metrics if k.startswith("perplexity/")]
    assert sorted(cats) == ["care", "marketing", "support"]
    assert sum(metrics[f"tokens/{c}"] for c in cats) == metrics["tokens"]
    assert sum(metrics[f"nll_sum/{c}"] for c in cats) == pytest.approx(metrics["nll_sum"], rel=1e-9)
    assert math.exp(sum(metrics[f"nll_sum/{c}"] for c in cats) / metrics["tokens"]) == pytest.approx(
        metrics["perplexity"], rel=1e-9)
    assert all(0 < metrics[f"gen_tokens/{c}"] <= 6 for c in cats)
    # generation_rows 2: two held-out prompts per category answered, each scored per category too
    assert sorted(a["category"] for a in answers) == sorted(cats * 2) and metrics["answer_rows"] == 6
    assert all(0 <= metrics[f"answer_f1/{c}"] <= 1 and f"answer_chrf/{c}" in metrics for c in cats)
    assert metrics["general_items"] == 300 and 0 <= metrics["general_accuracy"] <= 1
    assert metrics["cost_per_mtok_usd"] == pytest.approx(0.5 / 3600 / metrics["tokens_per_s"] * 1e6)
    assert [s["prompt"] for s in samples] == ["How deep?", "When?"]
    for s in samples:
        assert "<|im_" not in s["answer"] and "<|endoftext|>" not in s["answer"]


def test_strip_answer_removes_template_residue(tiny_model_dir):
    from tasks.evaluate.evaluation import strip_answer

    tok = load_tokenizer(str(tiny_model_dir))
    ids = tok("Plant them deep.<|im_end|>\n<|im_start|>user\nmore")["input_ids"]
    assert strip_answer(tok, ids) == "Plant them deep."
    assert strip_answer(tok, tok("assistant\nWater daily.")["input_ids"]) == "Water daily."


def test_adapter_versions_are_timed_in_both_forms(tiny_model_dir, prepared, tmp_path):
    from tasks.evaluate.evaluation import measure
    from tasks.stages.sft import SftConfig, train_sft

    train_sft(SftConfig(max_steps=1, batch_size=4, max_length=128), str(tiny_model_dir), prepared.artifact_path,
              tmp_path / "a", "cpu")
    cfg = EvalConfig(prompts=["How deep?"], max_new_tokens=4, repeats=1, warmup=0, generation_rows=0)
    metrics, _, _ = measure(str(tiny_model_dir), prepared.artifact_path, cfg, adapter=str(tmp_path / "a"),
                            progress=False)
    assert {"tokens_per_s", "ttft_ms", "tokens_per_s_adapter", "ttft_ms_adapter"} <= set(metrics)
