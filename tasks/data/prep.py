"""Stage `prep`: read a dataset (tasks.data.rows: every row validated and normalised), de-duplicate, split, hash, check
for contamination, write to disk. Nothing is written unless all rows are good; the folder is content-addressed and
recorded as a `PreparedData`.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.errors import TuneryError
from core.files import read_json, write_json
from core.home import atomic_dir, datasets_dir
from tasks.data.contamination import ContaminationConfig
from tasks.data.rows import load_examples


class PrepConfig(BaseModel):
    """How the training data is read, checked and split."""

    model_config = ConfigDict(extra="forbid")

    train: list[str] = Field(description="Data file(s) or `datasets` folders, relative to the config file.")
    validation: list[str] | None = Field(
        None, description="Held-out file(s). When absent, `val_fraction` of the rows is held out deterministically."
    )
    format: Literal["auto", "chat", "prompt", "alpaca", "preference", "text"] = Field(
        "auto", description="Row format; auto detects it from the first row of each file."
    )
    val_fraction: float = Field(0.1, gt=0, lt=1, description="Share of rows held out when no validation file is given.")
    system_prompt: str | None = Field(
        None, description="System message added to chat examples that have none (e.g. a persona)."
    )
    max_rows: int | None = Field(None, gt=0, description="Use only the first N rows of each file (quick trials).")
    seed: int = Field(0, description="Mixed into the split hash: a different seed holds out different rows.")
    contamination: ContaminationConfig = Field(default_factory=ContaminationConfig,
                                               description="Held-out and general-suite rows inside the training "
                                                           "rows: found, reported and refused above a share.")

    @field_validator("train", "validation", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


# ---------------------------------------------------------------- de-duplication, split, hash


def canonical(example: dict[str, Any]) -> str:
    """A stable text form of an example: equal examples (ignoring outer whitespace) give equal strings."""

    def strip(x: Any) -> Any:
        if isinstance(x, str):
            return x.strip()
        if isinstance(x, list):
            return [strip(v) for v in x]
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items()}
        return x

    return json.dumps(strip(example), sort_keys=True, ensure_ascii=False)


def deduplicate(examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop repeated examples, keeping the first occurrence and the original order."""
    seen: set[str] = set()
    out = []
    for ex in examples:
        key = canonical(ex)
        if key not in seen:
            seen.add(key)
            out.append(ex)
    return out


def split(examples: list[dict[str, Any]], val_fraction: float, seed: int = 0) -> tuple[list, list]:
    """Hold out ceil(n * val_fraction) examples chosen by a seeded content hash.

    The choice depends on the examples' content, not on file order or a random state, so the same data always
    gives the same split, and adding rows moves few existing ones across the boundary.
    """
    def rank(ex: dict[str, Any]) -> str:
        return hashlib.sha256(f"{seed}\n{canonical(ex)}".encode()).hexdigest()

    if len(examples) < 2:
        raise TuneryError(f"need at least 2 distinct examples to hold some out, got {len(examples)}")
    n_val = min(len(examples) - 1, max(1, math.ceil(len(examples) * val_fraction)))
    held = {id(ex) for ex in sorted(examples, key=rank)[:n_val]}
    return [ex for ex in examples if id(ex) not in held], [ex for ex in examples if id(ex) in held]


def content_hash(kind: str, train: list[dict], validation: list[dict]) -> str:
    """sha256 over the prepared examples: same data in, same hash out, whatever the source file looked like."""
    h = hashlib.sha256(kind.encode())
    for name, part in (("train", train), ("validation", validation)):
        h.update(f"\n#{name}\n".encode())
        for ex in part:
            h.update(canonical(ex).encode() + b"\n")
    return h.hexdigest()


# ---------------------------------------------------------------- the stage


@dataclass(frozen=True)
class PreparedData:
    """A prepared dataset: its content-addressed folder (train.jsonl, validation.jsonl, meta.json), the hash and kind
    (chat, preference or text) of its examples, and all that meta.json records (`info`: row counts, sources,
    contamination, the chat-template check). Stages hand it on; they read its folder, never a live dataset."""

    artifact_path: str
    data_hash: str
    kind: str
    info: dict[str, Any]

    @classmethod
    def load(cls, folder: str | Path) -> "PreparedData":
        """A prepared folder written earlier."""
        meta = load_prepared(folder)[0]
        return cls(str(folder), meta["data_hash"], meta["kind"], meta)

    @property
    def metrics(self) -> dict[str, float]:
        """Its counts as numbers: rows, duplicates removed, tokens, the contamination shares."""
        out = {k: float(self.info[k]) for k in ("train_rows", "validation_rows", "duplicates_removed")}
        if "tokens" in self.info:
            out["tokens"] = float(self.info["tokens"])
        out.update({f"contamination_{part}_share": found["share"]
                    for part, found in self.info.get("contamination", {}).items()})
        return out


