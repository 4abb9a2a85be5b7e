"""Writers and queries of the registry. Every value reaches SQL as a bound parameter."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
from typing import Any

from core.errors import TuneryError, check_name
from core.home import home_relative
from registry.db import connect
from registry.schema import utcnow
from registry.records import ENCODE, Version, columns, decode_row, select_list

VERSION_RE = re.compile(r"^(?P<name>[^:@]+):(?P<number>\d+)$")
COLUMNS = columns(Version)  # the versions table's columns, from the record's fields
FIXED = {"version", "name", "number", "stage", "status", "parents", "created_at", "flow_run_id", "host"}
STATUSES = ("running", "ready", "failed")

# ---------------------------------------------------------------- writers


def create_version(name: str, stage: str, *, base_model: str | None = None, parents: list[str] = (),
                   hyperparameters: dict | None = None, data_hash: str | None = None,
                   flow_run_id: str | None = None, info: dict | None = None, teacher: str | None = None) -> str:
    """Register a new version `NAME:N` in status `running` and return it. N is the next number for the name.

    The row exists before any training starts, so a run that fails is recorded as failed, never lost.
    Raises TuneryError for an invalid name or a parent that is not registered.
    """
    check_name(name, "model name")
    with connect() as con:
        for parent in parents:
            if not con.execute("SELECT 1 FROM versions WHERE version = ?", [parent]).fetchone():
                raise TuneryError(f"parent version {parent!r} is not registered")
        number = _next_number(con, name)
        version = f"{name}:{number}"
        owner = this_process()
        con.execute(
            "INSERT INTO versions (version, name, number, stage, status, base_model, hyperparameters_json, "
            "data_hash, info_json, flow_run_id, created_utc, owner_json, teacher, host) "
            "VALUES (?, ?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [version, name, number, stage, base_model, json.dumps(hyperparameters or {}, sort_keys=True),
             data_hash, json.dumps(info or {}, sort_keys=True), flow_run_id, utcnow(), json.dumps(owner),
             teacher, owner["host"]],
        )
        for position, parent in enumerate(parents):
            con.execute("INSERT INTO version_parents VALUES (?, ?, ?)", [version, parent, position])
    return version


def this_process() -> dict[str, Any]:
    """Who owns a running version: host, pid and the process's start time (a pid alone is reused)."""
    import psutil

    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time()}


def _alive(owner: dict[str, Any]) -> bool:
    import psutil

    try:
        return abs(psutil.Process(owner["pid"]).create_time() - owner["started"]) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, TypeError):
        return False


def settle_interrupted() -> list[str]:
    """Mark `failed` (error "interrupted: ...") every running version whose owning process on this host is gone
    (SIGKILL, the OOM killer, a power cut), and remove the temporary folder it was writing. A version owned by a
    process on another host is left alone: this process cannot see whether that one is alive. Returns the settled
    versions."""
    from core.home import artifacts_dir

    here = socket.gethostname()
    # Read-only first: every CLI command and dashboard view calls this, and the write lock is taken only when
    # there is something to settle.
    with connect(read_only=True) as con:
        rows = con.execute("SELECT version, name, number, owner_json FROM versions WHERE status = 'running' "
                           "AND owner_json IS NOT NULL").fetchall()
    dead = []
    for version, name, number, owner_json in rows:
        owner = json.loads(owner_json)
        if owner.get("host") == here and not _alive(owner):
            dead.append((version, name, number, owner))
    if not dead:
        return []
    with connect() as con:
        for version, _, _, owner in dead:
            con.execute("UPDATE versions SET status = 'failed', error = ?, finished_utc = ? "
                        "WHERE version = ? AND status = 'running'",
                        [f"interrupted: its process (pid {owner.get('pid')} on {here}) ended before it finished",
                         utcnow(), version])
    for _, name, number, owner in dead:
        shutil.rmtree(artifacts_dir() / name / f".{number}.tmp-{owner.get('pid')}", ignore_errors=True)
    return [version for version, _, _, _ in dead]


def _next_number(con, name: str) -> int:
    """Claim the next version number of `name` (numbers count up per name and are never reused)."""
    return con.execute("INSERT INTO model_names VALUES (?, 1) ON CONFLICT (name) DO UPDATE SET last_number = "
                       "model_names.last_number + 1 RETURNING last_number", [name]).fetchone()[0]


