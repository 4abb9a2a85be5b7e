"""A training stage on several processes: `launch` runs this module under `accelerate launch --num_processes N`;
every process trains on its share of each batch (DDP), and the main process saves the result and writes
`stage_result.json`, which `launch` reads back as the stage's StageResult.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from tasks.common import StageResult, TuneryError, resolve_device, write_json
from tasks.training import CHECKPOINTS

RESULT = "stage_result.json"


def _trainers() -> dict[str, Any]:
    from tasks.cpt import CptConfig, train_cpt
    from tasks.dpo import DpoConfig, train_dpo
    from tasks.sft import SftConfig, train_sft

    return {"cpt": (train_cpt, CptConfig), "sft": (train_sft, SftConfig), "dpo": (train_dpo, DpoConfig)}


def launch(kind: str, config, model_path: str, data_dir: str, out_dir: Path, device: str, seed: int) -> StageResult:
    """Run one training stage under `accelerate launch` with `config.processes` processes; return its result."""
    train, config_class = _trainers()[kind]
    spec = {"kind": kind, "config": config_class.model_validate(config.model_dump(
        include=set(config_class.model_fields))).model_dump(mode="json"), "model_path": model_path,
            "data_dir": str(data_dir), "out_dir": str(out_dir), "device": device, "seed": seed,
            "checkpoints": str(CHECKPOINTS.get()) if CHECKPOINTS.get() else None}
    spec_path = out_dir / "launch.json"
    write_json(spec_path, spec)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(config.processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), *(["--cpu"] if resolve_device(device) == "cpu" else []),
               "-m", "tasks.launched", str(spec_path)]
    proc = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    spec_path.unlink(missing_ok=True)
    if proc.returncode != 0 or not (out_dir / RESULT).exists():
        raise TuneryError(f"{kind} under accelerate launch ({config.processes} processes) failed with exit code "
                          f"{proc.returncode}; its output is above")
    done = json.loads((out_dir / RESULT).read_text())
    (out_dir / RESULT).unlink()
    done["info"]["processes"] = config.processes
    return StageResult(stage=kind, artifact_path=str(out_dir), metrics=done["metrics"], history=done["history"],
                       info=done["info"])


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    train, config_class = _trainers()[spec["kind"]]
    CHECKPOINTS.set(Path(spec["checkpoints"]) if spec["checkpoints"] else None)
    result = train(config_class.model_validate(spec["config"]), spec["model_path"], spec["data_dir"],
                   spec["out_dir"], spec["device"], spec["seed"])
    if int(os.environ.get("RANK", "0")) == 0:
        write_json(Path(spec["out_dir"]) / RESULT, {"metrics": result.metrics, "history": result.history,
                                                    "info": result.info})


if __name__ == "__main__":
    main(sys.argv[1])
