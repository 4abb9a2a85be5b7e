"""Scheduled retraining (issue 7): the deployments of deployments/prefect.yaml load with their schedules, and
`tunery serve` registers them with a Prefect server."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from core.errors import TuneryError
from flows import serve


def _schedules(client, name: str) -> list[tuple[str, str]]:
    deployment = client.read_deployment_by_name(f"tunery-pipeline/{name}")
    return [(s.schedule.cron, s.schedule.timezone) for s in deployment.schedules]


def test_shipped_deployments_load_with_their_schedules(prefect_server):
    from prefect.client.orchestration import get_client

    found = {d["name"]: d for d in serve.read_deployments()}
    assert set(found) == {"fern-nightly", "fern-chain-weekly"}
    assert found["fern-nightly"]["config_path"].endswith("configs/demo.yaml")
    for deployment in serve.runner_deployments():
        deployment.apply()
    with get_client(sync_client=True) as client:
        assert _schedules(client, "fern-nightly") == [("0 3 * * *", "UTC")]
        assert _schedules(client, "fern-chain-weekly") == [("0 4 * * 0", "UTC")]
        d = client.read_deployment_by_name("tunery-pipeline/fern-nightly")
        assert d.parameters["config_path"].endswith("configs/demo.yaml")
    # The server's scheduler turns the cron into scheduled runs (it cannot with SQLAlchemy 2.1; see base.in).
    import asyncio

    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.server.services.scheduler import schedule_deployments

    asyncio.run(schedule_deployments())
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[d.id])))
    assert runs and all(r.state.name == "Scheduled" and r.expected_start_time.hour == 3 for r in runs)


@pytest.mark.parametrize("text, message", [
    ("deployments:\n  - name: x\n    entrypoint: other.py:flow\n", "entrypoint must be flows/pipeline.py:pipeline"),
    ("deployments:\n  - name: x\n    entrypoint: flows/pipeline.py:pipeline\n    parameters: {config_path: "
     "configs/demo.yaml}\n    schedules: [{cron: 'not a cron'}]\n", "bad schedule"),
    ("deployments:\n  - name: x\n    entrypoint: flows/pipeline.py:pipeline\n    parameters: {config_path: "
     "nope.yaml}\n", "config file not found"),
    ("deployments: []\n", "no deployments"),
])
def test_bad_deployments_are_named(tmp_path, text, message):
    (tmp_path / "prefect.yaml").write_text(text)
    with pytest.raises(TuneryError, match=message):
        serve.read_deployments(tmp_path / "prefect.yaml")


def test_tunery_serve_registers_the_scheduled_deployments(prefect_server, tmp_path, tunery_home):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for name in ("fern-nightly", "fern-chain-weekly"):
            try:
                client.delete_deployment(client.read_deployment_by_name(f"tunery-pipeline/{name}").id)
            except Exception:
                pass
    env = {**os.environ, "TUNERY_HOME": str(tunery_home), "PREFECT_API_URL": prefect_server}
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([str(Path(os.sys.executable).parent / "tunery"), "serve"], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while True:
            with get_client(sync_client=True) as client:
                try:
                    if _schedules(client, "fern-nightly") and _schedules(client, "fern-chain-weekly"):
                        break
                except Exception:
                    pass
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            assert time.time() < deadline, (tmp_path / "serve.log").read_text()[-2000:]
            time.sleep(1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    assert "serving fern-nightly" in (tmp_path / "serve.log").read_text()


def test_training_tasks_share_one_accelerator_slot_and_retry_only_transient_errors(prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.states import Failed

    from core.errors import RegistryBusy
    from flows.pipeline import (ACCELERATOR_TAG, ensure_accelerator_limit, eval_task, prep_task, stage_task,
                                transient_only)

    ensure_accelerator_limit()
    with get_client(sync_client=True) as client:
        assert client.read_concurrency_limit_by_tag(ACCELERATOR_TAG).concurrency_limit == 1
    assert ACCELERATOR_TAG in stage_task.tags and ACCELERATOR_TAG in eval_task.tags
    assert stage_task.retries == 0 and prep_task.retries == 2

    def verdict(error: BaseException) -> bool:
        return transient_only(None, None, Failed(data=error))

    assert verdict(OSError("stale NFS file handle")) and verdict(RegistryBusy("locked"))
    assert not verdict(TuneryError("garden.jsonl, line 3: missing 'messages'"))
    assert not verdict(MemoryError()) and not verdict(RuntimeError("CUDA out of memory"))
    assert not verdict(OSError("[Errno 12] Cannot allocate memory: out of memory"))
