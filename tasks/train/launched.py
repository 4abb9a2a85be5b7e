"""A training stage on several processes: `launch` runs this module under `accelerate launch --multi_gpu
--num_processes N` (on a CPU-only machine: torchrun with accelerate's multi-CPU mode);
every process trains on its share of each batch (DDP), and the main process saves the result and reports it
back through `tasks.child` as the stage's StageResult.
"""
from __future__ import annotations

import importlib
import os
import socket
import sys
from pathlib import Path
from typing import Any

from tasks.child import child_main, run_child
from tasks.common import StageResult, resolve_device


def launch(stage, model_path: str, data_dir: str, out_dir: Path, device: str, seed: int,
           checkpoints: str | None = None, trainer: type | None = None) -> StageResult:
    """Run one training stage under `accelerate launch` with `stage.processes` processes; return its result. Each
    process trains with `trainer`, a stage class (default: the stage's own), built from the stage's settings."""
    trainer = trainer or type(stage)
    spec = {"class": f"{trainer.__module__}:{trainer.__qualname__}",
            "config": trainer.model_validate(stage.model_dump(
                include=set(trainer.model_fields) - {"stage"}, by_alias=True)).model_dump(mode="json", by_alias=True),
            "model_path": model_path, "data_dir": str(data_dir), "out_dir": str(out_dir), "device": device,
            "seed": seed, "checkpoints": str(checkpoints) if checkpoints else None}
    kind, config = trainer.kind, stage
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if resolve_device(device) == "cpu":
        # accelerate launch --cpu starts one process; torchrun with ACCELERATE_USE_CPU gives accelerate's MULTI_CPU
        # (gloo), which is what several GPUs get from `accelerate launch --multi_gpu`.
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(config.processes),
                    "--master_port", str(port)]
        env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    else:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                    str(config.processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--main_process_port", str(port)]
        env = dict(os.environ)
    done = run_child("tasks.train.launched", spec, f"{kind} on {config.processes} processes", launcher, env)
    done["info"]["processes"] = config.processes
    return StageResult(**{**done, "stage": kind, "artifact_path": str(out_dir)})


def _train(spec: dict[str, Any]) -> dict[str, Any] | None:
    """One process's share of the stage (its class's `train`); the main process (rank 0) reports the result."""
    module, name = spec["class"].split(":")
    stage = getattr(importlib.import_module(module), name).model_validate(spec["config"])
    result = stage.train(spec["model_path"], spec["data_dir"], Path(spec["out_dir"]), spec["device"], spec["seed"],
                         spec["checkpoints"])
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    return {"metrics": result.metrics, "history": result.history, "info": result.info, "adapter": result.adapter,
            "quantization": result.quantization}


if __name__ == "__main__":
    raise SystemExit(child_main(_train))
