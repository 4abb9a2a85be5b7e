"""The exported file's next-token distribution against the fp32 model on the same held-out tokens: the file's
perplexity, mean KL(fp32 || file) and top-token agreement. A Q4 export does not reproduce a 135M model's greedy text,
so quantized exports are judged by these numbers rather than by their tokens."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import TuneryError
from tasks.export.verify import check, open_gguf


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _file_log_probs(path: Path, examples: list[dict[str, list[int]]], n_ctx: int, threads: int | None):
    """For each held-out example: (its ids cut to n_ctx, the positions that predict a scored token, the targets,
    the GGUF's next-token log-probabilities there)."""
    llm = open_gguf(path, n_ctx=n_ctx, logits_all=True, threads=threads)
    try:
        for ex in examples:
            ids, mask = ex["input_ids"][:n_ctx], ex["score_mask"][:n_ctx]
            positions = [t - 1 for t in range(1, len(ids)) if mask[t]]
            if not positions:
                continue
            llm.reset()
            llm.eval(ids)
            logits = np.array(llm.scores[:len(ids)], dtype=np.float32)
            yield ids, positions, [ids[p + 1] for p in positions], log_softmax(logits[positions])
    finally:
        llm.close()


def gguf_perplexity(path: Path, examples: list[dict[str, list[int]]], n_ctx: int, threads: int | None = None
                    ) -> float:
    """Perplexity of a GGUF on the scored tokens of held-out examples."""
    nll, count = 0.0, 0
    for _, positions, targets, q_log in _file_log_probs(path, examples, n_ctx, threads):
        nll -= q_log[np.arange(len(positions)), targets].sum()
        count += len(positions)
    if not count:
        raise TuneryError("no held-out tokens to measure perplexity on")
    return math.exp(nll / count)


def distribution_checks(path: Path, model, examples: list[dict[str, list[int]]], n_ctx: int,
                        threads: int | None = None) -> list[dict[str, Any]]:
    """Perplexity (file and HF fp32 on the same tokens), mean KL(fp32 || file) and top-token agreement."""
    import torch

    nll_file = nll_hf = kl = 0.0
    same_top = count = 0
    for ids, positions, targets, q_log in _file_log_probs(path, examples, n_ctx, threads):
        with torch.no_grad():
            hf_logits = model(torch.tensor([ids])).logits[0].float().numpy()
        p_log = log_softmax(hf_logits[positions])
        rows = np.arange(len(positions))
        nll_hf -= p_log[rows, targets].sum()
        nll_file -= q_log[rows, targets].sum()
        kl += (np.exp(p_log) * (p_log - q_log)).sum()
        same_top += int((p_log.argmax(-1) == q_log.argmax(-1)).sum())
        count += len(positions)
    if not count:
        raise TuneryError("no held-out tokens to measure perplexity and KL on")
    ppl_file, ppl_hf = math.exp(nll_file / count), math.exp(nll_hf / count)
    return [
        check("perplexity", None, ppl_file, f"{ppl_file:.3f} on {count} held-out tokens; HF fp32: {ppl_hf:.3f}"),
        check("perplexity_hf", None, ppl_hf, "the HF fp32 model on the same tokens"),
        check("mean_kl", None, kl / count, f"mean KL(fp32 || file) per token over {count} tokens"),
        check("same_top_token", None, same_top / count, "share of positions where both pick the same token"),
    ]
