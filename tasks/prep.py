"""Stage `prep`: read a dataset, validate every row, normalise it, de-duplicate, split, hash, write to disk.

Accepted files: JSONL (one object a line), CSV, Parquet, or a folder saved by `datasets.Dataset.save_to_disk`.
Accepted row formats (the README's *Data* section lists them too):
  chat        {"messages": [{"role": ..., "content": ...}, ...]}
  prompt      {"prompt": ..., "completion": ...}
  alpaca      {"instruction": ..., "input": ... (optional), "output": ...}
  preference  {"prompt": ..., "chosen": ..., "rejected": ...}   (strings or message lists)
  text        {"text": ...}                                      (continued pretraining)
Any row may carry a `category` string; evaluation then reports every metric per category too.
Chat, prompt and alpaca rows become chat examples ({"messages": [...]}) for supervised fine-tuning. Every bad row
is reported with its file, line and field before anything trains; nothing is written unless all rows are good.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.errors import TuneryError
from core.files import read_json, read_utf8, write_json
from core.home import atomic_dir, datasets_dir
from tasks.common import StageResult
from tasks.contamination import ContaminationConfig

FORMATS = ("chat", "prompt", "alpaca", "preference", "text")
ROLES = ("system", "user", "assistant")
MAX_REPORTED_ERRORS = 10  # enough to see a pattern without flooding the terminal


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


@dataclass
class Row:
    """One raw row and where it came from, so errors can name it."""

    source: str  # "file.jsonl line 7" / "file.parquet row 7"
    data: Any


# ---------------------------------------------------------------- reading


def read_rows(path: Path, max_rows: int | None = None) -> Iterator[Row]:
    """Yield the rows of one file or `datasets` folder, each labelled with its location.

    Raises TuneryError for a missing file, an unknown extension or a line that is not a JSON object.
    """
    path = Path(path)
    if not path.exists():
        raise TuneryError(f"{path}: no such file or folder")
    count = 0

    def limited(rows: Iterator[Row]) -> Iterator[Row]:
        nonlocal count
        for row in rows:
            if max_rows is not None and count >= max_rows:
                return
            count += 1
            yield row

    if path.is_dir():
        yield from limited(_read_hf_folder(path))
    elif path.suffix in (".jsonl", ".json"):
        yield from limited(_read_jsonl(path))
    elif path.suffix == ".csv":
        yield from limited(_read_csv(path))
    elif path.suffix == ".parquet":
        yield from limited(_read_parquet(path))
    else:
        raise TuneryError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .csv, .parquet or a datasets folder")


@dataclass(frozen=True)
class Unreadable:
    """A line that could not be read as a row (bad encoding, invalid JSON): reported with the file's other bad rows
    instead of stopping the scan at the first one."""

    problem: str


def _read_jsonl(path: Path) -> Iterator[Row]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path} line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield Row(where, Unreadable(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of "
                                            "the line); save the file as UTF-8"))
                continue
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                yield Row(where, Unreadable(f"invalid JSON ({e.msg} at column {e.colno})"))
                continue
            yield Row(where, data)


def _read_csv(path: Path) -> Iterator[Row]:
    # read_utf8 names the line of a bad byte, where the csv reader would stop with a traceback.
    with io.StringIO(read_utf8(path), newline="") as f:
        reader = csv.DictReader(f)
        start = 2  # line 1 is the header
        for record in reader:
            where = f"{path} line {start}"
            start = reader.line_num + 1  # a quoted field may span lines
            # CSV cells are strings; message lists and preference lists arrive as JSON text.
            yield Row(where, {k: _maybe_json(v) for k, v in record.items() if k is not None})


def _maybe_json(value: str | None) -> Any:
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    for number, record in enumerate(table.to_pylist(), start=1):
        yield Row(f"{path} row {number}", record)


def _read_hf_folder(path: Path) -> Iterator[Row]:
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as e:  # datasets raises several types for a folder that is not a saved dataset
        raise TuneryError(f"{path}: not a folder saved by datasets.save_to_disk ({e})") from None
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise TuneryError(f"{path}: dataset dict has no 'train' split (has {sorted(ds)})")
        ds = ds["train"]
    assert isinstance(ds, Dataset)
    for number, record in enumerate(ds, start=1):
        yield Row(f"{path} row {number}", record)


# ---------------------------------------------------------------- validation and normalisation


class RowError(Exception):
    def __init__(self, field: str, problem: str):
        super().__init__(f"field '{field}': {problem}")


def detect_format(data: Any) -> str:
    """The row format named by a row's keys (see the module docstring)."""
    if not isinstance(data, dict):
        raise RowError("(row)", f"expected a JSON object, got {type(data).__name__}")
    keys = set(data)
    if "messages" in keys:
        return "chat"
    if {"chosen", "rejected"} & keys:
        return "preference"
    if "instruction" in keys:
        return "alpaca"
    if "prompt" in keys or "completion" in keys:
        return "prompt"
    if "text" in keys:
        return "text"
    raise RowError(
        "(row)", f"no known columns among {sorted(keys)}; expected messages, prompt/completion, "
        "instruction/output, prompt/chosen/rejected or text"
    )