def prepare(config: PrepConfig, base_dir: Path | None = None, tokenizer_path: str | None = None,
            write: bool = True) -> PreparedData:
    """Run the prep stage; write `datasets/<hash>/{train,validation}.jsonl` and `meta.json` under TUNERY_HOME
    (`write=False`: only read, check and hash, for planning; the folder named may not exist yet).

    Paths in `config` are resolved against `base_dir` (the config file's folder). When `tokenizer_path` is given,
    each chat example is rendered through the model's chat template, so a template that rejects the data (a
    system role it does not support, say) fails here instead of mid-training; token counts are recorded.
    The output folder is content-addressed: preparing the same data twice reuses it.
    """
    base_dir = Path(base_dir or ".")
    sources: dict[int, str] = {}
    kind, train, validation, counts = read_splits(config, base_dir, sources)
    digest = content_hash(kind, train, validation)
    out = datasets_dir() / digest[:16]
    meta = {"data_hash": digest, "kind": kind, "sources": [str(base_dir / p) for p in config.train], **counts,
            "train_rows": len(train), "validation_rows": len(validation)}
    meta["contamination"] = contamination(config.contamination, train, validation, sources)
    if tokenizer_path and kind == "chat":
        meta.update(_template_check(tokenizer_path, train + validation, sources))
    if write and not (out / "meta.json").exists():
        with atomic_dir(out, replace=True) as tmp:  # content-addressed
            for name, part in (("train", train), ("validation", validation)):
                with (tmp / f"{name}.jsonl").open("w", encoding="utf-8") as f:
                    for ex in part:
                        f.write(json.dumps(ex, ensure_ascii=False) + "\n")
            write_json(tmp / "meta.json", meta)
    return PreparedData(str(out), digest, kind, meta)


def read_splits(config: PrepConfig, base_dir: Path, sources: dict[int, str]
                ) -> tuple[str, list[dict], list[dict], dict[str, int]]:
    """Read, check and de-duplicate the training rows and hold some out: the config's validation files (examples
    also in them leave the training split) or a seeded split. Returns (kind, train, validation, counts of rows
    read, duplicates and overlap removed); `sources` learns which file and line each example came from."""
    train_paths = [base_dir / p for p in config.train]
    files = ", ".join(str(p) for p in train_paths)
    kind, train = load_examples(train_paths, config.format, config.system_prompt, config.max_rows, sources)
    n_raw = len(train)
    train = deduplicate(train)
    duplicates = n_raw - len(train)
    overlap = 0
    if config.validation:
        val_paths = [base_dir / p for p in config.validation]
        val_kind, validation = load_examples(val_paths, config.format, config.system_prompt, config.max_rows,
                                             sources)
        if val_kind != kind:
            raise TuneryError(f"validation data holds {val_kind} examples but training data holds {kind}")
        validation = deduplicate(validation)
        held = {canonical(ex) for ex in validation}
        # An example in both splits would make held-out perplexity meaningless.
        overlap = sum(canonical(ex) in held for ex in train)
        train = [ex for ex in train if canonical(ex) not in held]
    else:
        if len(train) < 2:
            raise TuneryError(f"{files}: need at least 2 distinct examples to hold some out, got {len(train)} "
                              f"({n_raw} read, {duplicates} duplicate(s) removed)")
        train, validation = split(train, config.val_fraction, config.seed)
    if not train:
        raise TuneryError(f"{files}: no training examples left after removing duplicates and the {overlap} "
                          "example(s) that are also in the validation data")
    return kind, train, validation, {"rows_read": n_raw, "duplicates_removed": duplicates,
                                     "validation_overlap_removed": overlap}


def contamination(config: ContaminationConfig, train: list[dict], validation: list[dict], sources: dict[int, str]
                  ) -> dict[str, dict[str, Any]]:
    """tasks.data.contamination's checks of the held-out rows and of the general suite against the training rows:
    {heldout: report, general: report}. Raises TuneryError, naming the overlapping rows, above the allowed shares."""
    from tasks.data import contamination as check
    from tasks.evaluate.general import load_suite

    train_text = [check.row_text(ex) for ex in train]
    train_names = [sources.get(id(ex), f"training row {i + 1}") for i, ex in enumerate(train)]
    found = {"heldout": check.report(
        check.overlaps(train_text, [check.row_text(ex) for ex in validation], config.ngram, config.near_threshold),
        [sources.get(id(ex), f"held-out row {i + 1}") for i, ex in enumerate(validation)], train_names)}
    if found["heldout"]["share"] > config.max_heldout_share:
        raise TuneryError(check.describe("held-out rows", found["heldout"], config.max_heldout_share))
    if config.general:
        items = load_suite(config.general)
        found["general"] = check.report(
            check.overlaps(train_text, [check.item_text(i) for i in items], config.ngram, config.near_threshold),
            [f"general item {i + 1} ({item['question'][:40]!r})" for i, item in enumerate(items)], train_names)
        if found["general"]["share"] > config.max_general_share:
            raise TuneryError(check.describe("general-suite items", found["general"], config.max_general_share))
    return found


def _template_check(tokenizer_path: str, examples: list[dict], sources: dict[int, str]) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    if not tok.chat_template:
        raise TuneryError(f"{tokenizer_path}: the tokenizer has no chat template; chat data needs one")
    total = 0
    for i, ex in enumerate(examples):
        try:
            ids = tok.apply_chat_template(ex["messages"], tokenize=True, return_dict=True)["input_ids"]
        except Exception as e:  # jinja raises TemplateError for e.g. an unsupported role
            raise TuneryError(f"{sources.get(id(ex), f'example {i + 1}')}: the chat template of {tokenizer_path} "
                              f"rejected it: {e}") from None
        total += len(ids)
    return {"tokens": total, "chat_template_sha256": hashlib.sha256(tok.chat_template.encode()).hexdigest()}


def load_prepared(data_dir: str | Path) -> tuple[dict, list[dict], list[dict]]:
    """Read a prepared dataset folder: (meta, train examples, validation examples)."""
    data_dir = Path(data_dir)
    if not (data_dir / "meta.json").exists():
        raise TuneryError(f"{data_dir}: not a prepared dataset (no meta.json); run `tunery prep` first")

    def jsonl(name: str) -> list[dict]:
        with (data_dir / f"{name}.jsonl").open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    return read_json(data_dir / "meta.json"), jsonl("train"), jsonl("validation")