def finish_version(version: str, artifact_path: str | None, info: dict | None = None, **typed: Any) -> None:
    """Mark a running version `ready`, with the folder that holds its weights or adapter and the typed fields
    (columns of registry.records.Version: fingerprint, adapter, quantization, preference_pairs, ...) its stage
    settled. An unknown field is a ValueError."""
    settable = {f: (c, codec) for f, c, codec in COLUMNS if f not in FIXED}
    unknown = set(typed) - set(settable)
    if unknown:
        raise ValueError(f"not typed fields of a version: {sorted(unknown)}")
    values = {"artifact_path": artifact_path, "finished_at": utcnow(), "adapter": False, **typed}
    if info is not None:
        values["info"] = info
    # Column names come from registry.records.Version, never from the caller's text; values are bound.
    assignments = ", ".join(f"{settable[f][0]} = ?" for f in values)
    with connect() as con:
        _require(con, version)
        con.execute(f"UPDATE versions SET status = 'ready', {assignments} WHERE version = ?",
                    [ENCODE[settable[f][1]](v) for f, v in values.items()] + [version])


def fail_version(version: str, error: str) -> None:
    """Mark a version `failed` with the reason; the row and anything recorded with it stay."""
    with connect() as con:
        _require(con, version)
        con.execute("UPDATE versions SET status = 'failed', error = ?, finished_utc = ? WHERE version = ?",
                    [error[:4000], utcnow(), version])


def record_metrics(version: str, metrics: dict[str, float], eval_data_hash: str | None = None) -> None:
    """Add measured values for a version; a later value of the same metric on the same data supersedes."""
    now = utcnow()
    _insert(version, "INSERT INTO metrics VALUES (?, ?, ?, ?, ?)",
            [[version, k, float(v), eval_data_hash, now] for k, v in metrics.items()])


def record_samples(version: str, samples: list[dict[str, str]], eval_data_hash: str | None = None) -> None:
    """Store one evaluation's sample answers ({prompt, answer} in prompt order)."""
    now = utcnow()
    _insert(version, "INSERT INTO samples VALUES (?, ?, ?, ?, ?, ?)",
            [[version, i, s["prompt"], s["answer"], eval_data_hash, now] for i, s in enumerate(samples)])


def record_answers(version: str, backend: str, answers: list[dict[str, Any]], eval_data_hash: str | None = None
                   ) -> None:
    """Store one evaluation's greedy answers to the held-out prompts ({prompt, reference, answer, category?}), made
    through `backend`: 'hf' (transformers) or an export id (its GGUF through llama.cpp)."""
    now = utcnow()
    _insert(version, "INSERT INTO answers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [[version, backend, i, a["prompt"], a["reference"], a["answer"], a.get("category"), eval_data_hash, now]
             for i, a in enumerate(answers)])


def get_answers(version: str, backend: str = "hf", eval_data_hash: str | None = None) -> list[dict[str, Any]]:
    """The newest set of a version's held-out answers through `backend` (on `eval_data_hash` when given), in
    prompt order; empty when there is none."""
    with connect(read_only=True) as con:
        rows = con.execute(
            "SELECT prompt, reference, answer, category FROM answers a WHERE version = ? AND backend = ? AND "
            "eval_data_hash IS NOT DISTINCT FROM coalesce(?, eval_data_hash) AND recorded_utc = ("
            "SELECT max(recorded_utc) FROM answers WHERE version = a.version AND backend = a.backend AND "
            "eval_data_hash IS NOT DISTINCT FROM coalesce(?, eval_data_hash)) ORDER BY position",
            [version, backend, eval_data_hash, eval_data_hash]).fetchall()
    return [{"prompt": p, "reference": r, "answer": a, "category": c} for p, r, a, c in rows]


def record_judgements(version: str, against: str, judge: str, verdicts: list[dict[str, Any]],
                      eval_data_hash: str | None = None) -> None:
    """Store a judge's verdicts on `version`'s answers against `against`'s ({prompt, first, second, outcome})."""
    now = utcnow()
    _insert(version, "INSERT INTO judgements VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [[version, against, judge, i, v["prompt"], v["first"], v["second"], v["outcome"], eval_data_hash, now]
             for i, v in enumerate(verdicts)])