def _text(data: dict, key: str, required: bool = True) -> str:
    value = data.get(key)
    if value is None:
        if required:
            raise RowError(key, "missing")
        return ""
    if not isinstance(value, str):
        raise RowError(key, f"expected a string, got {type(value).__name__}")
    if required and not value.strip():
        raise RowError(key, "empty")
    return value


def _messages(value: Any, field: str, need_assistant_last: bool) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise RowError(field, "expected a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise RowError(where, f"expected an object with role and content, got {type(m).__name__}")
        extra = set(m) - {"role", "content"}
        if extra:
            raise RowError(f"{where}.{sorted(extra)[0]}", "unexpected key (messages carry role and content)")
        role = m.get("role")
        if role not in ROLES:
            raise RowError(f"{where}.role", f"expected one of {', '.join(ROLES)}, got {role!r}")
        if role == "system" and i != 0:
            raise RowError(f"{where}.role", "a system message may only come first")
        content = m.get("content")
        if not isinstance(content, str):
            raise RowError(f"{where}.content", f"expected a string, got {type(content).__name__}")
        if not content.strip():
            raise RowError(f"{where}.content", "empty")
        out.append({"role": role, "content": content})
    if need_assistant_last and out[-1]["role"] != "assistant":
        raise RowError(f"{field}[{len(out) - 1}].role", "the last message must be the assistant's answer to train on")
    return out


def normalise(data: Any, fmt: str, system_prompt: str | None = None) -> dict[str, Any]:
    """Validate one row of format `fmt` and return its normal form.

    chat/prompt/alpaca -> {"messages": [...]}; preference -> {"prompt": [...], "chosen": [...], "rejected": [...]};
    text -> {"text": ...}. An optional `category` string (support, marketing, ...) is kept, so evaluation can report
    every metric per category. Raises RowError naming the field at fault.
    """
    example = _normal_form(data, fmt, system_prompt)
    if isinstance(data, dict) and data.get("category") is not None:
        example["category"] = _text(data, "category").strip()
    return example


def _normal_form(data: Any, fmt: str, system_prompt: str | None) -> dict[str, Any]:
    found = detect_format(data)
    if found != fmt:
        raise RowError("(row)", f"looks like a {found} row, but this file's rows are {fmt}")
    if fmt == "chat":
        messages = _messages(data["messages"], "messages", need_assistant_last=True)
    elif fmt == "prompt":
        prompt = data.get("prompt")
        if isinstance(prompt, list):
            messages = _messages(prompt, "prompt", need_assistant_last=False)
        else:
            messages = [{"role": "user", "content": _text(data, "prompt")}]
        completion = data.get("completion")
        if isinstance(completion, list):
            messages += _messages(completion, "completion", need_assistant_last=True)
        else:
            messages.append({"role": "assistant", "content": _text(data, "completion")})
    elif fmt == "alpaca":
        instruction, extra = _text(data, "instruction"), _text(data, "input", required=False)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _text(data, "output")}]
    elif fmt == "preference":
        return _preference(data)
    else:
        return {"text": _text(data, "text")}
    if not any(m["role"] == "user" for m in messages):
        raise RowError("messages" if fmt == "chat" else "prompt", "no user message")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return {"messages": messages}


