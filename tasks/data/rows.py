"""Reading data files and normalising their rows: every bad row named by its file, line and field.

Accepted files: JSONL (one object a line), CSV, Parquet, or a folder saved by `datasets.Dataset.save_to_disk`.
Accepted row formats (docs/data.md lists them too):
  chat        {"messages": [{"role": ..., "content": ...}, ...]}
  prompt      {"prompt": ..., "completion": ...}
  alpaca      {"instruction": ..., "input": ... (optional), "output": ...}
  preference  {"prompt": ..., "chosen": ..., "rejected": ...}   (strings or message lists)
  text        {"text": ...}                                      (continued pretraining)
Any row may carry a `category` string; evaluation then reports every metric per category too.
Chat, prompt and alpaca rows become chat examples ({"messages": [...]}) for supervised fine-tuning.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from core.errors import TuneryError
from core.files import read_utf8

FORMATS = ("chat", "prompt", "alpaca", "preference", "text")
ROLES = ("system", "user", "assistant")
MAX_REPORTED_ERRORS = 10  # enough to see a pattern without flooding the terminal


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