def get_judgements(version: str, against: str | None = None) -> list[dict[str, Any]]:
    """The newest set of judge verdicts on `version` (against `against`, or whichever version it was last judged
    against), in prompt order."""
    with connect(read_only=True) as con:
        rows = con.execute(
            "SELECT against, judge, prompt, first, second, outcome FROM judgements j WHERE version = ? AND "
            "against = coalesce(?, against) AND recorded_utc = (SELECT max(recorded_utc) FROM judgements WHERE "
            "version = j.version AND against = coalesce(?, against)) ORDER BY position",
            [version, against, against]).fetchall()
    return [{"against": a, "judge": j, "prompt": p, "first": f, "second": s, "outcome": o}
            for a, j, p, f, s, o in rows]


def _insert(version: str, sql: str, rows: list[list[Any]]) -> None:
    """Insert rows about a registered version in one transaction (nothing when there are none)."""
    if not rows:
        return
    with connect() as con:
        _require(con, version)
        con.executemany(sql, rows)


def record_history(version: str, history: list[dict[str, float]]) -> None:
    """Store a run's logged training history (one row per step and value)."""
    _insert(version, "INSERT INTO training_history VALUES (?, ?, ?, ?, ?)",
            [[version, int(h["step"]), h.get("epoch"), k, float(v)]
             for h in history for k, v in h.items() if k not in ("step", "epoch")])


def record_dataset(meta: dict[str, Any], path: str) -> None:
    """Remember a prepared dataset by its content hash (idempotent)."""
    with connect() as con:
        con.execute(
            "INSERT INTO datasets VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (data_hash) DO NOTHING",
            [meta["data_hash"], meta["kind"], home_relative(path), meta["train_rows"], meta["validation_rows"],
             json.dumps(meta, sort_keys=True), utcnow()],
        )


def _require(con, version: str) -> None:
    if not con.execute("SELECT 1 FROM versions WHERE version = ?", [version]).fetchone():
        raise TuneryError(f"unknown version {version!r}")


# ---------------------------------------------------------------- queries


def resolve(ref: str) -> str:
    """Turn `NAME:N` or `NAME` (its newest ready version) into a registered version, or raise TuneryError."""
    with connect(read_only=True) as con:
        if VERSION_RE.match(ref):
            if con.execute("SELECT 1 FROM versions WHERE version = ?", [ref]).fetchone():
                return ref
            raise TuneryError(f"unknown version {ref!r}; `tunery models` lists them")
        row = con.execute("SELECT version FROM versions WHERE name = ? AND status = 'ready' "
                          "ORDER BY number DESC LIMIT 1", [ref]).fetchone()
    if not row:
        raise TuneryError(f"unknown version {ref!r}: expected NAME:N, or a NAME with a ready version")
    return row[0]