def _preference(data: dict) -> dict[str, Any]:
    prompt = data.get("prompt")
    if isinstance(prompt, list):
        prompt_msgs = _messages(prompt, "prompt", need_assistant_last=False)
    else:
        prompt_msgs = [{"role": "user", "content": _text(data, "prompt")}]
    answers = {}
    for key in ("chosen", "rejected"):
        value = data.get(key)
        if value is None:
            raise RowError(key, "missing")
        if isinstance(value, list):
            answers[key] = _messages(value, key, need_assistant_last=True)[-1:]
        else:
            answers[key] = [{"role": "assistant", "content": _text(data, key)}]
    if answers["chosen"][0]["content"].strip() == answers["rejected"][0]["content"].strip():
        raise RowError("rejected", "identical to chosen: a preference pair must differ")
    return {"prompt": prompt_msgs, **answers}


def example_kind(fmt: str) -> str:
    """The kind of prepared example a row format becomes: chat, preference or text."""
    return {"prompt": "chat", "alpaca": "chat"}.get(fmt, fmt)


def load_examples(paths: list[Path], fmt: str = "auto", system_prompt: str | None = None,
                  max_rows: int | None = None, sources: dict[int, str] | None = None
                  ) -> tuple[str, list[dict[str, Any]]]:
    """Read, validate and normalise every row of `paths`; return (kind, examples). With `sources`, each example's
    location ("file line N") is recorded there under `id(example)`, so later checks can name it.

    All files must hold the same kind of example. Raises TuneryError listing the bad rows (file, line, field).
    """
    errors: list[str] = []
    examples: list[dict[str, Any]] = []
    kinds: dict[str, str] = {}
    for path in paths:
        file_fmt = None if fmt == "auto" else fmt
        for row in read_rows(path, max_rows):
            if isinstance(row.data, Unreadable):
                errors.append(f"{row.source}: {row.data.problem}")
                continue
            try:
                if file_fmt is None:
                    file_fmt = detect_format(row.data)
                examples.append(normalise(row.data, file_fmt, system_prompt))
                if sources is not None:
                    sources[id(examples[-1])] = row.source
            except RowError as e:
                errors.append(f"{row.source}: {e}")
        if file_fmt is None:
            errors.append(f"{path}: no usable rows")
        else:
            kinds[str(path)] = example_kind(file_fmt)
    if errors:
        shown = "\n  ".join(errors[:MAX_REPORTED_ERRORS])
        more = f"\n  ... and {len(errors) - MAX_REPORTED_ERRORS} more" if len(errors) > MAX_REPORTED_ERRORS else ""
        raise TuneryError(f"{len(errors)} bad row(s), nothing was prepared:\n  {shown}{more}")
    if len(set(kinds.values())) > 1:
        raise TuneryError(f"files hold different kinds of examples: {kinds}")
    return next(iter(kinds.values())), examples


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


def prepare(config: PrepConfig, base_dir: Path | None = None, tokenizer_path: str | None = None,
            write: bool = True) -> StageResult:
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
    metrics = {k: float(meta[k]) for k in ("train_rows", "validation_rows", "duplicates_removed")}
    if "tokens" in meta:
        metrics["tokens"] = float(meta["tokens"])
    metrics.update({f"contamination_{part}_share": found["share"] for part, found in meta["contamination"].items()})
    return StageResult(stage="prep", artifact_path=str(out), metrics=metrics, info=meta)


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
    """tasks.contamination's checks of the held-out rows and of the general suite against the training rows:
    {heldout: report, general: report}. Raises TuneryError, naming the overlapping rows, above the allowed shares."""
    from tasks import contamination as check
    from tasks.general import load_suite

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
