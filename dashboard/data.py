"""What the dashboard reads, and the few computations its pages share.

Every read goes through the registry's functions (DuckDB: the dashboard takes its turn at the file like any other
process, before waiting writers; PostgreSQL: one connection per process). Results are cached for a few seconds, so
reruns are cheap and a new version shows up at the latest a TTL later, or at once after Refresh.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from typing import Any, Callable
from urllib.parse import quote

import pandas as pd
import streamlit as st

import registry
from core import metrics as metric_catalogue
from registry import exports as export_store
from registry import sweeps as sweep_store

TTL = 5  # seconds a query result is reused across reruns and sessions


@st.cache_data(ttl=TTL, show_spinner=False)
def version_table(**filters: Any) -> pd.DataFrame:
    registry.settle_interrupted()  # a version whose process was killed shows as failed, not running forever
    rows = registry.version_table(**filters)
    columns = ["version", "name", "number", "stage", "status", "base_model", "created_utc", "error", "aliases",
               *metric_catalogue.headline()]
    return pd.DataFrame(rows, columns=columns)


@st.cache_data(ttl=TTL, show_spinner=False)
def facets() -> dict[str, list[str]]:
    return registry.facets()


@st.cache_data(ttl=TTL, show_spinner=False)
def version(ref: str) -> registry.Version:
    return registry.get_version(ref)


@st.cache_data(ttl=TTL, show_spinner=False)
def around(ref: str) -> dict[str, list]:
    """What surrounds a version: its children, exports, the aliases on it and the promotions it took part in."""
    return {"children": registry.children(ref), **export_store.of_version(registry.get_version(ref))}


@st.cache_data(ttl=TTL, show_spinner=False)
def history(ref: str) -> pd.DataFrame:
    """One row per logged step, one column per logged value (loss, learning_rate, grad_norm, rss_mb, ...)."""
    return pd.DataFrame(registry.get_history(ref))


@st.cache_data(ttl=TTL, show_spinner=False)
def held_out_answers(ref: str) -> list[dict[str, Any]]:
    """The version's newest greedy answers (transformers) to the held-out prompts of its evaluation data."""
    v = registry.get_version(ref)
    return registry.get_answers(v.version, "hf", v.eval_data_hash)


@st.cache_data(ttl=TTL, show_spinner=False)
def judgements(ref: str, against: str) -> list[dict[str, Any]]:
    """The judge's newest verdicts on `ref`'s held-out answers against `against`'s."""
    return registry.get_judgements(registry.resolve(ref), registry.resolve(against))


@st.cache_data(ttl=TTL, show_spinner=False)
def compare(a: str, b: str) -> dict[str, Any]:
    return registry.compare_versions(a, b)


@st.cache_data(ttl=TTL, show_spinner=False)
def aliases(name: str | None = None) -> list[dict[str, Any]]:
    return export_store.list_aliases(name)


@st.cache_data(ttl=TTL, show_spinner=False)
def family(name: str) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Every version of a model name plus all their ancestors, and the parent -> child edges between them."""
    graph = registry.lineage_graph([r["version"] for r in registry.version_table(names=[name])])
    nodes = [{"version": v.version, "stage": v.stage, "status": v.status, "perplexity": v.metrics.get("perplexity")}
             for v in graph["nodes"].values()]
    return nodes, sorted(set(graph["edges"]))


def refresh() -> None:
    """Forget every cached read, so the next render shows what flows wrote since."""
    st.cache_data.clear()


def version_url(ref: str) -> str:
    return f"/version?v={quote(ref, safe=':')}"


def pareto(df: pd.DataFrame, lower: str = "perplexity", higher: str = "tokens_per_s") -> pd.Series:
    """True for versions no other version beats on both: lower `lower` and higher `higher` (ties do not dominate)."""
    points = df[[lower, higher]].to_numpy()
    flags = []
    for i, (lo, hi) in enumerate(points):
        dominated = any((lo2 <= lo and hi2 >= hi) and (lo2 < lo or hi2 > hi)
                        for j, (lo2, hi2) in enumerate(points) if j != i)
        flags.append(not dominated)
    return pd.Series(flags, index=df.index)


@st.cache_data(ttl=TTL, show_spinner=False)
def sweeps() -> list[dict[str, Any]]:
    return sweep_store.list_sweeps()


@st.cache_data(ttl=TTL, show_spinner=False)
def sweep_trials(sweep_id: str) -> tuple[dict[str, Any], pd.DataFrame]:
    """A sweep and one row per trial: its values (one column per swept key), metric, seconds and the speed and memory
    of the version it left."""

    sweep = sweep_store.get_sweep(sweep_id)
    speed = {r["version"]: r for r in registry.version_table(names=[sweep.name])}
    rows = []
    for t in sweep.trials:
        v = speed.get(t.version or "", {})
        rows.append({"trial": t.trial, **{k: t.values.get(k) for k in sweep.space}, "status": t.status,
                     "version": t.version, sweep.metric: t.value, "seconds": t.seconds,
                     "tokens_per_s": v.get("tokens_per_s"), "peak_rss_mb": v.get("peak_rss_mb"),
                     "best": t.trial == sweep.best_trial, "error": t.error})
    return sweep, pd.DataFrame(rows)


def run_tunery(*args: str, progress: Callable[[str], Any]) -> tuple[Any, str | None]:
    """Run a `tunery` command (`promote`, `rollback`) with `--json` in its own process, as a user would: its progress
    lines go to `progress`. Returns (the JSON document it printed or None, its error message or None). The page
    stays a reader; the CLI owns every action."""
    # stdout goes to a file: the JSON document may outgrow a pipe while stderr is read line by line
    with tempfile.TemporaryFile("w+") as stdout:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args, "--json"], stdout=stdout,
                                stderr=subprocess.PIPE, text=True)
        error = None
        for line in proc.stderr:
            if line.startswith("error: "):
                error = line.removeprefix("error: ").strip()
            elif line.strip():
                progress(line.rstrip())
        proc.wait()
        stdout.seek(0)
        result = json.loads(stdout.read() or "null")
    if proc.wait() != 0 and error is None:
        error = f"tunery {args[0]} exited with status {proc.returncode}"
    return result, error
