"""A stopped command stops what it started (issue 15): SIGTERM to `tunery run` or `tunery serve` leaves no
temporary Prefect server (uvicorn) or other child behind, and the run's versions are not left `running`.
(`tunery dashboard` is checked in test_dashboard.py.)"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
from test_flow import tiny_config

import registry

TUNERY = str(Path(os.sys.executable).parent / "tunery")


def _start(args: list[str], home: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "TUNERY_HOME": str(home), "PREFECT_HOME": str(home / "prefect"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)  # Prefect starts its temporary server, a uvicorn child
    return subprocess.Popen([TUNERY, *args], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait_for(proc: subprocess.Popen, log: Path, ready, timeout: float = 240) -> list[psutil.Process]:
    """Wait until `ready(log text, descendants)`; return the descendants then."""
    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, log.read_text()[-3000:]
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        if ready(log.read_text(errors="replace"), children):
            return children
        time.sleep(0.5)


def _uvicorn(children: list[psutil.Process]) -> bool:
    def cmdline(p: psutil.Process) -> str:
        try:
            return " ".join(p.cmdline())
        except psutil.Error:
            return ""

    return any("uvicorn" in cmdline(p) for p in children)


def _stop_and_check(proc: subprocess.Popen, started: list[psutil.Process], log: Path) -> int:
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=90)
    deadline = time.time() + 30
    left = started
    while left and time.time() < deadline:
        left = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.5)
    names = []
    for p in left:  # named, then stopped, so a failure here leaves nothing running either
        try:
            names.append((p.pid, p.cmdline()))
            p.kill()
        except psutil.Error:
            pass
    assert not names, names + [log.read_text()[-2000:]]
    return code


def test_sigterm_to_tunery_run_stops_its_prefect_server_and_settles_its_version(tmp_path, tiny_model_dir,
                                                                              garden_rows, tunery_home):
    config = tiny_config(tmp_path, tiny_model_dir, garden_rows, max_steps=400)
    log = tmp_path / "run.log"
    proc = _start(["run", config], tunery_home, log)
    started = _wait_for(proc, log, lambda text, children: _uvicorn(children) and "sft tiny-fern" in text)
    time.sleep(3)  # into the stage
    assert _stop_and_check(proc, started, log) == 143
    assert "terminated" in log.read_text()
    assert [v.status for v in registry.list_versions(status="running")] == []


def test_sigterm_to_tunery_serve_stops_its_prefect_server(tmp_path, tunery_home):
    log = tmp_path / "serve.log"
    proc = _start(["serve"], tunery_home, log)
    started = _wait_for(proc, log, lambda text, children: _uvicorn(children) and "serving fern-nightly" in text)
    time.sleep(5)  # the runner is up
    _stop_and_check(proc, started, log)


def test_an_interrupted_parent_takes_its_child_s_whole_process_group_with_it(tmp_path):
    """A launcher (torchrun, accelerate) starts workers of its own: when the parent is interrupted, tasks.child
    kills the launcher's whole process group, so no worker is left training."""
    import sys

    launcher = [sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
                "'import time; time.sleep(300)']); time.sleep(300)"]
    script = tmp_path / "parent.py"
    script.write_text(f"from tasks.child import run_child\nrun_child('tasks.evaluate.evaluation', {{}}, 'x', {launcher!r})\n")
    log = tmp_path / "parent.log"
    parent = subprocess.Popen([sys.executable, str(script)], cwd=str(Path(__file__).resolve().parent.parent),
                              stdout=log.open("w"), stderr=subprocess.STDOUT)
    started = _wait_for(parent, log, lambda text, children: len(children) >= 2, timeout=60)
    parent.send_signal(signal.SIGINT)
    parent.wait(timeout=30)
    deadline = time.time() + 20
    while (left := [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]) and \
            time.time() < deadline:
        time.sleep(0.5)
    for p in left:
        p.kill()
    assert not left, [p.pid for p in left]