def _version_objects(con, where: str, params: list[Any], eval_data: str | None = None) -> list[Version]:
    # `where` is a fixed SQL fragment chosen by this module, never user text; values come through `params`.
    rows = con.execute(f"SELECT {select_list(Version)} FROM versions {where} ORDER BY name, number",
                       params).fetchall()
    if not rows:
        return []
    rows = [decode_row(Version, row) for row in rows]
    names = [r["version"] for r in rows]
    parents: dict[str, list[str]] = {v: [] for v in names}
    for child, parent in con.execute(
        "SELECT version, parent FROM version_parents WHERE version IN (SELECT unnest(?::VARCHAR[])) "
        "ORDER BY position",
        [names],
    ).fetchall():
        parents[child].append(parent)
    # Metrics belong to the data they were measured on. A version's `metrics` are its training figures (no data
    # hash) and its evaluation on `eval_data` (by default the data of its first evaluation: in a pipeline run, the
    # config's held-out split), the newest value of each; evaluations on other data are kept apart, by hash.
    metrics: dict[str, dict[str, float]] = {v: {} for v in names}
    by_data: dict[str, dict[str, dict[str, float]]] = {v: {} for v in names}
    for v, key, value, data in con.execute(
        "SELECT version, name, value, eval_data_hash FROM metrics WHERE version IN (SELECT unnest(?::VARCHAR[])) "
        "ORDER BY recorded_utc", [names],
    ).fetchall():
        if data is None:
            metrics[v][key] = value
        else:
            by_data[v].setdefault(data, {})[key] = value
    reference = {v: eval_data if eval_data is not None else next(iter(by_data[v]), None) for v in names}
    samples: dict[str, list[dict[str, str]]] = {v: [] for v in names}
    # Only the newest set of samples of each version on its evaluation data.
    for v, prompt, answer, data in con.execute(
        "SELECT version, prompt, answer, eval_data_hash FROM samples s "
        "WHERE version IN (SELECT unnest(?::VARCHAR[])) AND recorded_utc = (SELECT max(recorded_utc) FROM samples "
        "WHERE version = s.version AND eval_data_hash IS NOT DISTINCT FROM s.eval_data_hash) "
        "ORDER BY version, position", [names],
    ).fetchall():
        if data is None or data == reference[v]:
            samples[v].append({"prompt": prompt, "answer": answer})
    return [Version(**row, parents=parents[v], eval_data_hash=reference[v],
                    metrics={**metrics[v], **by_data[v].get(reference[v], {})},
                    metrics_on_other_data={h: m for h, m in by_data[v].items() if h != reference[v]},
                    samples=samples[v]) for row in rows for v in [row["version"]]]


def list_versions(name: str | None = None, status: str | None = None,
                  eval_data: str | None = None) -> list[Version]:
    """Every version (optionally of one name or status); `Version.json()` is what `tunery models --json` prints.
    `eval_data` (a data hash) picks which evaluation fills `metrics`, instead of each version's first."""
    clauses, params = [], []
    if name is not None:
        clauses.append("name = ?")
        params.append(name)
    if status is not None:
        clauses.append("status = ?")
        params.append(status)
    where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
    with connect(read_only=True) as con:
        return _version_objects(con, where, params, eval_data)


def get_version(ref: str, eval_data: str | None = None) -> Version:
    """One version object by `NAME:N` or `NAME`; raises TuneryError for an unknown one. `eval_data` as in
    list_versions."""
    version = resolve(ref)
    with connect(read_only=True) as con:
        return _version_objects(con, "WHERE version = ?", [version], eval_data)[0]


def import_versions(records: list[dict[str, Any]]) -> list[str]:
    """Register many finished versions in one transaction (an import or a benchmark's registry): each record has
    name, stage, status, and optionally base_model, parents, artifact_path, error and metrics. Numbers count up
    per name as in create_version."""
    now = utcnow()
    out = []
    with connect() as con:
        for r in records:
            check_name(r["name"], "model name")
            if r["status"] not in STATUSES:
                raise TuneryError(f"status must be one of {', '.join(STATUSES)}, got {r['status']!r}")
            number = _next_number(con, r["name"])
            version = f"{r['name']}:{number}"
            con.execute(
                "INSERT INTO versions (version, name, number, stage, status, base_model, artifact_path, error, "
                "created_utc, finished_utc) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [version, r["name"], number, r["stage"], r["status"], r.get("base_model"),
                 home_relative(r.get("artifact_path")),
                 r.get("error"), now, now])
            for i, parent in enumerate(r.get("parents", [])):
                con.execute("INSERT INTO version_parents VALUES (?, ?, ?)", [version, parent, i])
            for key, value in r.get("metrics", {}).items():
                con.execute("INSERT INTO metrics VALUES (?, ?, ?, NULL, ?)", [version, key, float(value), now])
            out.append(version)
    return out


def instance_id() -> str:
    """The id this registry file got when it was created (migration 004)."""
    with connect(read_only=True) as con:
        return con.execute("SELECT id FROM registry_instance").fetchone()[0]


def find_fingerprint(name: str, fingerprint: str) -> str | None:
    """The newest ready version of `name` whose stage inputs had this fingerprint, if any."""
    with connect(read_only=True) as con:
        row = con.execute("SELECT version FROM versions WHERE name = ? AND status = 'ready' AND "
                          "fingerprint = ? ORDER BY number DESC LIMIT 1",
                          [name, fingerprint]).fetchone()
    return row[0] if row else None
