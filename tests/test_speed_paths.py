"""The fast paths of issue 14 compute the same numbers as the slow ones: the LM head only at scored positions
(loss and gradients), perplexity with logits only where scored, batched greedy answers that reuse a shared prompt
prefix, DPO's implicit rewards from one scoring pass; and the training benchmark runs end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO


def _batch(tok, rows, max_length=96):
    from tasks.models import encode_chat

    encoded = [encode_chat(tok, r["messages"], max_length) for r in rows]
    width = max(len(e["input_ids"]) for e in encoded)
    ids = torch.full((len(encoded), width), tok.pad_token_id)
    attn = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, e in enumerate(encoded):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        attn[i, :n] = 1
        labels[i, :n] = torch.where(torch.tensor(e["completion_mask"]) == 1, ids[i, :n], -100)
    return ids, attn, labels


def _model(tiny_model_dir, lora: bool = True):
    """LoRA (frozen head: the frozen-head path) or every weight training (trl's kernel on the scored rows)."""
    from peft import LoraConfig, get_peft_model

    from tasks.models import load_model

    torch.manual_seed(0)
    model = load_model(str(tiny_model_dir))
    if not lora:
        return model
    return get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0,
                                            init_lora_weights=False))


@pytest.mark.parametrize("lora", [True, False])
def test_scored_head_gives_the_full_computations_loss_and_gradients(tiny_model_dir, garden_rows, lora):
    from trl.trainer.utils import add_fused_lm_head

    from tasks.models import load_tokenizer
    from tasks.train.scored_head import install, unwrapped

    tok = load_tokenizer(str(tiny_model_dir))
    ids, attn, labels = _batch(tok, garden_rows[:6])
    assert (labels[:, 1:] == -100).float().mean() > 0.2  # prompts and padding are a real share, and skipped

    def loss_and_grads(model, fused: bool):
        model.zero_grad()
        if fused:
            loss = model(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True).loss
        else:  # the textbook computation: every position's logits, cross-entropy over the scored ones
            logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                                                     labels[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    full = _model(tiny_model_dir, lora)
    reference, reference_grads = loss_and_grads(full, fused=False)
    scored = _model(tiny_model_dir, lora)
    add_fused_lm_head(unwrapped(scored))  # what trl's trainers install first
    assert install(unwrapped(scored))
    loss, grads = loss_and_grads(scored, fused=True)
    assert loss == pytest.approx(float(reference), abs=1e-5)
    assert grads.keys() == reference_grads.keys() and len(grads) > 0
    for name, g in grads.items():
        torch.testing.assert_close(g, reference_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    # Generation and plain forwards still go through the model's own head.
    logits = scored(input_ids=ids[:1], attention_mask=attn[:1]).logits
    assert logits.shape[:2] == ids[:1].shape


@pytest.mark.parametrize("lora", [True, False])
def test_scored_head_projects_only_the_scored_positions(tiny_model_dir, garden_rows, monkeypatch, lora):
    from trl.kernels import ChunkedLogProbFunction

    from tasks.models import load_tokenizer
    from tasks.train import scored_head

    tok = load_tokenizer(str(tiny_model_dir))
    ids, attn, labels = _batch(tok, garden_rows[:4])
    seen = []
    if lora:  # a frozen head: the forward computes the gradient too
        real = scored_head.frozen_head_logprobs
        monkeypatch.setattr(scored_head, "frozen_head_logprobs", lambda hidden, *a: seen.append(hidden.shape[0]) or
                            real(hidden, *a))
    else:  # a head that trains: trl's kernel, given the scored rows only
        real = ChunkedLogProbFunction.apply
        monkeypatch.setattr(ChunkedLogProbFunction, "apply", lambda hidden, *a: seen.append(hidden.shape[0]) or
                            real(hidden, *a))
    model = _model(tiny_model_dir, lora)
    scored_head.install(scored_head.unwrapped(model))
    model(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True).loss.backward()
    assert seen == [int((labels[:, 1:] != -100).sum())]


@pytest.mark.parametrize("system", [None, "You are Fern, a gardening helper who answers briefly and warmly, with "
                                            "organic methods only."])
def test_perplexity_with_scored_logits_only_equals_the_full_logits(tiny_model_dir, garden_rows, system, monkeypatch):
    from tasks.evaluate.evaluation import answer_nll, perplexity_metric, scored_tokens
    from tasks.models import load_model, load_tokenizer

    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    rows = [{"messages": ([{"role": "system", "content": system}] if system else []) + r["messages"]}
            for r in garden_rows[:8]]
    encoded = [scored_tokens(tok, r) for r in rows]
    metric = perplexity_metric()
    reused = []
    real = metric.shared_prefix
    monkeypatch.setattr(metric, "shared_prefix", lambda *a: reused.append(real(*a)[0]) or real(*a))
    fast = answer_nll(model, tok, encoded, window=512, batch_size=3)
    # With a system prompt every row shares, its tokens are encoded once (the path under test); without, nothing.
    assert (reused[0] >= metric.MIN_SHARED_PREFIX) == (system is not None)
    for e, (nll, n) in zip(encoded, fast):
        ids = torch.tensor([e["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        mask = torch.tensor(e["score_mask"][1:]) == 1
        expected = -logp[mask].gather(-1, ids[0, 1:][mask].unsqueeze(-1)).sum()
        assert n == int(mask.sum()) and nll == pytest.approx(float(expected), rel=1e-4)


def test_greedy_answers_reuse_a_shared_prefix_and_match_one_at_a_time(tiny_model_dir):
    from tasks.models import MIN_SHARED_PREFIX, common_prefix, greedy_answers, load_model, load_tokenizer, prompt_ids

    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    system = "You are Fern, a gardening helper who answers briefly and warmly, with organic methods only."
    questions = ["Basil?", "When do I plant garlic in a cold garden?", "Why are my tomato leaves yellow?", "Mulch?",
                 "How deep should tulip bulbs go?"]
    prompts = [prompt_ids(tok, [{"role": "system", "content": system}, {"role": "user", "content": q}])
               for q in questions]
    assert len(common_prefix(prompts)) >= MIN_SHARED_PREFIX  # the shared-prefix path is the one under test
    calls = []
    real_forward = model.forward
    model.forward = lambda *a, **kw: calls.append(kw.get("input_ids", a[0] if a else None).shape) or \
        real_forward(*a, **kw)
    batched = greedy_answers(model, tok, prompts, max_new_tokens=8, batch_size=2)
    model.forward = real_forward
    # The prefix is encoded once at batch 1; later forwards see each row's own tokens, not the prefix again.
    assert calls[0] == (1, len(common_prefix(prompts)))
    assert all(shape[1] < len(common_prefix(prompts)) for shape in calls[1:])
    for ids, answer in zip(prompts, batched):
        with torch.no_grad():
            alone = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                   pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        assert answer == alone


def test_dpo_implicit_rewards_by_hand():
    from tasks.stages.dpo import implicit_rewards

    policy = [(-10.0, 5, -20.0, 5), (-12.0, 4, -9.0, 4)]
    reference = [(-11.0, 5, -18.0, 5), (-12.0, 4, -10.0, 4)]
    rewards = implicit_rewards(policy, reference, beta=0.1)
    # pair 1: 0.1 * ((-10 + 11) - (-20 + 18)) = 0.3; pair 2: 0.1 * ((-12 + 12) - (-9 + 10)) = -0.1
    assert rewards["reward_accuracy"] == 0.5 and rewards["reward_margin"] == pytest.approx(0.1)


def test_benchmark_arms_are_built_the_same_way_on_cuda(monkeypatch):
    """No GPU needed: the plain and tunery arms get the same settings, and on CUDA both train in bf16."""
    sys.path.insert(0, str(REPO))
    from bench import train_speed
    from tasks.common import resolve_precision
    from tasks.stages.sft import SftConfig
    from tasks.train.training import resolve_base_precision

    class Args:
        steps = 4

    for method, shared in train_speed.settings(Args()).items():
        plain = train_speed.arm_plan(method, "trl", "cuda", shared)
        ours = train_speed.arm_plan(method, "tunery", "cuda", shared)
        assert {k: v for k, v in plain.items() if k not in ("family", "precision")} == \
            {k: v for k, v in ours.items() if k != "family"}
        assert plain["precision"] == "bf16" and train_speed.arm_plan(method, "trl", "cpu", shared)["precision"] \
            == "fp32"
        config = train_speed.tunery_config(ours)
        assert (config.lora.r, config.lora.alpha, config.max_steps, config.batch_size,
                config.learning_rate) == (shared["r"], shared["alpha"], shared["steps"],
                                          shared["batch_size"], shared["learning_rate"])
        assert config.lora.dropout == 0.0 and shared["dropout"] == 0.05  # tunery's gated default vs TRL's examples
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_precision("auto", "cuda") == "bf16"
    assert resolve_base_precision(SftConfig(), "cuda") == "bf16"


def test_train_speed_bench_quick_mode_prints_its_json_document():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "train_speed.py"), "--quick", "--json"],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert {"tokens_per_s_ratio", "peak_rss_ratio", "loss_delta_pct", "perplexity_delta_pct"} <= set(report["sft"])
    assert {"steps_per_s_ratio", "peak_rss_ratio", "preference_accuracy_delta"} <= set(report["dpo"])
    assert report["device"] == "cpu" and report["model"]
    for method in ("sft", "dpo"):
        for arm in report[method]["arms"].values():
            assert arm["train_s"] > 0 and arm["peak_rss_mb"] > 0 and arm["final_loss"] > 0
    assert report["sft"]["arms"]["trl"]["tokens_per_s"] > 0 and report["sft"]["tokens_per_s_ratio"] > 0


def test_base_precision_is_bf16_only_where_the_hardware_multiplies_bf16(monkeypatch):
    from core.errors import TuneryError
    from tasks.stages.sft import SftConfig
    from tasks.train import training

    monkeypatch.setattr(training, "cpu_flags", lambda: {"avx2", "fma"})
    assert training.resolve_base_precision(SftConfig(), "cpu") == "fp32"
    with pytest.raises(TuneryError, match="base_precision bf16: this CPU has no bf16 units"):
        training.resolve_base_precision(SftConfig(base_precision="bf16"), "cpu")
    monkeypatch.setattr(training, "cpu_flags", lambda: {"avx512_bf16"})
    assert training.resolve_base_precision(SftConfig(), "cpu") == "fp32"  # opt-in on a CPU: no gate run there yet
    assert training.resolve_base_precision(SftConfig(base_precision="bf16"), "cpu") == "bf16"
    # Weights that train, and quantized bases, keep their own dtype whatever is asked.
    assert training.resolve_base_precision(SftConfig(method="full", base_precision="bf16"), "cpu") == "fp32"


def test_a_bf16_frozen_base_keeps_fp32_adapters_and_trains(tiny_model_dir, prepared, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from tasks.stages.sft import SftConfig, train_sft
    from tasks.train import training

    monkeypatch.setattr(training, "cpu_flags", lambda: {"avx512_bf16"})  # emulated here if absent: tiny, so fine
    result = train_sft(SftConfig(base_precision="bf16", max_steps=3, batch_size=4, learning_rate=5e-3,
                                 max_length=128), str(tiny_model_dir), prepared.artifact_path, tmp_path / "out", "cpu")
    assert result.info["base_precision"] == "bf16"
    adapter = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert all(t.dtype == torch.float32 for t in adapter.values())
    assert all(t.abs().max() > 0 for k, t in adapter.items() if "lora_B" in k)


def test_sft_batch_order_is_length_grouped_and_independent_of_dropouts_random_draws(tiny_model_dir, garden_rows,
                                                                                   tmp_path):
    """Two runs that differ only in a numeric setting (LoRA dropout draws random numbers, no dropout draws none)
    must train on the same batches, or the parity gate compares different data."""
    from datasets import Dataset
    from trl import SFTConfig

    from tasks.models import encode_chat, load_model, load_tokenizer
    from tasks.stages.sft import scored_sft_trainer

    tok = load_tokenizer(str(tiny_model_dir))
    rows = [encode_chat(tok, r["messages"], 96) for r in garden_rows]
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, seed=3, use_cpu=True,
                     train_sampling_strategy="group_by_length", report_to="none", completion_only_loss=True)
    trainer = scored_sft_trainer()(model=load_model(str(tiny_model_dir)), args=args,
                                   train_dataset=Dataset.from_list(rows), processing_class=tok)
    orders = []
    for draws in (0, 1000):  # what dropout would have consumed of the global generator before the next epoch
        torch.manual_seed(3)
        torch.rand(draws)
        orders.append(list(trainer._get_train_sampler()))
    assert orders[0] == orders[1]
    assert sorted(orders[0]) == list(range(len(rows)))
    lengths = [len(rows[i]["input_ids"]) for i in orders[0]]
    assert max(lengths[:4]) == max(lengths)  # grouped by length, the longest batch first


_CHECKPOINTING = """
import json, sys
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
from tasks.train.training import keep_matmuls_checkpointing

def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024

mode, hidden, layers, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                                     num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2))
if mode == "selective":
    keep_matmuls_checkpointing(model)
model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
model.train()
ids = torch.randint(0, 256, (4, tokens // 4))
before = rss()
loss = model(input_ids=ids, labels=ids).loss
kept = rss() - before  # what the forward pass keeps for the backward pass (and its output)
loss.backward()
grads = {n: p.grad.flatten()[:64].tolist() for n, p in model.named_parameters() if p.requires_grad}
print(json.dumps({"loss": loss.item(), "grads": grads, "activation_mb": kept}))
"""


def test_selective_checkpointing_gives_the_same_gradients_and_keeps_less(tmp_path):
    """tunery's default keeps the projections' and attention's outputs and recomputes the rest: the loss and every
    LoRA gradient are the plain computation's, and the step's peak memory is much lower."""
    runs = {}
    # A fixed mmap threshold: glibc then maps every tensor over 64 KB on its own and unmaps it when freed, so the
    # resident size counts the tensors alive (the default threshold grows after frees and keeps freed memory).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for mode in ("plain", "selective"):
        proc = subprocess.run([sys.executable, "-c", _CHECKPOINTING, mode, "256", "4", "8192"], capture_output=True,
                              text=True, cwd=REPO, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    plain, selective = runs["plain"], runs["selective"]
    assert selective["loss"] == pytest.approx(plain["loss"], abs=1e-6)
    assert selective["grads"].keys() == plain["grads"].keys() and len(plain["grads"]) == 4 * 7 * 2
    for name, g in plain["grads"].items():
        torch.testing.assert_close(torch.tensor(selective["grads"][name]), torch.tensor(g), atol=1e-6, rtol=1e-5,
                                   msg=name)
    assert selective["activation_mb"] < 0.7 * plain["activation_mb"], runs
