"""The scale-out recipe of docs/scale-out.md, run on one machine: a PostgreSQL server holding the registry and
Prefect's own database, a Prefect server on it, a process work pool with two workers sharing one TUNERY_HOME, a
pipeline run deployed to the pool, and a 4-trial sweep spread over both workers."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import yaml
from conftest import REPO, free_port

BIN = Path(os.sys.executable).parent
POOL = "tunery"


@pytest.fixture(scope="module")
def cluster(postgres_server, tmp_path_factory):
    shared = tmp_path_factory.mktemp("shared-home")  # the storage every worker mounts as TUNERY_HOME
    logs = tmp_path_factory.mktemp("logs")
    port = free_port()
    env = {**os.environ, "TUNERY_HOME": str(shared), "TUNERY_REGISTRY_URL": postgres_server.new_database(),
           "PREFECT_HOME": str(shared / "prefect"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_API_DATABASE_CONNECTION_URL": postgres_server.new_database().replace(
               "postgresql://", "postgresql+asyncpg://"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TUNERY_REPO": str(REPO)}
    procs = []

    def start(name: str, *args: str) -> subprocess.Popen:
        log = open(logs / f"{name}.log", "w")
        procs.append(subprocess.Popen([str(BIN / "prefect"), *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True, cwd=REPO))
        return procs[-1]

    try:
        start("server", "server", "start", "--host", "127.0.0.1", "--port", str(port))
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, (logs / "server.log").read_text()[-3000:]
            time.sleep(1)
        for args in (["work-pool", "create", POOL, "--type", "process"],
                     ["concurrency-limit", "create", "tunery-accelerator", "2"]):  # two accelerators, one a worker
            subprocess.run([str(BIN / "prefect"), *args], env=env, check=True, capture_output=True, timeout=120)
        for i in (1, 2):
            start(f"worker-{i}", "worker", "start", "--pool", POOL, "--name", f"worker-{i}", "--limit", "1")
        yield SimpleNamespace(env=env, home=shared, logs=logs, url=env["TUNERY_REGISTRY_URL"])
    finally:
        for p in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


@pytest.fixture
def on_cluster(cluster, monkeypatch):
    """This test process reads the cluster's registry and talks to its Prefect server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    for key in ("TUNERY_HOME", "TUNERY_REGISTRY_URL", "PREFECT_HOME", "TUNERY_REPO"):
        monkeypatch.setenv(key, cluster.env[key])
    with temporary_settings(updates={PREFECT_API_URL: cluster.env["PREFECT_API_URL"]}):
        yield cluster


def _tiny_config(tmp_path, tiny_model_dir, garden_rows) -> str:
    from test_flow import tiny_config

    config = tiny_config(tmp_path, tiny_model_dir, garden_rows)
    doc = yaml.safe_load(Path(config).read_text())
    doc["stages"][0].update(method="lora", max_steps=3)
    doc["eval"].update(generation_rows=0, general=None)
    Path(config).write_text(yaml.safe_dump(doc))
    return config


def test_a_pipeline_deployed_to_the_pool_lands_its_versions_in_the_shared_registry(
        on_cluster, tmp_path, tiny_model_dir, garden_rows):
    """`prefect deploy` of a prefect.yaml like deployments/prefect.yaml (its pull step and the `tunery` pool), a
    run of it picked up by a worker, and its versions in the PostgreSQL registry, with paths in the shared home."""
    from prefect.deployments import run_deployment

    import registry

    config = _tiny_config(tmp_path, tiny_model_dir, garden_rows)
    doc = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    doc["deployments"] = [{"name": "tiny", "entrypoint": "flows/pipeline.py:pipeline",
                           "parameters": {"config_path": config}, "work_pool": {"name": POOL}}]
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(doc))
    deploy = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file",
                             str(tmp_path / "prefect.yaml")], env=on_cluster.env, cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert deploy.returncode == 0, deploy.stdout[-2000:] + deploy.stderr[-2000:]
    run = run_deployment("tunery-pipeline/tiny", timeout=600)
    logs = "".join((on_cluster.logs / f"worker-{i}.log").read_text()[-2000:] for i in (1, 2))
    assert run.state.is_completed(), logs
    assert registry.db.backend_name() == "postgresql"
    found = {v.version: v for v in registry.list_versions()}
    assert {"tiny-base:1", "tiny-fern:1"} <= set(found)
    tuned = found["tiny-fern:1"]
    assert tuned.status == "ready" and tuned.flow_run_id == str(run.id) and tuned.host
    assert tuned.artifact_path == str(on_cluster.home / "artifacts" / "tiny-fern" / "1")
    assert "perplexity" in tuned.metrics


def test_a_sweep_spreads_its_trials_over_both_workers_and_picks_the_best(
        on_cluster, tmp_path, tiny_model_dir, garden_rows):
    """`tunery sweep --pool tunery` with a 2x2 grid: 4 trials, each a flow run a worker picked up (both workers
    got some), each a version in the shared registry carrying its values, and the best by held-out perplexity."""
    import registry

    config = _tiny_config(tmp_path, tiny_model_dir, garden_rows)
    lr, rank = "stages[0].learning_rate", "stages[0].lora.r"
    proc = subprocess.run([str(BIN / "tunery"), "sweep", config, "--set", f"{lr}=2e-3,8e-3", "--set",
                           f"{rank}=4,8", "--pool", POOL, "--json"], env=on_cluster.env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    trials = result["trials"]
    assert [t["status"] for t in trials] == ["ready"] * 4, trials
    assert sorted((t["values"][lr], t["values"][rank]) for t in trials) == [(2e-3, 4), (2e-3, 8), (8e-3, 4),
                                                                            (8e-3, 8)]
    versions = {t["version"] for t in trials}
    assert len(versions) == 4
    for t in trials:
        v = registry.get_version(t["version"])
        assert v.hyperparameters["sft"]["learning_rate"] == t["values"][lr]
        assert v.hyperparameters["sft"]["lora"]["r"] == t["values"][rank]
        assert {"sweep": result["sweep_id"], "trial": t["trial"], "values": t["values"]} in v.info["sweeps"]
        assert t["value"] == pytest.approx(v.metrics["perplexity"])
    assert result["best"]["trial"] == min(trials, key=lambda t: t["value"])["trial"]
    # every trial ran as a flow run that one of the two workers submitted, and each worker took at least one
    picked = {i: set(re.findall(r"[Ss]ubmitting flow run '([0-9a-f-]{36})'",
                                (on_cluster.logs / f"worker-{i}.log").read_text())) for i in (1, 2)}
    assert {t["flow_run_id"] for t in trials} <= picked[1] | picked[2]
    assert all(picked[i] & {t["flow_run_id"] for t in trials} for i in (1, 2)), picked
