"""Small file helpers every layer shares: JSON in and out, a content hash, UTF-8 text with a named bad line."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from core.errors import TuneryError


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def read_utf8(path: Path) -> str:
    """A text file's contents; TuneryError naming the file and the line of the first byte that is not UTF-8."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise TuneryError(f"{path} line {line}: not valid UTF-8 (byte 0x{data[e.start]:02x}); save the file as "
                          "UTF-8") from None


def write_json(path: Path, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
