"""`tunery serve`: the deployments of deployments/prefect.yaml, served with their schedules from this process.

Each deployment runs the pipeline flow with its config; Prefect starts a run at every cron tick. Stages whose
inputs did not change since the last successful run are skipped (see flows/pipeline.py: stage_cache_key).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from core.errors import TuneryError
from core.files import read_utf8
from flows.config import load_config
from flows.pipeline import ensure_accelerator_limit, pipeline

REPO = Path(__file__).resolve().parent.parent
PREFECT_YAML = REPO / "deployments" / "prefect.yaml"


def read_deployments(path: Path = PREFECT_YAML) -> list[dict[str, Any]]:
    """The deployments of a prefect.yaml, checked: entrypoint is the pipeline flow, the config exists, cron parses."""
    from prefect.client.schemas.schedules import CronSchedule

    if not path.exists():
        raise TuneryError(f"{path}: not found")
    doc = yaml.safe_load(read_utf8(path)) or {}
    found = []
    for i, d in enumerate(doc.get("deployments") or []):
        where = f"{path.name}: deployments[{i}] ({d.get('name', '?')})"
        if d.get("entrypoint") != "flows/pipeline.py:pipeline":
            raise TuneryError(f"{where}: entrypoint must be flows/pipeline.py:pipeline")
        config = (d.get("parameters") or {}).get("config_path")
        if not config:
            raise TuneryError(f"{where}: parameters.config_path is missing")
        load_config(REPO / config)  # a bad config is named now, not at 3 am
        schedules = []
        for s in d.get("schedules") or []:
            try:
                schedules.append(CronSchedule(cron=s["cron"], timezone=s.get("timezone", "UTC")))
            except (KeyError, ValueError) as e:
                raise TuneryError(f"{where}: bad schedule {s!r}: {e}") from None
        found.append({"name": d["name"], "description": d.get("description", ""), "config_path": str(REPO / config),
                      "schedules": schedules})
    if not found:
        raise TuneryError(f"{path}: no deployments")
    return found


def runner_deployments(path: Path = PREFECT_YAML) -> list:
    """Prefect RunnerDeployments of the pipeline flow, one per deployment, with its schedules and parameters."""

    return [pipeline.to_deployment(name=d["name"], description=d["description"], schedules=d["schedules"],
                                   parameters={"config_path": d["config_path"]})
            for d in read_deployments(path)]


def serve(path: Path = PREFECT_YAML) -> None:
    """Serve the deployments of `path` with their schedules, one run at a time (what `tunery serve` runs)."""
    from prefect import serve as prefect_serve

    deployments = runner_deployments(path)
    for d in deployments:
        crons = ", ".join(f"{s.schedule.cron} {s.schedule.timezone}" for s in d.schedules) or "no schedule"
        print(f"serving {d.name}: {d.parameters['config_path']} ({crons})", file=sys.stderr)

    ensure_accelerator_limit()
    prefect_serve(*deployments, limit=1)  # one pipeline at a time from this process, too
