"""What readers see across versions: lineage (graph and tree), children, training curves, a comparison of two versions,
and the version table the dashboard's pages filter. Every value reaches SQL as a bound parameter."""
from __future__ import annotations

from typing import Any

from core import metrics as metric_catalogue
from registry.db import connect
from registry.store import _version_objects, get_version, resolve


def lineage_graph(refs: list[str]) -> dict[str, Any]:
    """The versions `refs` and all their ancestors, each once, and the parent -> child edges between them, from one
    recursive query: {"nodes": {version: Version}, "edges": [(parent, child), ...]} (edges in parent
    order). The dashboard's graph and `tunery lineage` both read it."""
    versions = [resolve(ref) for ref in refs]
    with connect(read_only=True) as con:
        edges = con.execute(
            "WITH RECURSIVE up(version) AS (SELECT unnest(?::VARCHAR[]) UNION SELECT p.parent FROM version_parents p "
            "JOIN up ON p.version = up.version) "
            "SELECT p.parent, p.version FROM version_parents p WHERE p.version IN (SELECT version FROM up) "
            "ORDER BY p.version, p.position",
            [versions],
        ).fetchall()
        every = sorted(set(versions) | {v for edge in edges for v in edge})
        objects = {v.version: v
                   for v in _version_objects(con, "WHERE version IN (SELECT unnest(?::VARCHAR[]))", [every])}
    return {"nodes": objects, "edges": [(parent, child) for parent, child in edges]}


def lineage(ref: str) -> dict[str, Any]:
    """The whole ancestry of a version as a tree: {version, stage, status, metrics, parents: [subtrees]}, plus,
    at the top, the same ancestry as `nodes` (each version once) and `edges` (parent -> child).

    A version reached along two paths (a merge of two fine-tunes of one base) appears under each of them in the
    tree, and once in `nodes`.
    """
    version = resolve(ref)
    graph = lineage_graph([version])
    parents: dict[str, list[str]] = {}
    for parent, child in graph["edges"]:
        parents.setdefault(child, []).append(parent)

    def node(v: str) -> dict[str, Any]:
        o = graph["nodes"][v]
        return {"version": v, "stage": o.stage, "status": o.status, "metrics": o.metrics,
                "parents": [node(p) for p in parents.get(v, [])]}

    return {**node(version),
            "nodes": [{"version": o.version, "stage": o.stage, "status": o.status, "metrics": o.metrics}
                      for o in graph["nodes"].values()],
            "edges": [list(e) for e in graph["edges"]]}


def children(ref: str) -> list[str]:
    """The versions made directly from this one."""
    version = resolve(ref)
    with connect(read_only=True) as con:
        rows = con.execute("SELECT version FROM version_parents WHERE parent = ? ORDER BY version", [version])
        return [r[0] for r in rows.fetchall()]


def get_history(version: str) -> list[dict[str, Any]]:
    """The training history of a version, one dict per logged step."""
    with connect(read_only=True) as con:
        rows = con.execute("SELECT step, epoch, name, value FROM training_history WHERE version = ? "
                           "ORDER BY step", [version]).fetchall()
    steps: dict[int, dict[str, Any]] = {}
    for step, epoch, key, value in rows:
        steps.setdefault(step, {"step": step, "epoch": epoch})[key] = value
    return list(steps.values())


def _change(x: Any, y: Any) -> tuple[float | None, float | None]:
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (x, y))
    if not numeric:
        return None, None
    change = y - x
    return change, (change / abs(x) if x else None)


def compare_versions(a: str, b: str) -> dict[str, Any]:
    """Every metric and hyperparameter of two versions side by side, with absolute and relative change (b vs a)
    and, for metrics with a known direction, whether b is better."""
    va, vb = get_version(a), get_version(b)
    # Compare on data both were measured on: b's evaluation data, else a's, else none (then no verdicts).
    measured_a = {va.eval_data_hash, *va.metrics_on_other_data} - {None}
    measured_b = {vb.eval_data_hash, *vb.metrics_on_other_data} - {None}
    common = [h for h in (vb.eval_data_hash, va.eval_data_hash) if h in measured_a & measured_b]
    if common:
        va, vb = get_version(a, common[0]), get_version(b, common[0])
    same_data = bool(common) or not (measured_a or measured_b)
    with connect(read_only=True) as con:  # training figures (no data hash) compare whatever the data
        training = {r[0] for r in con.execute("SELECT DISTINCT name FROM metrics WHERE eval_data_hash IS NULL AND "
                                               "version IN (?, ?)", [va.version, vb.version]).fetchall()}
    rows = []
    for key in sorted(set(va.metrics) | set(vb.metrics)):
        x, y = va.metrics.get(key), vb.metrics.get(key)
        change, relative = _change(x, y)
        better = metric_catalogue.is_better(key, change) if same_data or key in training else None
        rows.append({"metric": key, "a": x, "b": y, "change": change, "relative_change": relative,
                     "better": better})
    hp_a, hp_b = _flatten(va.hyperparameters), _flatten(vb.hyperparameters)
    hp = []
    for key in sorted(set(hp_a) | set(hp_b)):
        x, y = hp_a.get(key), hp_b.get(key)
        change, relative = _change(x, y)
        hp.append({"hyperparameter": key, "a": x, "b": y, "change": change, "relative_change": relative,
                   "changed": x != y})
    return {"a": va.version, "b": vb.version, "metrics": rows, "hyperparameters": hp,
            "eval_data": {"a": va.eval_data_hash, "b": vb.eval_data_hash, "same": same_data}}



