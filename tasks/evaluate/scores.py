"""Answer scores: how close a version's greedy answers to held-out prompts are to the reference answers.

Four views of the same pair (answer, reference), each averaged over the answered rows, overall and per category:
- `exact`: the answer equals the reference after SQuAD's normalisation (lower case, no punctuation, no articles,
  single spaces). Strict: right for short factual answers, near 0 for free-form ones.
- `f1`: SQuAD's token F1 on the same normalised words (bag of words, precision and recall of shared words).
- `rougeL`: ROUGE-L F-measure (`rouge-score`, longest common subsequence of words, so word order counts).
- `chrf`: sacrebleu's sentence chrF (character n-gram F-score, 0-100), kinder to inflections and typos.

None of them says an answer is right in meaning; on free-form answers they say how much of the reference's wording
and content the answer shares, which is what a fine-tune towards the references moves.
"""
from __future__ import annotations

import collections
import functools
import re
import statistics
import string
from typing import Any

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, punctuation and the articles a/an/the removed, spaces collapsed."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def exact_match(answer: str, reference: str) -> float:
    return float(normalize(answer) == normalize(reference))


def token_f1(answer: str, reference: str) -> float:
    """SQuAD's token F1: 1.0 when both are empty after normalising, 0.0 when only one is."""
    ours, theirs = normalize(answer).split(), normalize(reference).split()
    if not ours or not theirs:
        return float(ours == theirs)
    shared = sum((collections.Counter(ours) & collections.Counter(theirs)).values())
    if not shared:
        return 0.0
    precision, recall = shared / len(ours), shared / len(theirs)
    return 2 * precision * recall / (precision + recall)


@functools.cache
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F-measure (rouge-score's default tokenizer: lower-cased alphanumeric words)."""
    return _rouge().score(reference, answer)["rougeL"].fmeasure


@functools.cache
def _chrf():
    from sacrebleu.metrics import CHRF

    return CHRF()


def chrf(answer: str, reference: str) -> float:
    """sacrebleu's sentence-level chrF (character 6-grams, beta 2), 0-100."""
    return _chrf().sentence_score(answer, [reference]).score


# A score `NAME` is recorded as `answer_NAME` (and `gguf_answer_NAME` on an export); declare it in core/metrics.py.
SCORERS = {"exact": exact_match, "f1": token_f1, "rougeL": rouge_l, "chrf": chrf}


def score_pair(answer: str, reference: str) -> dict[str, float]:
    return {name: fn(answer, reference) for name, fn in SCORERS.items()}


def answer_scores(rows: list[dict[str, Any]], prefix: str = "answer") -> dict[str, float]:
    """Mean scores of answered rows ({answer, reference, category?}): `<prefix>_<score>` overall and
    `<prefix>_<score>/<category>` per category, plus `<prefix>_rows`. Empty when no row was answered."""
    if not rows:
        return {}
    scored = [(r.get("category"), score_pair(r["answer"], r["reference"])) for r in rows]
    metrics = {f"{prefix}_{name}": statistics.fmean(s[name] for _, s in scored) for name in SCORERS}
    metrics[f"{prefix}_rows"] = float(len(scored))
    for category in sorted({c for c, _ in scored if c}):
        part = [s for c, s in scored if c == category]
        metrics.update({f"{prefix}_{name}/{category}": statistics.fmean(s[name] for s in part) for name in SCORERS})
    return metrics
