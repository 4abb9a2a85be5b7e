"""Contamination checks in prep: held-out rows (and the general suite of the forgetting check) that the training
rows already contain, exactly or nearly. A model evaluated on what it trained on looks better than it is.

Each row is compared as its text without system prompts (a persona prompt shared by every row is not a leak), in
the normalised words of tasks.evaluate.scores.normalize. A held-out row (or a general item: its question and right
answer) is contaminated when a training row
- is the same text (`exact`),
- shares a run of `ngram` words with it (`ngram`, default 13 as in GPT-3's contamination study: a copied passage
  inside a longer row; 8 words already matched stock phrases of the demo teacher's persona answers), or
- is a near-duplicate: the Jaccard similarity of their sets of character 5-grams, estimated with MinHash (128
  permutations) and found through locality-sensitive hashing (`datasketch`), is at least `near_threshold` (`near`:
  a reworded copy, words reordered or inflected, which shares no long run of words). Characters rather than words,
  because the rows are short: on the demo's 95 rows no two unrelated rows reach 0.23, while rewordings of one
  question-and-answer score 0.38-0.66.
The share of contaminated rows is recorded; above the configured share, prep refuses and names the rows.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tasks.evaluate.scores import normalize

SHINGLE = 5  # characters per shingle of the MinHash sets
PERMUTATIONS = 128
SHOWN = 5  # overlapping rows named in a refusal


class ContaminationConfig(BaseModel):
    """How prep looks for held-out and general-suite rows inside the training rows."""

    model_config = ConfigDict(extra="forbid")

    ngram: int = Field(13, ge=3, le=50, description="Words in a run shared with a training row that marks a row as "
                                                    "contaminated (GPT-3's contamination study used 13; shorter runs "
                                                    "catch stock phrases that answers share by style).")
    near_threshold: float = Field(0.5, gt=0, le=1, description="Estimated Jaccard similarity of character 5-gram "
                                                               "sets (MinHash) from which two rows are "
                                                               "near-duplicates.")
    max_heldout_share: float = Field(0.1, ge=0, le=1, description="Share of held-out rows that may be contaminated "
                                                                  "before prep refuses the data.")
    max_general_share: float = Field(0.05, ge=0, le=1, description="Share of the general suite's items that the "
                                                                   "training rows may contain before prep refuses.")
    general: str | None = Field("default", description="The general suite compared (default: the eval's "
                                                       "`eval.general`); null: skip that comparison.")


def row_text(example: dict[str, Any]) -> str:
    """The text of a prepared example that a leak would copy: its turns without system prompts, a pair's prompt
    and chosen answer, a raw text."""
    if "messages" in example:
        return "\n".join(m["content"] for m in example["messages"] if m["role"] != "system")
    if "chosen" in example:
        turns = [m for part in ("prompt", "chosen") for m in example[part] if m["role"] != "system"]
        return "\n".join(m["content"] for m in turns)
    return example["text"]


def item_text(item: dict[str, Any]) -> str:
    """A general-suite item as it would appear in training data: the question and its right answer."""
    return f"{item['question']}\n{item['choices'][item['answer']]}"


def _shingles(text: str) -> set[str]:
    """The character 5-grams of a normalised text (the whole text when shorter)."""
    if len(text) <= SHINGLE:
        return {text} if text else set()
    return {text[i:i + SHINGLE] for i in range(len(text) - SHINGLE + 1)}


def _minhash(text: str):
    from datasketch import MinHash

    m = MinHash(num_perm=PERMUTATIONS, seed=1)
    m.update_batch([s.encode() for s in _shingles(text)])
    return m


def overlaps(train: list[str], others: list[str], ngram: int = 13, near_threshold: float = 0.5
             ) -> list[dict[str, Any] | None]:
    """For each text of `others`: None, or how a training text contains it: {kind: exact | ngram | near, train:
    index of the training text, detail}."""
    from datasketch import MinHashLSH

    train_words = [normalize(t).split() for t in train]
    exact = {" ".join(w): i for i, w in reversed(list(enumerate(train_words)))}
    grams: dict[str, int] = {}
    for i, words in enumerate(train_words):
        for k in range(len(words) - ngram + 1):
            grams.setdefault(" ".join(words[k:k + ngram]), i)
    lsh = MinHashLSH(threshold=near_threshold, num_perm=PERMUTATIONS)
    hashes = {}
    for i, words in enumerate(train_words):
        if words:
            hashes[i] = _minhash(" ".join(words))
            lsh.insert(i, hashes[i])
    found: list[dict[str, Any] | None] = []
    for text in others:
        words = normalize(text).split()
        joined = " ".join(words)
        if joined and joined in exact:
            found.append({"kind": "exact", "train": exact[joined], "detail": "the same text"})
            continue
        shared = next((g for g in (" ".join(words[k:k + ngram]) for k in range(len(words) - ngram + 1))
                       if g in grams), None)
        if shared is not None:
            found.append({"kind": "ngram", "train": grams[shared], "detail": f"shares {ngram} words: {shared!r}"})
            continue
        best = None
        if words:
            mine = _minhash(joined)
            scored = [(mine.jaccard(hashes[j]), j) for j in lsh.query(mine)]
            best = max((s for s in scored if s[0] >= near_threshold), default=None)
        found.append(None if best is None else {"kind": "near", "train": best[1],
                                                "detail": f"near-duplicate (Jaccard ~{best[0]:.2f})"})
    return found


def report(found: list[dict[str, Any] | None], names: list[str], train_names: list[str]) -> dict[str, Any]:
    """{share, rows, of, examples: [{row, train, kind, detail}]} of an `overlaps` result, rows named."""
    hits = [(i, f) for i, f in enumerate(found) if f is not None]
    return {"share": len(hits) / len(found) if found else 0.0, "rows": len(hits), "of": len(found),
            "examples": [{"row": names[i], "train": train_names[f["train"]], "kind": f["kind"],
                          "detail": f["detail"]} for i, f in hits]}


def describe(what: str, found: dict[str, Any], limit: float) -> str:
    """A refusal's text: the share against the limit and the first overlapping rows."""
    lines = [f"{found['rows']} of {found['of']} {what} ({found['share']:.0%}) are contained in the training rows, "
             f"more than the {limit:.0%} allowed (data.contamination):"]
    lines += [f"  {e['row']} ~ {e['train']}: {e['kind']}, {e['detail']}" for e in found["examples"][:SHOWN]]
    if found["rows"] > SHOWN:
        lines.append(f"  ... and {found['rows'] - SHOWN} more")
    return "\n".join(lines)
