"""`tunery registry copy --to URL`: the whole registry copied to another backend (DuckDB <-> PostgreSQL), every table
with its ids and version numbers, in one transaction on the target, then checked row by row."""
from __future__ import annotations

from typing import Any

from core.errors import TuneryError
from registry import dialect
from registry.db import connect, current, describe, parse_target, redact

FIRST = ("registry_instance", "model_names", "versions")  # before the tables that refer to versions


def _tables(con) -> list[str]:
    names = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = "
                                       "current_schema() AND table_type = 'BASE TABLE'").fetchall()}
    names.discard("_migrations")  # each registry keeps its own (both are migrated to this code's migrations)
    return [t for t in FIRST if t in names] + sorted(names - set(FIRST))


def _columns(con, table: str) -> list[str]:
    return [r[0] for r in con.execute("SELECT column_name FROM information_schema.columns WHERE table_name = ? AND "
                                      "table_schema = current_schema() ORDER BY ordinal_position", [table]).fetchall()]


def _rows(con, table: str, columns: list[str]) -> list[tuple]:
    # table and column names come from the database's own catalogue, never from user text
    rows = con.execute(f"SELECT {', '.join(columns)} FROM {table}").fetchall()
    return sorted((tuple(r) for r in rows), key=repr)


def copy_registry(to: str) -> dict[str, Any]:
    """Copy this process's registry (TUNERY_REGISTRY_URL, else TUNERY_HOME's DuckDB file) into the empty registry at
    `to`, keeping every id, number and timestamp; then compare every table's rows. Refuses a target that holds
    anything, and the source itself."""
    source = describe()
    if parse_target(to) == current():
        raise TuneryError(f"{redact(to)} is the registry being copied; name another one")
    copied: dict[str, int] = {}
    with connect(read_only=True) as src:
        tables = _tables(src)
        data = {t: (_columns(src, t), _rows(src, t, _columns(src, t))) for t in tables}
    try:
        with connect(target=to) as dst:
            missing = sorted(set(tables) - set(_tables(dst)))
            if missing:
                raise TuneryError(f"{redact(to)}: no table {', '.join(missing)}; is it an older tunery's registry?")
            held = {t: dst.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables
                    if t != "registry_instance"}
            if any(held.values()):
                busy = ", ".join(f"{t} ({n} rows)" for t, n in held.items() if n)
                raise TuneryError(f"{redact(to)} is not empty ({busy}); copy only into an empty registry, nothing "
                                  "recorded there is replaced")
            # the new registry's own id (migration 004) gives way to the copied one: results cached for the
            # source registry stay valid for its copy
            dst.execute("DELETE FROM registry_instance")
            for table in tables:
                columns, rows = data[table]
                if rows:
                    marks = ", ".join("?" for _ in columns)
                    dst.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows)
                copied[table] = len(rows)
            if "promotions" in tables:
                columns, rows = data["promotions"]
                top = max((r[columns.index("id")] for r in rows), default=0)
                for sql, params in dialect.restart_sequence("promotion_ids", top + 1, dst.dialect):
                    dst.execute(sql, params)
    except TuneryError:
        raise
    except Exception as e:
        raise TuneryError(f"copying to {redact(to)} failed, nothing was written there: {str(e).strip()}") from None
    with connect(read_only=True, target=to) as dst:
        for table in tables:
            columns, rows = data[table]
            if [repr(r) for r in _rows(dst, table, columns)] != [repr(r) for r in rows]:  # NaN == NaN here
                raise TuneryError(f"{redact(to)}: table {table} differs from the source after copying")
    return {"from": source, "to": redact(to), "tables": copied,
            "versions": copied.get("versions", 0), "checked": "every row of every table"}
