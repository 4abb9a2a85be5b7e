"""Stage `eval`: held-out perplexity, time to first token, decode speed and peak memory of one model version.

Every version is measured the same way on the same prepared validation split, so numbers compare across versions.
The measurement runs in a fresh child process: its peak resident memory is then what loading and running this
version costs, not whatever the calling process (a Prefect flow, a test) happened to hold already.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from core.errors import TuneryError
from tasks.common import peak_rss_mb, resolve_device
from tasks.data.prep import load_prepared
from tasks.evaluate.judge import JudgeConfig
from tasks.models import (answer_length, check_model_folder, encode_chat, greedy_answers, load_model, load_tokenizer,
                          prompt_ids, turn_end_ids)

METRIC_DIR = Path(__file__).resolve().parents[2] / "metrics" / "perplexity"
NO_LIMIT = 10**9

DEFAULT_PROMPTS = [
    "What should I plant in a shady corner?",
    "Explain in two sentences what a language model is.",
    "Give me three tips for writing clear emails.",
]


class EvalConfig(BaseModel):
    """How versions are measured. Keep it fixed across versions you want to compare."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(8, ge=1, description="Examples per forward pass for perplexity.")
    max_length: int = Field(512, ge=16, description="Tokens per perplexity window; longer examples are scored in "
                                                   "sliding windows (stride half a window), never truncated.")
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), min_length=1,
                               description="User prompts for the latency measurement (batch 1, greedy); the "
                                           "export checks answer them too, so at least one.")
    max_new_tokens: int = Field(32, ge=2, le=4096, description="Tokens generated per latency run.")
    repeats: int = Field(3, ge=1, description="Timed runs per prompt; the median is reported.")
    warmup: int = Field(1, ge=0, description="Untimed runs first (allocator, kernels, caches).")
    device: str = Field("auto", description="auto|cpu|cuda|mps for the measurement.")
    generation_rows: int | None = Field(None, ge=0, description="Held-out prompts per category answered greedily "
                                        "(None: every one; 0: none). The answers are scored against the reference "
                                        "answers (exact match, token F1, ROUGE-L, chrF: tasks/evaluate/scores.py), stored "
                                        "for the judge and the dashboard, and their length is measured.")
    answer_tokens: int = Field(128, ge=2, le=4096, description="Tokens a held-out answer may take before it is cut "
                                                               "(answers are compared with whole reference answers).")
    general: str | None = Field("default", description="The multiple-choice suite of the forgetting check "
                                "(tasks/evaluate/general.py): default (data/general, written for tunery), a JSONL file or a "
                                "folder of them (relative to the config file), or null to skip it.")
    judge: JudgeConfig | None = Field(None, description="A pairwise judge of each version's held-out answers "
                                      "against its parent's (tasks/evaluate/judge.py): a registered NAME:N, a .gguf file, or "
                                      "an OpenAI-compatible endpoint URL; or {model, endpoint_model, rows, ...}.")
    price_per_hour: float | None = Field(None, ge=0, description="What an hour of the measuring hardware costs "
                                                                 "(USD); gives the cost per million generated tokens.")


