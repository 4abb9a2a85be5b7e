"""Benchmark: what Prefect adds to a pipeline run (server start, task and state bookkeeping, artifacts, result
persistence), as the wall time of `pipeline` minus the same steps called directly, measured in one run.

Both run the demo's data and eval settings with one LoRA sft stage of 2 steps on the packaged SmolLM2-135M and a
one-prompt evaluation, each in a fresh TUNERY_HOME (nothing cached).
Run it with `.venv/bin/python bench/prefect_overhead.py [--steps N]`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def small_config(folder: Path, steps: int) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg["data"]["train"] = str(REPO / "data" / "demo" / "garden_chat.jsonl")
    cfg["stages"] = [{"stage": "sft", "method": "lora", "max_steps": steps, "batch_size": 8, "max_length": 256,
                      "learning_rate": 1.0e-3, "warmup_ratio": 0.0}]
    cfg["eval"].update({"prompts": ["When should I plant garlic?"], "max_new_tokens": 4, "repeats": 1, "warmup": 0,
                        "generation_rows": 0})
    cfg.pop("promote", None)
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fresh_home(root: Path, name: str, base_model: Path) -> Path:
    home = root / name
    (home / "base_models").mkdir(parents=True)
    shutil.copytree(base_model, home / "base_models" / base_model.name)
    os.environ["TUNERY_HOME"] = str(home)
    os.environ["PREFECT_HOME"] = str(home / "prefect")
    return home


def direct(config: Path) -> float:
    from flows import evaluate, inputs, run
    from flows.config import BASE_REF, load_config

    began = time.perf_counter()
    cfg, config_dir = load_config(config)
    base = inputs.run_base(cfg, config_dir)
    data = inputs.run_prep(cfg, config_dir, base.artifact_path)
    eval_cfg = cfg.eval_config()
    evaluate.run_eval(base, data, eval_cfg)
    done, previous = {BASE_REF: base}, base
    for index in range(len(cfg.stages)):
        previous = run.run_stage(cfg, index, done, previous, data, config_dir)
        evaluate.run_eval(previous, data, eval_cfg)
        done[cfg.stage_id(index)] = previous
    return time.perf_counter() - began


def with_prefect(config: Path) -> float:
    from flows.pipeline import pipeline

    began = time.perf_counter()
    pipeline(str(config))
    return time.perf_counter() - began


def main() -> None:
    from tasks.models import ensure_default_base_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    base_model = Path(ensure_default_base_model())
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ.pop("PREFECT_API_URL", None)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = small_config(root, args.steps)
        fresh_home(root, "direct", base_model)
        direct_s = direct(config)
        fresh_home(root, "prefect", base_model)
        prefect_s = with_prefect(config)
    print(json.dumps({"steps": args.steps, "direct_s": direct_s, "prefect_s": prefect_s,
                      "prefect_overhead_s": prefect_s - direct_s, "ratio": prefect_s / direct_s}, indent=2))


if __name__ == "__main__":
    main()