def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def version_table(names: list[str] = (), stages: list[str] = (), base_models: list[str] = (),
                  statuses: list[str] = (), alias: str | None = None, search: str | None = None,
                  since: Any = None, until: Any = None) -> list[dict[str, Any]]:
    """One row per version with its key metrics and aliases, newest first, for tables of many versions.

    Every filter is a bound parameter; an empty list or None means no filter. `search` matches, case-insensitively
    and literally (no wildcards), the version, stage, base model, status or error text.
    """
    columns = metric_catalogue.headline()  # declared names (core.metrics checks them), quoted as aliases
    metric_cols = ", ".join(f"max(CASE WHEN m.name = ? THEN m.value END) AS \"{k}\"" for k in columns)
    sql = f"""
        WITH first_eval AS (  -- each version's first evaluation data
            SELECT version, eval_data_hash FROM (
                SELECT version, eval_data_hash,
                       row_number() OVER (PARTITION BY version ORDER BY recorded_utc) AS rn
                FROM metrics WHERE eval_data_hash IS NOT NULL) f WHERE rn = 1
        ), latest AS (  -- training figures and the evaluation on each version's first evaluation data
            SELECT m.version, m.name, m.value,
                   row_number() OVER (PARTITION BY m.version, m.name ORDER BY m.recorded_utc DESC) AS rn
            FROM metrics m LEFT JOIN first_eval f ON f.version = m.version
            WHERE m.name IN (SELECT unnest(?::VARCHAR[]))
              AND (m.eval_data_hash IS NULL OR m.eval_data_hash = f.eval_data_hash)
        ), tags AS (
            SELECT version, string_agg(name || '@' || alias, ', ' ORDER BY alias) AS aliases
            FROM aliases GROUP BY version
        )
        SELECT v.version, v.name, v.number, v.stage, v.status, v.base_model, v.created_utc, v.error,
               t.aliases, {metric_cols}
        FROM versions v
        LEFT JOIN latest m ON m.version = v.version AND m.rn = 1
        LEFT JOIN tags t ON t.version = v.version
        WHERE (? OR v.name IN (SELECT unnest(?::VARCHAR[])))
          AND (? OR v.stage IN (SELECT unnest(?::VARCHAR[])))
          AND (? OR v.base_model IN (SELECT unnest(?::VARCHAR[])))
          AND (? OR v.status IN (SELECT unnest(?::VARCHAR[])))
          AND (?::VARCHAR IS NULL OR v.version IN (SELECT version FROM aliases WHERE alias = ?))
          AND (?::VARCHAR IS NULL OR strpos(lower(concat_ws(' ', v.version, v.stage, v.base_model, v.status,
                                                            v.error)), lower(?)) > 0)
          AND (?::TIMESTAMP IS NULL OR v.created_utc >= ?::TIMESTAMP)
          AND (?::TIMESTAMP IS NULL OR v.created_utc < ?::TIMESTAMP)
        GROUP BY v.version, v.name, v.number, v.stage, v.status, v.base_model, v.created_utc, v.error, t.aliases
        ORDER BY v.created_utc DESC, v.name, v.number DESC
    """
    lists = [list(names), list(stages), list(base_models), list(statuses)]
    params: list[Any] = [list(columns), *columns]
    for values in lists:
        params += [not values, values]  # no values: no filter
    params += [alias, alias, search or None, search or None, since, since, until, until]
    with connect(read_only=True) as con:
        cursor = con.execute(sql, params)
        columns = [d[0] for d in cursor.description]
        rows = cursor.fetchall()
    return [dict(zip(columns, row)) for row in rows]


def facets() -> dict[str, list[str]]:
    """The distinct names, stages, base models, statuses and aliases, for filter widgets."""
    with connect(read_only=True) as con:
        def distinct(sql: str) -> list[str]:
            return [r[0] for r in con.execute(sql).fetchall() if r[0] is not None]

        return {"names": distinct("SELECT DISTINCT name FROM versions ORDER BY 1"),
                "stages": distinct("SELECT DISTINCT stage FROM versions ORDER BY 1"),
                "base_models": distinct("SELECT DISTINCT base_model FROM versions ORDER BY 1"),
                "statuses": distinct("SELECT DISTINCT status FROM versions ORDER BY 1"),
                "aliases": distinct("SELECT DISTINCT alias FROM aliases ORDER BY 1")}
