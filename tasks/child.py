"""Work in a child process: the parent writes a JSON spec, runs `python -m MODULE SPEC OUT` (or that under a
launcher such as torchrun), and reads the JSON the child wrote to OUT. Used where a fresh process matters: an
evaluation (a clean peak-memory reading) and a training stage on several processes (`tasks.train.launched`).

The child runs in its own process group, so when the parent is interrupted (Ctrl-C, SIGTERM) the whole group,
launcher workers included, is killed instead of left running. A TuneryError in the child comes back as the same
one-line message; any other failure names the exit code.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from core.errors import TuneryError


def run_child(module: str, spec: dict[str, Any], what: str, launcher: list[str] | None = None,
              env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `module`'s `child_main` on `spec` in a child process (under `launcher`, default plain Python) and return
    the JSON it wrote; TuneryError "`what` failed: ..." when it failed. Its stderr (progress) passes through."""
    with tempfile.TemporaryDirectory(prefix=f"tunery-{module.rsplit('.', 1)[-1]}-") as tmp:
        spec_file, out_file = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_file.write_text(json.dumps(spec))
        command = [*(launcher or [sys.executable]), "-m", module, str(spec_file), str(out_file)]
        proc = subprocess.Popen(command, env=env, start_new_session=True)
        try:
            code = proc.wait()
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        result = json.loads(out_file.read_text()) if out_file.exists() else {}
    if code != 0 or "error" in result or not result:
        detail = result.get("error") or f"the child process exited with code {code}; its output is above"
        raise TuneryError(f"{what} failed: {detail}")
    return result


def child_main(work: Callable[[dict[str, Any]], dict[str, Any] | None], argv: list[str] | None = None) -> int:
    """The child's side: read the spec, do the work, write its JSON result (or {"error": message} for a
    TuneryError). `work` may return None in a process that does not report (a launcher's non-main rank)."""
    spec_file, out_file = (argv if argv is not None else sys.argv[1:])[:2]
    try:
        result = work(json.loads(Path(spec_file).read_text()))
    except TuneryError as e:
        Path(out_file).write_text(json.dumps({"error": str(e)}))
        return 1
    if result is not None:
        Path(out_file).write_text(json.dumps(result))
    return 0
