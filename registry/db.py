"""Opening the registry: short-lived connections, numbered migrations, retry on DuckDB's lock.

DuckDB allows one read-write process or many read-only ones, never both. So every operation opens a connection,
does its work and closes it; readers open read-only; a lock held by another process is retried with backoff.
"""
from __future__ import annotations

import re
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Iterator

import duckdb

from tasks.common import RegistryBusy, TuneryError, registry_path

LOCK_RETRIES = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0)  # ~21 s in all: a flow's write is short


def migrations() -> list[tuple[int, str, str]]:
    """The numbered migrations shipped in registry/migrations, in order: (id, name, sql)."""
    found = []
    for entry in resources.files("registry.migrations").iterdir():
        match = re.match(r"^(\d+)_(\w+)\.sql$", entry.name)
        if match:
            found.append((int(match.group(1)), match.group(2), entry.read_text()))
    return sorted(found)


def _is_lock_error(e: Exception) -> bool:
    text = str(e).lower()
    return "lock" in text and ("conflicting" in text or "could not set" in text)


def _open(path: Path, read_only: bool) -> duckdb.DuckDBPyConnection:
    """Connect, waiting with backoff while another process holds the file's lock."""
    for delay in (*LOCK_RETRIES, None):
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.IOException as e:
            if not _is_lock_error(e):
                raise
            if delay is None:
                raise RegistryBusy(f"{path}: the registry is locked by another process; try again") from None
            time.sleep(delay)
    raise AssertionError("unreachable: the last attempt returns or raises")


def migrate(con: duckdb.DuckDBPyConnection) -> list[int]:
    """Apply the migrations this database has not seen, each in its own transaction; return their ids."""
    con.execute("CREATE TABLE IF NOT EXISTS _migrations (id INTEGER PRIMARY KEY, name VARCHAR, applied_utc TIMESTAMP)")
    done = {row[0] for row in con.execute("SELECT id FROM _migrations").fetchall()}
    applied = []
    for number, name, sql in migrations():
        if number in done:
            continue
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(sql)
            con.execute("INSERT INTO _migrations VALUES (?, ?, ?)", [number, name, utcnow()])
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
        applied.append(number)
    return applied


def _pending(path: Path) -> bool:
    if not path.exists():
        return True
    con = _open(path, read_only=True)
    try:
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if "_migrations" not in tables:
            return True
        done = {r[0] for r in con.execute("SELECT id FROM _migrations").fetchall()}
    finally:
        con.close()
    return any(number not in done for number, _, _ in migrations())


@contextmanager
def connect(read_only: bool = False, path: Path | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection to the registry for one operation, migrated first and closed afterwards.

    Writers get a transaction that commits on success and rolls back on any error, so a failed write leaves
    no partial rows. Readers open read-only, letting several processes (dashboard, CLI) read at once.
    """
    path = Path(path or registry_path())
    if read_only and _pending(path):
        with connect(read_only=False, path=path):
            pass
    con = _open(path, read_only=read_only)
    try:
        if read_only:
            yield con
            return
        migrate(con)
        con.execute("BEGIN TRANSACTION")
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")
    finally:
        con.close()


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)
