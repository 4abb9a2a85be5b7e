"""Every difference between the registry's two SQL dialects, DuckDB and PostgreSQL, in one place.

The registry's SQL (store.py, exports.py, the migrations) is written once, in the subset both databases share, with
`?` placeholders. What differs is rewritten here for PostgreSQL, where psycopg takes `%s` placeholders:

- placeholders: `?` becomes `%s` (and a literal `%` becomes `%%`), outside quoted text;
- column types: DuckDB's `DOUBLE` is PostgreSQL's `DOUBLE PRECISION`;
- functions: DuckDB's `uuid()` is PostgreSQL's `gen_random_uuid()`;
- sequences: PostgreSQL sets a sequence's next value; DuckDB cannot, so nextval is drawn up to it
  (`restart_sequence`, after `tunery registry copy` kept the ids);
- statements only one database needs: a migration statement under a `-- only: duckdb` line runs on that database
  alone (migration 006 moves keys out of JSON text with DuckDB's JSON functions; a PostgreSQL registry is created
  after it, so it has no such rows).
"""
from __future__ import annotations

import re
from functools import lru_cache

DIALECTS = ("duckdb", "postgresql")
_QUOTED = re.compile(r"('(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*)")  # quoted text and comments
_MARKER = re.compile(r"^\s*--\s*only:\s*(\w+)\s*$")


@lru_cache(maxsize=512)
def sql(text: str, dialect: str, placeholders: bool = True) -> str:
    """`text` (DuckDB dialect, `?` placeholders) as `dialect` runs it; `placeholders=False` for a statement run
    without parameters (a migration), whose `%` and `?` stay as written."""
    if dialect == "duckdb":
        return text
    parts = _QUOTED.split(text)
    if placeholders:  # psycopg reads every `%` of the text, quoted or not
        parts = [p.replace("%", "%%") for p in parts]
    for i in range(0, len(parts), 2):  # even parts are outside quotes and comments
        part = parts[i]
        if placeholders:
            part = part.replace("?", "%s")
        part = re.sub(r"\bDOUBLE\b(?!\s+PRECISION)", "DOUBLE PRECISION", part)
        parts[i] = re.sub(r"\buuid\(\)", "gen_random_uuid()", part)
    return "".join(parts)


def statements(migration: str, dialect: str) -> list[str]:
    """A migration file's statements for `dialect`: comments dropped, `-- only: X` statements kept for X alone."""
    out, current, only = [], [], None
    for line in migration.splitlines():
        marker = _MARKER.match(line)
        if marker:
            only = marker.group(1)
            continue
        text = "".join(p for p in _QUOTED.split(line) if not p.startswith("--")).rstrip()
        if not text.strip():
            continue
        current.append(text)
        if text.endswith(";"):
            if only in (None, dialect):
                out.append(sql("\n".join(current).rstrip(";"), dialect, placeholders=False))
            current, only = [], None
    if current:
        raise ValueError(f"a migration statement does not end with ';': {' '.join(current)[:80]}")
    return out


def restart_sequence(name: str, next_value: int, dialect: str) -> list[tuple[str, list]]:
    """Statements (with parameters) that make sequence `name` (of a registry that has drawn nothing from it yet)
    give `next_value` next."""
    if dialect == "postgresql":
        return [("SELECT setval(?, ?, false)", [name, next_value])]
    if next_value <= 1:
        return []
    return [(f"SELECT max(nextval('{name}')) FROM range(?)", [next_value - 1])]
