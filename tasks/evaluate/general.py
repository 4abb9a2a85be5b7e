"""The forgetting check: a general multiple-choice suite scored by the log-likelihood of each choice.

A fine-tune that teaches a persona or a domain can cost the model what it knew before. Each version is scored on a
general suite (data/general: knowledge, reading and arithmetic items written for tunery, or `eval.general`), and its
accuracy is compared with its parent's: the drop, in points of accuracy, is recorded and gated.

An item is {"question", "choices": [...], "answer": index, "category"?}. The model reads `Question: ...\nAnswer:`
and each choice is scored as the continuation ` CHOICE`: its summed log-likelihood divided by its length in bytes
(lm-evaluation-harness's `acc_norm`, so a long choice is not penalised for its length). The highest-scoring choice
is the model's answer. Both backends score the same token ids: transformers, and an export's GGUF through
llama.cpp, which evaluates the question once and each choice on top of its KV cache.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import TuneryError

SUITE = Path(__file__).resolve().parents[2] / "data" / "general"
MAX_REPORTED_ERRORS = 10


def suite_files(path: str | Path | None) -> list[Path]:
    """The JSONL files of a suite: a file, or every *.jsonl of a folder (None or "default": the packaged suite)."""
    path = Path(path) if path and path != "default" else SUITE
    if not path.exists():
        raise TuneryError(f"{path}: no such file or folder (eval.general)")
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files:
        raise TuneryError(f"{path}: no .jsonl files in the folder (eval.general)")
    return files


def _item_problem(data: Any) -> str | None:
    if not isinstance(data, dict):
        return "expected a JSON object"
    unknown = sorted(set(data) - {"question", "choices", "answer", "category"})
    if unknown:
        return f"unknown field(s) {', '.join(unknown)}"
    if not isinstance(data.get("question"), str) or not data["question"].strip():
        return "field 'question': expected a non-empty string"
    choices = data.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip()
                                                                    for c in choices):
        return "field 'choices': expected a list of at least 2 non-empty strings"
    if len(set(choices)) != len(choices):
        return "field 'choices': two choices are the same"
    answer = data.get("answer")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        return f"field 'answer': expected the index of a choice (0..{len(choices) - 1}), got {answer!r}"
    if data.get("category") is not None and not isinstance(data["category"], str):
        return "field 'category': expected a string"
    return None


def load_suite(path: str | Path | None = None) -> list[dict[str, Any]]:
    """Every item of the suite (`path` as suite_files takes it), checked; TuneryError listing each bad line by file
    and line."""
    from tasks.data.rows import Unreadable, read_rows

    items, errors = [], []
    for file in suite_files(path):
        for row in read_rows(file):
            problem = row.data.problem if isinstance(row.data, Unreadable) else _item_problem(row.data)
            if problem:
                errors.append(f"  {row.source}: {problem}")
            else:
                items.append(row.data)
    if errors:
        shown = errors[:MAX_REPORTED_ERRORS] + ([f"  ... and {len(errors) - MAX_REPORTED_ERRORS} more"]
                                               if len(errors) > MAX_REPORTED_ERRORS else [])
        raise TuneryError(f"{len(errors)} bad multiple-choice item(s) in the general suite:\n" + "\n".join(shown))
    if not items:
        raise TuneryError(f"{path or SUITE}: the general suite has no items")
    return items


def encode_items(tokenizer, items: list[dict[str, Any]]) -> list[tuple[list[int], list[list[int]]]]:
    """(question ids, [choice ids...]) per item: the question with the tokenizer's special tokens (BOS where it has
    one), each choice without, so every backend scores the same ids."""
    out = []
    for item in items:
        prompt = tokenizer(f"Question: {item['question'].strip()}\nAnswer:", add_special_tokens=True)["input_ids"]
        choices = [tokenizer(f" {c.strip()}", add_special_tokens=False)["input_ids"] for c in item["choices"]]
        out.append((prompt, choices))
    return out


def accuracy(items: list[dict[str, Any]], logliks: list[list[float]], prefix: str = "general") -> dict[str, float]:
    """`<prefix>_accuracy` overall and per category from each choice's log-likelihood (acc_norm: per byte of the
    choice), plus `<prefix>_items`."""
    right = []
    for item, scores in zip(items, logliks):
        normed = [s / max(1, len(f" {c.strip()}".encode())) for s, c in zip(scores, item["choices"])]
        right.append(int(np.argmax(normed)) == item["answer"])
    metrics = {f"{prefix}_accuracy": sum(right) / len(right), f"{prefix}_items": float(len(right))}
    for category in sorted({i.get("category") for i in items if i.get("category")}):
        hits = [r for i, r in zip(items, right) if i.get("category") == category]
        metrics[f"{prefix}_accuracy/{category}"] = sum(hits) / len(hits)
    return metrics


def hf_logliks(model, tokenizer, items: list[dict[str, Any]], batch_size: int = 16, progress: bool = False
               ) -> list[list[float]]:
    """Each choice's summed log-likelihood after its question under a transformers model. The question is encoded
    once: a batch of questions (left-padded, logits at the last position only) fills the KV cache, which is then
    copied to each of their choices for a second pass over the choice tokens alone."""
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = encode_items(tokenizer, items)
    out: list[list[float] | None] = [None] * len(items)
    order = sorted(range(len(items)), key=lambda i: len(encoded[i][0]))  # similar lengths pad little
    model.eval()
    for at in tqdm(range(0, len(order), batch_size), desc="general suite", unit="batch", disable=not progress):
        group = order[at:at + batch_size]
        questions = [encoded[i][0] for i in group]
        width = max(map(len, questions))
        ids = torch.tensor([[pad] * (width - len(q)) + q for q in questions], device=device)
        mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in questions], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            first = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                          logits_to_keep=1)
            next_logp = first.logits[:, -1].float().log_softmax(-1)  # predicts each choice's first token
            owner = [g for g, i in enumerate(group) for _ in encoded[i][1]]
            choices = [c for i in group for c in encoded[i][1]]
            cache = first.past_key_values
            cache.reorder_cache(torch.tensor(owner, device=device))  # one copy of its question per choice
            longest = max(map(len, choices))
            c_ids = torch.tensor([c + [pad] * (longest - len(c)) for c in choices], device=device)
            c_mask = torch.tensor([[1] * len(c) + [0] * (longest - len(c)) for c in choices], device=device)
            lengths = mask.sum(-1)[owner]
            second = model(input_ids=c_ids, attention_mask=torch.cat([mask[owner], c_mask], dim=1),
                           position_ids=lengths[:, None] + torch.arange(longest, device=device),
                           past_key_values=cache, use_cache=False)
            logp = second.logits.float().log_softmax(-1)
        scores = []
        for row, (g, choice) in enumerate(zip(owner, choices)):
            total = float(next_logp[g, choice[0]])
            if len(choice) > 1:
                total += float(logp[row, torch.arange(len(choice) - 1), torch.tensor(choice[1:])].sum())
            scores.append(total)
        at_row = 0
        for i in group:
            n = len(encoded[i][1])
            out[i] = scores[at_row:at_row + n]
            at_row += n
    return out  # type: ignore[return-value]


def gguf_logliks(path: Path, tokenizer, items: list[dict[str, Any]], threads: int | None = None
                 ) -> list[list[float]]:
    """The same log-likelihoods from a GGUF through llama.cpp: the question is evaluated once, each choice on top of
    its KV cache (the context is cut back to the question before the next choice)."""
    from tasks.export.distribution import log_softmax
    from tasks.export.verify import last_logits, open_gguf

    encoded = encode_items(tokenizer, items)
    n_ctx = max(len(p) + max(len(c) for c in cs) for p, cs in encoded) + 8
    llm = open_gguf(path, n_ctx=max(n_ctx, 64), logits_all=True, threads=threads)
    out = []
    try:
        for prompt, choices in encoded:
            # The question's logits are needed at its last position only (llama-cpp-python's flag, pinned
            # version): computing and copying the vocabulary's logits at every question token would double the time.
            llm.reset()
            llm._logits_all = False
            llm.eval(prompt)
            first = log_softmax(last_logits(llm).copy())
            llm._logits_all = True
            scores = []
            for choice in choices:
                llm.n_tokens = len(prompt)
                llm.eval(choice)
                total = float(first[choice[0]])
                if len(choice) > 1:
                    logp = log_softmax(np.array(llm.scores[len(prompt):len(prompt) + len(choice) - 1],
                                                 dtype=np.float32))
                    total += float(logp[np.arange(len(choice) - 1), choice[1:]].sum())
                scores.append(total)
            out.append(scores)
    finally:
        llm.close()
    return out


def drop_points(parent_accuracy: float | None, accuracy_now: float | None) -> float | None:
    """How far accuracy fell from the parent's, in points (0.42 -> 0.39 is 3.0); negative when it rose."""
    if parent_accuracy is None or accuracy_now is None or math.isnan(parent_accuracy):
        return None
    return 100 * (parent_accuracy - accuracy_now)
