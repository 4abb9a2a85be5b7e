"""The registry's schema and how SQL reaches a database: the numbered migrations shipped in registry/migrations
(recorded in `_migrations`, applied in order on both backends), and the connection wrapper that takes DuckDB SQL with
`?` placeholders and rewrites it for PostgreSQL (registry.dialect)."""
from __future__ import annotations

import re
from datetime import datetime, timezone
from importlib import resources
from typing import Any

from core.errors import TuneryError
from registry import dialect


def migrations() -> list[tuple[int, str, str]]:
    """The numbered migrations shipped in registry/migrations, in order: (id, name, sql)."""
    found = []
    for entry in resources.files("registry.migrations").iterdir():
        match = re.match(r"^(\d+)_(\w+)\.sql$", entry.name)
        if match:
            found.append((int(match.group(1)), match.group(2), entry.read_text()))
    return sorted(found)


class Connection:
    """One driver connection with the registry's SQL dialect: `execute` and `executemany` take DuckDB SQL with `?`
    placeholders and return a cursor (fetchone, fetchall, description)."""

    def __init__(self, raw: Any, name: str):
        self.raw, self.dialect = raw, name

    def execute(self, sql: str, params: Any = None):
        if self.dialect == "duckdb":
            return self.raw.execute(sql) if params is None else self.raw.execute(sql, params)
        return self.raw.execute(dialect.sql(sql, self.dialect, placeholders=params is not None), params)

    def executemany(self, sql: str, rows: list) -> None:
        if self.dialect == "duckdb":
            self.raw.executemany(sql, rows)
        else:
            with self.raw.cursor() as cursor:
                cursor.executemany(dialect.sql(sql, self.dialect), rows)


def _statements(number: int, sql: str, name: str) -> list[str]:
    try:
        return dialect.statements(sql, name)
    except ValueError as e:
        raise TuneryError(f"migration {number}: {e}") from None


def pending_migrations(con) -> list[tuple[int, str, str]]:
    """The shipped migrations this registry has not applied yet (creating its `_migrations` table if missing)."""
    con.execute("CREATE TABLE IF NOT EXISTS _migrations (id INTEGER PRIMARY KEY, name VARCHAR, applied_utc TIMESTAMP)")
    done = {row[0] for row in con.execute("SELECT id FROM _migrations").fetchall()}
    return [m for m in migrations() if m[0] not in done]


def apply_migration(con, migration: tuple[int, str, str]) -> None:
    """Run one migration's statements for this connection's database and record it (inside a transaction)."""
    number, name, sql = migration
    for statement in _statements(number, sql, con.dialect):
        con.execute(statement)
    con.execute("INSERT INTO _migrations VALUES (?, ?, ?)", [number, name, utcnow()])


def migrate(con) -> list[int]:
    """Apply the migrations this DuckDB registry has not seen, each in its own transaction; return their ids."""
    con = Connection(con, "duckdb")
    applied = []
    for migration in pending_migrations(con):
        con.execute("BEGIN TRANSACTION")
        try:
            apply_migration(con, migration)
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
        applied.append(migration[0])
    return applied


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)