def scored_tokens(tokenizer, row: dict) -> dict[str, list[int]]:
    """Token ids of a prepared example and the mask of the tokens perplexity scores: the assistant's answer of a
    chat example (exactly the tokens sft learns), the chosen answer of a preference pair, every token of a text.
    Nothing is truncated: long examples are scored in sliding windows."""
    if "messages" in row:
        encoded = encode_chat(tokenizer, row["messages"], NO_LIMIT)
    elif "chosen" in row:
        encoded = encode_chat(tokenizer, row["prompt"] + row["chosen"], NO_LIMIT)
    else:
        ids = tokenizer(row["text"], add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
        encoded = {"input_ids": ids, "completion_mask": [1] * len(ids)}
    return {"input_ids": encoded["input_ids"], "score_mask": encoded["completion_mask"]}


def perplexity(model, tokenizer, rows: list[dict], max_length: int = 512, batch_size: int = 8,
               progress: bool = False) -> dict[str, float]:
    """Token-weighted perplexity of the scored tokens of `rows` (see `scored_tokens`) under `model`, in windows of
    `max_length` tokens. exp(sum of the scored tokens' negative log-likelihoods / number of scored tokens).
    Returns perplexity, nll_sum and tokens.
    """
    scores = answer_nll(model, tokenizer, [scored_tokens(tokenizer, r) for r in rows], max_length, batch_size,
                        progress)
    totals = _totals(scores)
    if totals is None:
        raise TuneryError("no answer tokens to score in the validation data")
    return totals


def _totals(scores: list[tuple[float, int]]) -> dict[str, float] | None:
    """perplexity, nll_sum and tokens of per-example (nll, tokens) scores; None when no token was scored."""
    nll_sum, n_tokens = sum(s[0] for s in scores), sum(s[1] for s in scores)
    if not n_tokens:
        return None
    return {"perplexity": math.exp(nll_sum / n_tokens), "nll_sum": nll_sum, "tokens": float(n_tokens)}


def pair_loglik(model, tokenizer, rows: list[dict], max_length: int = 512, batch_size: int = 8
                ) -> list[tuple[float, int, float, int]]:
    """(log-likelihood, answer tokens) of the chosen and of the rejected answer of each preference pair, in one
    batched pass: (chosen_ll, chosen_n, rejected_ll, rejected_n) per pair."""
    encoded = [scored_tokens(tokenizer, {"prompt": r["prompt"], "chosen": r[key]}) for r in rows
               for key in ("chosen", "rejected")]
    scores = answer_nll(model, tokenizer, encoded, max_length, batch_size)
    return [(-c[0], c[1], -r[0], r[1]) for c, r in zip(scores[0::2], scores[1::2])]


def preference_accuracy(model, tokenizer, rows: list[dict], max_length: int = 512, batch_size: int = 8
                        ) -> dict[str, float]:
    """How often the model itself prefers the chosen answer: its mean log-likelihood per answer token is higher
    for `chosen` than for `rejected` (per token, so a longer answer is not penalised for its length).

    `rows` are prepared preference examples. Returns preference_accuracy (share of pairs) and preference_margin
    (mean difference of the per-token log-likelihoods, chosen minus rejected).
    """
    return preference_stats(pair_loglik(model, tokenizer, rows, max_length, batch_size))


def preference_stats(scores: list[tuple[float, int, float, int]]) -> dict[str, float]:
    """`preference_accuracy`'s figures from pairs already scored by `pair_loglik`."""
    margins = [(cl / cn if cn else float("-inf")) - (rl / rn if rn else float("-inf")) for cl, cn, rl, rn in scores]
    finite = [m for m in margins if math.isfinite(m)]
    return {"preference_accuracy": sum(m > 0 for m in margins) / len(margins),
            "preference_margin": sum(finite) / len(finite) if finite else 0.0}


def answer_nll(model, tokenizer, encoded: list[dict[str, list[int]]], window: int = 512, batch_size: int = 8,
               progress: bool = False) -> list[tuple[float, int]]:
    """(sum of negative log-likelihoods, number of scored tokens) of each encoded example, in input order.

    The implementation is the local `evaluate` metric in metrics/perplexity (batched, length-sorted windows).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return perplexity_metric().windowed_nll(model, encoded, window, max(1, window // 2), batch_size, pad, progress)


@functools.cache
def perplexity_metric():
    """The module metrics/perplexity/perplexity.py, which `evaluate.load` also loads by its folder path."""
    spec = importlib.util.spec_from_file_location("tunery_perplexity_metric", METRIC_DIR / "perplexity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def latency(model, tokenizer, prompts: list[str] | list[list[dict]], max_new_tokens: int = 32, repeats: int = 3,
            warmup: int = 1, progress: bool = False, answers: list[list[int]] | None = None) -> dict[str, float]:
    """Time to first token and decode speed at batch 1 with greedy decoding, as a user of the model feels them.
    A prompt is a user turn's text or a whole conversation (a system prompt's tokens count in the prefill).

    Both come from the same timed generation of N tokens (forced by `min_new_tokens`, so an early end of turn does
    not shorten the run): a streamer notes when the first generated token arrives (TTFT: prefill plus one token),
    and decode speed is (N - 1) / (end - first token). Each prompt is warmed up, then timed `repeats` times;
    medians are reported. With `answers` (a list), the first warm-up run of each prompt is its natural greedy
    answer (it stops at the end of turn) and its token ids are appended there: the sample answers cost no extra run.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers.generation.streamers import BaseStreamer

    device = next(model.parameters()).device
    model.eval()

    class FirstToken(BaseStreamer):
        """generate() puts the prompt first, then each new token: the second put is the first generated token."""

        def __init__(self):
            self.puts, self.first = 0, None

        def put(self, value):
            self.puts += 1
            if self.puts == 2:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                self.first = time.perf_counter()

        def end(self):
            pass

    def timed(ids) -> tuple[float, float]:
        streamer = FirstToken()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                           min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                           streamer=streamer)
        if device.type == "cuda":
            torch.cuda.synchronize()
        end = time.perf_counter()
        return streamer.first - start, end - streamer.first

    ttfts, speeds = [], []
    for prompt in tqdm(prompts, desc="latency", unit="prompt", disable=not progress):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = torch.tensor([prompt_ids(tokenizer, messages)], device=device)
        if answers is not None:
            answers.append(greedy_answers(model, tokenizer, [ids[0].tolist()], max_new_tokens)[0])
        for _ in range(warmup - (answers is not None)):
            timed(ids)
        for _ in range(repeats):
            first, rest = timed(ids)
            ttfts.append(first)
            speeds.append((max_new_tokens - 1) / max(rest, 1e-9))
    return {"ttft_ms": 1000 * statistics.median(ttfts), "tokens_per_s": statistics.median(speeds)}


