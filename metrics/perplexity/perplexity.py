"""Perplexity of a causal language model, as a local `evaluate` metric that needs no hub:

    import evaluate
    ppl = evaluate.load("metrics/perplexity")          # a path to this folder
    ppl.compute(predictions=["some text", ...], model_id="path/to/model", window=1024)

Fast and exact: texts are cut into windows (texts longer than `window` tokens are covered by windows that start
every `stride` tokens, each token scored once, with at least `window - stride` tokens of context after the first
window), all windows are sorted by length and batched with right padding that is never scored, and the result is
token-weighted: exp(sum of negative log-likelihoods / number of scored tokens). Logits are computed only at the
positions whose next token is scored (the model's `logits_to_keep` mask), and a prefix that every example shares (a
chat template's default system turn, a persona) is encoded once, its KV cache copied into each batch; nothing else
is cached. tunery's eval stage uses
`windowed_nll` with a mask of the tokens to score (the answer tokens of a chat example).
"""
from __future__ import annotations

import copy
import math

import datasets
import evaluate

_DESCRIPTION = "Token-weighted perplexity with batched, length-sorted sliding windows."
_CITATION = ""
_INPUTS = """
Args:
    predictions (list of str): the texts to score.
    model_id (str): a local folder (or hub id) of a causal LM with safetensors weights.
    batch_size (int): windows per forward pass. Default 8.
    window (int): tokens per window (the model's context or less). Default 1024.
    stride (int): tokens between window starts for long texts; default window // 2.
    add_start_token (bool): prepend the BOS token (when the tokenizer has one) so the first token is scored too.
    device (str): "cpu", "cuda", ...; default cuda when available.
Returns:
    perplexity (float): token-weighted over all texts; perplexities (list): one per text; tokens (int).
"""


def windows(length: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) of each window over `length` tokens: every position 1..length-1 is a target once."""
    if stride < 1 or stride > window:
        raise ValueError(f"stride must be between 1 and window ({window}), got {stride}")
    out, begin, scored_to = [], 0, 1
    while True:
        end = min(begin + window, length)
        out.append((begin, end, max(scored_to, begin + 1)))
        scored_to = end
        if end >= length:
            return out
        begin += stride


def windowed_nll(model, examples: list[dict], window: int, stride: int | None = None, batch_size: int = 8,
                 pad_id: int = 0, progress: bool = False) -> list[tuple[float, int]]:
    """(sum of negative log-likelihoods, number of scored tokens) of each example, in input order.

    An example is {"input_ids": [...], "score_mask": [...]} (mask 1 = score this token as a prediction target;
    without a mask every token but the first is scored).
    """
    import torch
    from tqdm.auto import tqdm

    stride = stride or max(1, window // 2)
    pieces = []  # (example index, ids of the window, target mask within the window)
    for i, ex in enumerate(examples):
        ids = list(ex["input_ids"])
        mask = list(ex.get("score_mask") or [1] * len(ids))
        for begin, end, first in windows(len(ids), window, stride):
            target = [0] * (end - begin)
            for t in range(first, end):
                target[t - begin] = mask[t]
            if any(target):
                pieces.append((i, ids[begin:end], target))
    pieces.sort(key=lambda p: len(p[1]))
    device = next(model.parameters()).device
    totals = [[0.0, 0] for _ in examples]
    model.eval()
    # Chat examples usually open with the same tokens (a template's default system turn, a persona): encode that
    # shared prefix once and give each batch a copy of its KV cache. Its last token is fed again with each row,
    # since its logits predict the first token after the prefix.
    shared, cache = shared_prefix(model, pieces, device)
    for start in tqdm(range(0, len(pieces), batch_size), desc="perplexity", unit="batch", disable=not progress):
        batch = [(i, piece[shared:], target[shared:]) for i, piece, target in pieces[start:start + batch_size]]
        width = max(len(p[1]) for p in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(batch), shared + width), dtype=torch.long)
        attn[:, :shared] = 1
        scored = torch.zeros((len(batch), width), dtype=torch.bool)
        for row, (_, piece, target) in enumerate(batch):
            ids[row, :len(piece)] = torch.tensor(piece)
            attn[row, shared:shared + len(piece)] = 1
            scored[row, :len(piece)] = torch.tensor(target, dtype=torch.bool)
        # Position t predicts token t+1: only the positions whose next token is a target get logits at all
        # (transformers' boolean `logits_to_keep`), and no KV cache is built beyond the shared prefix's.
        keep = torch.zeros_like(scored)
        keep[:, :-1] = scored[:, 1:]
        past = {}
        if cache is not None:
            past = {"past_key_values": copy.deepcopy(cache), "use_cache": True}
            past["past_key_values"].batch_repeat_interleave(len(batch))
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=attn.to(device), logits_to_keep=keep.to(device),
                           **(past or {"use_cache": False})).logits
            picked = torch.log_softmax(logits.float(), dim=-1)
            mask = scored[:, 1:].to(device)
            token_nll = -picked.gather(-1, ids[:, 1:].to(device)[mask].unsqueeze(-1)).squeeze(-1).double()
        counts = mask.sum(dim=1).tolist()
        offset = 0
        for (i, _, _), n in zip(batch, counts):
            totals[i][0] += float(token_nll[offset:offset + n].sum())
            totals[i][1] += n
            offset += n
    return [(nll, n) for nll, n in totals]


# A shared prefix shorter than this is recomputed with each batch: copying its cache would cost about as much.
MIN_SHARED_PREFIX = 16


def shared_prefix(model, pieces: list[tuple[int, list[int], list[int]]], device) -> tuple[int, object]:
    """(tokens to drop from the front of every piece, the KV cache of the tokens before them), or (0, None) when the
    pieces share fewer than MIN_SHARED_PREFIX leading tokens that no piece scores. The last shared token is not
    dropped: each row feeds it again, and its logits score the first token after the prefix."""
    import torch
    from transformers import DynamicCache

    if len(pieces) < 2:  # one piece alone gains nothing from a copy
        return 0, None
    first = pieces[0][1]
    n = min(len(p[1]) for p in pieces) - 1  # every row keeps at least two tokens
    for _, ids, target in pieces:
        scored_at = next((t for t, flag in enumerate(target) if flag), len(target))
        n = min(n, scored_at - 1)  # a scored token's predictor must be fed, not cached
        n = next((k for k in range(n) if ids[k] != first[k]), n)
    if n < MIN_SHARED_PREFIX:
        return 0, None
    with torch.inference_mode():
        cache = model(input_ids=torch.tensor([first[:n]], device=device), use_cache=True).past_key_values
    return (n, cache) if isinstance(cache, DynamicCache) else (0, None)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric", description=_DESCRIPTION, citation=_CITATION, inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, model_id, batch_size: int = 8, window: int = 1024, stride: int | None = None,
                 add_start_token: bool = True, device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(model_id, trust_remote_code=False, use_safetensors=True,
                                                     dtype=torch.float32).to(device)
        bos = [tokenizer.bos_token_id] if add_start_token and tokenizer.bos_token_id is not None else []
        examples = []
        for text in predictions:
            ids = bos + tokenizer(text, add_special_tokens=False)["input_ids"]
            examples.append({"input_ids": ids, "score_mask": [1] * len(ids)})
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        scores = windowed_nll(model, examples, window, stride, batch_size, pad)
        total_nll, total = sum(s[0] for s in scores), sum(s[1] for s in scores)
        return {
            "perplexity": math.exp(total_nll / total) if total else float("nan"),
            "perplexities": [math.exp(nll / n) if n else float("nan") for nll, n in scores],
            "tokens": total,
        }
