"""Exports, their checks, aliases and the promotion history, as the typed records of registry.records. Every value
reaches SQL as a bound parameter; column lists come from the records."""
from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from core.errors import TuneryError
from registry.db import connect
from registry.schema import utcnow
from registry.records import (Alias, Check, Export, Promotion, Version, columns, decode_row, encoded,
                              select_list)
from registry.store import _require


def record_export(export: Export) -> None:
    """Store a new export and the checks run on it, in one transaction. Exports are immutable: an id already
    recorded is an error, never replaced."""
    names, values = encoded(replace(export, created_at=utcnow()))
    with connect() as con:
        _require(con, export.version)
        if con.execute("SELECT 1 FROM exports WHERE export_id = ?", [export.export_id]).fetchone():
            raise TuneryError(f"export {export.export_id} is already recorded; exports are never replaced")
        con.execute(f"INSERT INTO exports ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})", values)
        if export.checks:
            now, width = utcnow(), len(columns(Check)) + 3
            con.executemany(f"INSERT INTO export_checks (export_id, {select_list(Check)}, recorded_utc, position) "
                            f"VALUES ({', '.join('?' * width)})",
                            [[export.export_id, *encoded(c)[1], now, i] for i, c in enumerate(export.checks)])


def _export_objects(con, where: str, params: list[Any]) -> list[Export]:
    # `where` is a fixed fragment chosen by this module; values come through `params`.
    rows = con.execute(f"SELECT {select_list(Export)} FROM exports {where} ORDER BY created_utc", params).fetchall()
    out = []
    for row in rows:
        export = decode_row(Export, row)
        checks = tuple(Check(**decode_row(Check, r)) for r in con.execute(
            f"SELECT {select_list(Check)} FROM export_checks WHERE export_id = ? ORDER BY position",
            [export["export_id"]]).fetchall())
        out.append(Export(**export, checks=checks))
    return out


def get_export(export_id: str) -> Export:
    with connect(read_only=True) as con:
        found = _export_objects(con, "WHERE export_id = ?", [export_id])
    if not found:
        raise TuneryError(f"unknown export {export_id!r}")
    return found[0]


def list_exports(version: str | None = None) -> list[Export]:
    with connect(read_only=True) as con:
        if version is None:
            return _export_objects(con, "", [])
        return _export_objects(con, "WHERE version = ?", [version])


def get_alias(name: str, alias: str) -> Alias | None:
    """The version and export an alias points at, or None."""
    with connect(read_only=True) as con:
        row = con.execute(f"SELECT {select_list(Alias)} FROM aliases WHERE name = ? AND alias = ?",
                          [name, alias]).fetchone()
    return None if row is None else Alias(**decode_row(Alias, row))


def list_aliases(name: str | None = None) -> list[Alias]:
    with connect(read_only=True) as con:
        rows = con.execute(f"SELECT {select_list(Alias)} FROM aliases WHERE ?::VARCHAR IS NULL OR name = ? "
                           "ORDER BY name, alias", [name, name]).fetchall()
    return [Alias(**decode_row(Alias, row)) for row in rows]


def of_version(version: Version) -> dict[str, list]:
    """A version's exports, the aliases that point at it (NAME@ALIAS), and the promotions it took part in."""
    return {"exports": list_exports(version.version),
            "aliases": [f"{a.name}@{a.alias}" for a in list_aliases(version.name) if a.version == version.version],
            "promotions": [p for p in promotion_history(version.name)
                           if version.version in (p.version, p.previous_version)]}


def record_promotion(name: str, alias: str, action: str, version: str, export_id: str | None,
                     gate: dict[str, Any], ollama: str | None = None) -> dict[str, Any]:
    """Add a promotions row; for promote and rollback also move the alias, in the same transaction."""
    if action not in ("promote", "refused", "rollback"):
        raise ValueError(action)
    with connect() as con:
        _require(con, version)
        previous = con.execute("SELECT version, export_id FROM aliases WHERE name = ? AND alias = ?",
                               [name, alias]).fetchone()
        row_id = con.execute(
            "INSERT INTO promotions (name, alias, action, version, export_id, previous_version, previous_export_id, "
            "gate_json, ollama, recorded_utc) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            [name, alias, action, version, export_id, previous[0] if previous else None,
             previous[1] if previous else None, json.dumps(gate, sort_keys=True), ollama, utcnow()],
        ).fetchone()[0]
        if action != "refused":
            con.execute("INSERT INTO aliases VALUES (?, ?, ?, ?, ?) ON CONFLICT (name, alias) DO UPDATE SET "
                        "version = excluded.version, export_id = excluded.export_id, updated_utc = excluded.updated_utc",
                        [name, alias, version, export_id, utcnow()])
    return {"id": row_id, "previous_version": previous[0] if previous else None,
            "previous_export_id": previous[1] if previous else None}


def promotion_history(name: str | None = None, alias: str | None = None) -> list[Promotion]:
    with connect(read_only=True) as con:
        rows = con.execute(
            f"SELECT {select_list(Promotion)} FROM promotions WHERE (?::VARCHAR IS NULL OR name = ?) "
            "AND (?::VARCHAR IS NULL OR alias = ?) ORDER BY id", [name, name, alias, alias]).fetchall()
    return [Promotion(**decode_row(Promotion, row)) for row in rows]


def rollback_target(name: str, alias: str) -> tuple[str, str]:
    """(version, export_id) the alias held before its current holder: promotions push, rollbacks pop."""
    stack: list[tuple[str, str]] = []
    for row in promotion_history(name, alias):
        if row.action == "promote":
            stack.append((row.version, row.export_id))
        elif row.action == "rollback" and stack:
            stack.pop()
    if not stack:
        raise TuneryError(f"{name}@{alias} does not exist; `tunery promote` creates it")
    if len(stack) < 2:
        raise TuneryError(f"{name}@{alias} has no earlier holder to roll back to (it holds {stack[-1][0]})")
    return stack[-2]