def strip_answer(tokenizer, token_ids: list[int]) -> str:
    """The text of a generated answer without special tokens or chat-template residue.

    Cut at the first special token (end of turn, a new role header), then drop any other special-token text and a
    leading role name the template might leave ("assistant\n").
    """
    text = tokenizer.decode(token_ids, skip_special_tokens=False)
    specials = sorted({t for t in tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()) if t},
                      key=len, reverse=True)
    cut = min((text.find(t) for t in specials if t in text), default=-1)
    if cut >= 0:
        text = text[:cut]
    for t in specials:
        text = text.replace(t, "")
    text = text.strip()
    for role in ("assistant:", "assistant\n", "Assistant:"):
        if text.startswith(role):
            text = text[len(role):].strip()
    return text


def generate(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, batch_size: int = 8
             ) -> list[tuple[str, int]]:
    """Greedy answers (stripped text, number of generated tokens up to the end of turn), batched."""
    stop = turn_end_ids(tokenizer)
    generated = greedy_answers(model, tokenizer, [prompt_ids(tokenizer, m) for m in conversations], max_new_tokens,
                               batch_size)
    return [(strip_answer(tokenizer, g), answer_length(g, stop)) for g in generated]


def by_category(rows: list[dict]) -> dict[str, list[int]]:
    """Row indices per category; rows without one are left out (they count in the overall numbers only)."""
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        if row.get("category"):
            groups.setdefault(row["category"], []).append(i)
    return groups


