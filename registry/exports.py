"""Exports, their checks, aliases and the promotion history. Every value reaches SQL as a bound parameter."""
from __future__ import annotations

import json
from typing import Any

from core.errors import TuneryError
from core.home import home_relative, in_home
from registry.db import connect, utcnow
from registry.records import Version
from registry.store import _require


def record_export(export: dict[str, Any], checks: list[dict[str, Any]]) -> None:
    """Store a new export and the checks run on it, in one transaction. Exports are immutable: an id already
    recorded is an error, never replaced."""
    with connect() as con:
        _require(con, export["version"])
        if con.execute("SELECT 1 FROM exports WHERE export_id = ?", [export["export_id"]]).fetchone():
            raise TuneryError(f"export {export['export_id']} is already recorded; exports are never replaced")
        con.execute(
            "INSERT INTO exports VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [export["export_id"], export["version"], export["quant"], home_relative(export["path"]),
             export["gguf_file"],
             export["size_bytes"], export["sha256"], export["modelfile"], export["passed"],
             json.dumps(export.get("info", {}), sort_keys=True), utcnow()],
        )
        now = utcnow()
        con.executemany("INSERT INTO export_checks (export_id, name, file, passed, value, detail, recorded_utc, "
                        "position) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        [[export["export_id"], c["name"], c["file"], c["passed"], c["value"], c["detail"], now, i]
                         for i, c in enumerate(checks)])


def _export_objects(con, where: str, params: list[Any]) -> list[dict[str, Any]]:
    # `where` is a fixed fragment chosen by this module; values come through `params`.
    rows = con.execute(
        "SELECT export_id, version, quant, path, gguf_file, size_bytes, sha256, modelfile, passed, info_json, "
        f"created_utc FROM exports {where} ORDER BY created_utc", params).fetchall()
    out = []
    for export_id, version, quant, path, gguf_file, size, sha, modelfile, passed, info, created in rows:
        checks = [{"name": n, "file": f, "passed": p, "value": v, "detail": d} for n, f, p, v, d in con.execute(
            "SELECT name, file, passed, value, detail FROM export_checks WHERE export_id = ? ORDER BY position",
            [export_id]).fetchall()]
        out.append({"export_id": export_id, "version": version, "quant": quant, "path": in_home(path),
                    "gguf_file": gguf_file,
                    "size_bytes": size, "sha256": sha, "modelfile": modelfile, "passed": passed,
                    "info": json.loads(info), "checks": checks, "created_at": created.isoformat() + "Z"})
    return out


def get_export(export_id: str) -> dict[str, Any]:
    with connect(read_only=True) as con:
        found = _export_objects(con, "WHERE export_id = ?", [export_id])
    if not found:
        raise TuneryError(f"unknown export {export_id!r}")
    return found[0]


def list_exports(version: str | None = None) -> list[dict[str, Any]]:
    with connect(read_only=True) as con:
        if version is None:
            return _export_objects(con, "", [])
        return _export_objects(con, "WHERE version = ?", [version])


def get_alias(name: str, alias: str) -> dict[str, Any] | None:
    """The version and export an alias points at, or None."""
    with connect(read_only=True) as con:
        row = con.execute("SELECT version, export_id, updated_utc FROM aliases WHERE name = ? AND alias = ?",
                          [name, alias]).fetchone()
    if row is None:
        return None
    return {"name": name, "alias": alias, "version": row[0], "export_id": row[1],
            "updated_at": row[2].isoformat() + "Z"}


def list_aliases(name: str | None = None) -> list[dict[str, Any]]:
    with connect(read_only=True) as con:
        rows = con.execute("SELECT name, alias, version, export_id, updated_utc FROM aliases "
                           "WHERE ?::VARCHAR IS NULL OR name = ? ORDER BY name, alias", [name, name]).fetchall()
    return [{"name": n, "alias": a, "version": v, "export_id": e, "updated_at": u.isoformat() + "Z"}
            for n, a, v, e, u in rows]


def of_version(version: Version) -> dict[str, list]:
    """A version's exports, the aliases that point at it (NAME@ALIAS), and the promotions it took part in."""
    return {"exports": list_exports(version.version),
            "aliases": [f"{a['name']}@{a['alias']}" for a in list_aliases(version.name)
                        if a["version"] == version.version],
            "promotions": [p for p in promotion_history(version.name)
                           if version.version in (p["version"], p["previous_version"])]}


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


def promotion_history(name: str | None = None, alias: str | None = None) -> list[dict[str, Any]]:
    with connect(read_only=True) as con:
        rows = con.execute(
            "SELECT id, name, alias, action, version, export_id, previous_version, previous_export_id, gate_json, "
            "ollama, recorded_utc FROM promotions WHERE (?::VARCHAR IS NULL OR name = ?) "
            "AND (?::VARCHAR IS NULL OR alias = ?) "
            "ORDER BY id", [name, name, alias, alias]).fetchall()
    return [{"id": i, "name": n, "alias": a, "action": act, "version": v, "export_id": e, "previous_version": pv,
             "previous_export_id": pe, "gate": json.loads(g), "ollama": o, "recorded_at": r.isoformat() + "Z"}
            for i, n, a, act, v, e, pv, pe, g, o, r in rows]


def rollback_target(name: str, alias: str) -> tuple[str, str]:
    """(version, export_id) the alias held before its current holder: promotions push, rollbacks pop."""
    stack: list[tuple[str, str]] = []
    for row in promotion_history(name, alias):
        if row["action"] == "promote":
            stack.append((row["version"], row["export_id"]))
        elif row["action"] == "rollback" and stack:
            stack.pop()
    if not stack:
        raise TuneryError(f"{name}@{alias} does not exist; `tunery promote` creates it")
    if len(stack) < 2:
        raise TuneryError(f"{name}@{alias} has no earlier holder to roll back to (it holds {stack[-1][0]})")
    return stack[-2]
