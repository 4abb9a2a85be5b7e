"""Sweeps and their trials (`tunery sweep`), read as registry.records.Sweep and Trial. Every value reaches SQL as
a bound parameter."""
from __future__ import annotations

import json
import socket
from typing import Any

from core.errors import TuneryError
from registry.db import connect
from registry.records import Sweep, Trial, decode_row, select_list
from registry.schema import utcnow


def create_sweep(sweep_id: str, name: str, config: str, method: str, metric: str, direction: str,
                 space: dict[str, Any]) -> None:
    with connect() as con:
        con.execute("INSERT INTO sweeps (sweep_id, name, config, method, metric, direction, space_json, status, host, "
                    "created_utc) VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?, ?)",
                    [sweep_id, name, config, method, metric, direction, json.dumps(space, sort_keys=True),
                     socket.gethostname(), utcnow()])


def start_trial(sweep_id: str, trial: int, values: dict[str, Any], flow_run_id: str | None = None) -> None:
    with connect() as con:
        if not con.execute("SELECT 1 FROM sweeps WHERE sweep_id = ?", [sweep_id]).fetchone():
            raise TuneryError(f"unknown sweep {sweep_id!r}")
        con.execute("INSERT INTO sweep_trials (sweep_id, trial, values_json, status, host, flow_run_id, created_utc) "
                    "VALUES (?, ?, ?, 'running', ?, ?, ?)",
                    [sweep_id, trial, json.dumps(values, sort_keys=True), socket.gethostname(), flow_run_id,
                     utcnow()])


def finish_trial(sweep_id: str, trial: int, *, version: str | None, value: float | None, seconds: float,
                 error: str | None = None) -> None:
    """Settle a trial: `ready` with its version and metric, or `failed` with the error."""
    with connect() as con:
        con.execute("UPDATE sweep_trials SET status = ?, version = ?, value = ?, seconds = ?, error = ?, "
                    "finished_utc = ? WHERE sweep_id = ? AND trial = ?",
                    ["failed" if error else "ready", version, value, seconds, error[:4000] if error else None,
                     utcnow(), sweep_id, trial])
        if version is not None:  # the version carries the sweeps that produced (or reused) it
            # a no-op write first: on PostgreSQL it locks the row, so two trials ending on one version both land
            con.execute("UPDATE versions SET info_json = info_json WHERE version = ?", [version])
            info = json.loads(con.execute("SELECT info_json FROM versions WHERE version = ?", [version]).fetchone()[0])
            values = json.loads(con.execute("SELECT values_json FROM sweep_trials WHERE sweep_id = ? AND trial = ?",
                                            [sweep_id, trial]).fetchone()[0])
            info["sweeps"] = [*info.get("sweeps", []), {"sweep": sweep_id, "trial": trial, "values": values}]
            con.execute("UPDATE versions SET info_json = ? WHERE version = ?",
                        [json.dumps(info, sort_keys=True), version])


def finish_sweep(sweep_id: str, best_trial: int | None) -> None:
    with connect() as con:
        con.execute("UPDATE sweeps SET status = ?, best_trial = ?, finished_utc = ? WHERE sweep_id = ?",
                    ["done" if best_trial is not None else "failed", best_trial, utcnow(), sweep_id])


def list_sweeps() -> list[dict[str, Any]]:
    """Every sweep, newest first, with its trial counts."""
    with connect(read_only=True) as con:
        rows = con.execute(
            "SELECT s.sweep_id, s.name, s.config, s.method, s.metric, s.direction, s.status, s.best_trial, "
            "s.created_utc, count(t.trial), sum(CASE WHEN t.status = 'failed' THEN 1 ELSE 0 END) "
            "FROM sweeps s LEFT JOIN sweep_trials t ON t.sweep_id = s.sweep_id "
            "GROUP BY s.sweep_id, s.name, s.config, s.method, s.metric, s.direction, s.status, s.best_trial, "
            "s.created_utc ORDER BY s.created_utc DESC").fetchall()
    return [{"sweep_id": i, "name": n, "config": c, "method": m, "metric": me, "direction": d, "status": st,
             "best_trial": b, "created_at": cr.isoformat() + "Z", "trials": int(t), "failed": int(f or 0)}
            for i, n, c, m, me, d, st, b, cr, t, f in rows]


def get_trial(sweep_id: str, trial: int) -> Trial | None:
    """One trial, or None when it was never started."""
    with connect(read_only=True) as con:
        row = con.execute(f"SELECT {select_list(Trial)} FROM sweep_trials WHERE sweep_id = ? AND trial = ?",
                          [sweep_id, trial]).fetchone()
    return Trial(**decode_row(Trial, row)) if row else None


def get_sweep(sweep_id: str) -> Sweep:
    """One sweep with its trials, in trial order."""
    with connect(read_only=True) as con:
        row = con.execute(f"SELECT {select_list(Sweep)} FROM sweeps WHERE sweep_id = ?", [sweep_id]).fetchone()
        if row is None:
            raise TuneryError(f"unknown sweep {sweep_id!r}; `tunery sweep` starts one")
        trials = con.execute(f"SELECT {select_list(Trial)} FROM sweep_trials WHERE sweep_id = ? ORDER BY trial",
                             [sweep_id]).fetchall()
    return Sweep(**decode_row(Sweep, row), trials=tuple(Trial(**decode_row(Trial, r)) for r in trials))