def quality(model, tokenizer, rows: list[dict], config: EvalConfig, progress: bool = False
            ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Perplexity overall and per category (token-weighted, so the categories add up to the whole), and the greedy
    answers to the held-out prompts (`held_out_answers`) with their scores and lengths. Returns (metrics, answers)."""
    from tasks.evaluate.scores import answer_scores

    encoded = [scored_tokens(tokenizer, r) for r in rows]
    scores = answer_nll(model, tokenizer, encoded, config.max_length, config.batch_size, progress)
    metrics = _totals(scores)
    if metrics is None:
        raise TuneryError("no answer tokens to score in the validation data")
    for cat, idx in by_category(rows).items():
        part = _totals([scores[i] for i in idx])
        if part is not None:
            metrics.update({f"{k}/{cat}": v for k, v in part.items()})
            metrics[f"rows/{cat}"] = float(len(idx))
    answers = held_out_answers(model, tokenizer, rows, config, progress)
    if answers:
        metrics.update(answer_scores(answers))
        metrics["gen_tokens"] = statistics.fmean(a["tokens"] for a in answers)
        for cat in sorted({a["category"] for a in answers if a["category"]}):
            metrics[f"gen_tokens/{cat}"] = statistics.fmean(a["tokens"] for a in answers if a["category"] == cat)
    return metrics, answers


def answered_rows(rows: list[dict], per_category: int | None) -> list[int]:
    """Indices of the held-out chat rows to answer: all, or the first `per_category` of each category (rows
    without one form their own group)."""
    if per_category is None or not rows or "messages" not in rows[0]:
        return list(range(len(rows))) if rows and "messages" in rows[0] else []
    groups: dict[str | None, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row.get("category") or None, []).append(i)
    return sorted(i for idx in groups.values() for i in idx[:per_category])


def answer_targets(rows: list[dict], per_category: int | None) -> list[dict[str, Any]]:
    """The held-out chat rows to answer (`answered_rows`), each as {prompt (the last user turn), reference (the
    held-out answer), category, messages (the conversation before that answer)}: what transformers and an export's
    GGUF both answer and are scored on."""
    return [{"prompt": next(m["content"] for m in reversed(rows[i]["messages"][:-1]) if m["role"] == "user"),
             "reference": rows[i]["messages"][-1]["content"], "category": rows[i].get("category"),
             "messages": rows[i]["messages"][:-1]} for i in answered_rows(rows, per_category)]


def held_out_answers(model, tokenizer, rows: list[dict], config: EvalConfig, progress: bool = False
                     ) -> list[dict[str, Any]]:
    """Greedy answers (up to `answer_tokens`) to the conversations of the held-out chat rows before their last
    answer: {prompt (the last user turn), reference (the held-out answer), answer, category, tokens}."""
    targets = answer_targets(rows, config.generation_rows)
    if progress and targets:
        print(f"answering {len(targets)} held-out prompts (up to {config.answer_tokens} tokens each)",
              file=sys.stderr)
    generated = generate(model, tokenizer, [t["messages"] for t in targets], config.answer_tokens, config.batch_size)
    return [{"prompt": t["prompt"], "reference": t["reference"], "answer": text, "category": t["category"],
             "tokens": n} for t, (text, n) in zip(targets, generated)]


def measure(model_path: str, data_dir: str, config: EvalConfig, adapter: str | None = None,
            progress: bool = True) -> tuple[dict[str, float], list[dict[str, str]], list[dict[str, Any]]]:
    """Load a version and measure it in this process; return (metrics, sample answers to the fixed prompts, the
    held-out answers).

    A LoRA version is timed twice: as base plus adapter (`*_adapter` metrics, the extra matmuls an unmerged adapter
    costs at inference) and merged, which is how it is served and what the main latency metrics describe.
    """
    import torch

    if Path(model_path).exists():
        check_model_folder(Path(model_path))
    device = resolve_device(config.device)
    _, _, validation = load_prepared(data_dir)
    if not validation:
        raise TuneryError(f"{data_dir}: the validation split is empty; nothing to evaluate on")
    tokenizer = load_tokenizer(adapter or model_path)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    model = load_model(model_path, device=device, adapter=adapter)
    metrics: dict[str, float] = {}
    if adapter:
        timed = latency(model, tokenizer, config.prompts, config.max_new_tokens, config.repeats, config.warmup,
                        progress)
        metrics.update({f"{k}_adapter": v for k, v in timed.items()})
        model = model.merge_and_unload()
    measured, held_out = quality(model, tokenizer, validation, config, progress)
    metrics.update(measured)
    if config.general:
        from tasks.evaluate import general

        items = general.load_suite(config.general)
        metrics.update(general.accuracy(items, general.hf_logliks(model, tokenizer, items, 4 * config.batch_size,
                                                                  progress)))
    answers: list[list[int]] = []
    metrics.update(latency(model, tokenizer, config.prompts, config.max_new_tokens, config.repeats,
                           config.warmup, progress, answers=answers))
    if config.price_per_hour is not None:
        metrics["cost_per_mtok_usd"] = config.price_per_hour / 3600 / metrics["tokens_per_s"] * 1e6
    metrics["peak_rss_mb"] = peak_rss_mb()
    if torch.cuda.is_available():
        metrics["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    metrics["eval_rows"] = float(len(validation))
    samples = [{"prompt": p, "answer": strip_answer(tokenizer, a)} for p, a in zip(config.prompts, answers)]
    return metrics, samples, held_out


@dataclass(frozen=True)
class EvalResult:
    """What an evaluation measured: its metrics, the answers to the fixed prompts (`samples`: prompt, answer) and
    the greedy answers to the held-out prompts (`answers`: prompt, reference, answer, category, tokens)."""

    metrics: dict[str, float]
    samples: list[dict[str, str]]
    answers: list[dict[str, Any]]


def evaluate(model_path: str, data_dir: str, config: EvalConfig, adapter: str | None = None) -> EvalResult:
    """Run `measure` in a fresh Python process (clean peak-memory reading); return what it measured.

    Raises TuneryError naming the problem if the measurement fails.
    """
    from tasks.child import run_child

    spec = {"model_path": model_path, "data_dir": str(data_dir), "adapter": adapter, "config": config.model_dump()}
    result = run_child("tasks.evaluate.evaluation", spec, f"evaluation of {adapter or model_path}")
    return EvalResult(result["metrics"], result["samples"], result["answers"])


def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    metrics, samples, answers = measure(spec["model_path"], spec["data_dir"], EvalConfig(**spec["config"]),
                                        spec["adapter"])
    return {"metrics": metrics, "samples": samples, "answers": answers}


if __name__ == "__main__":
    from tasks.child import child_main

    raise SystemExit(child_main(_measure))
