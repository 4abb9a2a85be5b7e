"""`tunery sweep`: the values a sweep tries (a --set grid or an Optuna search of the config's `sweep:` section),
checked before anything trains; trials recorded in the registry with their values, failures kept, the best picked.
The sweep spread over two process workers is in tests/test_scale_out.py."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml
from test_flow import tiny_config

import registry
from core.errors import TuneryError
from registry import sweeps as sweep_store

FAST_EVAL = {"prompts": ["How deep?"], "max_new_tokens": 4, "repeats": 1, "warmup": 0, "generation_rows": 0,
             "general": None}


def _config(tmp_path, tiny_model_dir, garden_rows, **extra) -> str:
    config = tiny_config(tmp_path, tiny_model_dir, garden_rows)
    doc = yaml.safe_load(Path(config).read_text())
    doc["stages"][0].update(method="lora", max_steps=3)
    doc["eval"] = FAST_EVAL
    doc.update(extra)
    Path(config).write_text(yaml.safe_dump(doc))
    return config


def test_set_options_make_a_grid_and_bad_keys_are_named_before_anything_trains(tmp_path, tiny_model_dir,
                                                                                garden_rows, tunery_home):
    from flows.pipeline import ACCELERATOR_TAG
    from flows.sweep import Plan, parse_value, trial_task

    assert ACCELERATOR_TAG in trial_task.tags  # trials queue on the accelerator limit

    config = _config(tmp_path, tiny_model_dir, garden_rows)
    plan = Plan(config, ["stages[0].learning_rate=1e-3,5e-3", "stages[0].lora.r=4,8"])
    lr, r = "stages[0].learning_rate", "stages[0].lora.r"
    assert plan.method == "grid" and plan.direction == "minimize" and plan.metric == "perplexity"
    assert plan.grid == [{lr: 1e-3, r: 4}, {lr: 1e-3, r: 8}, {lr: 5e-3, r: 4}, {lr: 5e-3, r: 8}]
    cfg, _ = plan.trial_config(plan.grid[3])
    assert (cfg.stages[0].learning_rate, cfg.stages[0].lora.r) == (5e-3, 8)
    assert yaml.safe_load(Path(config).read_text())["stages"][0].get("lora") is None  # the file is untouched
    assert [parse_value(v) for v in ("3e-4", "8", "true", "all-linear")] == [3e-4, 8, True, "all-linear"]
    for sets, message in ((["stages[0].lerning_rate=1e-3"], r"unknown key 'stages\[0\].lerning_rate' "
                                                             r"\(did you mean 'learning_rate'\?\)"),
                          (["stages[2].learning_rate=1e-3"], r"stages\[0\].learning_rate: the config has no "
                                                             r"stages\[2\]|the config has no stages\[2\]"),
                          (["stages[0].lora.r=0"], r"stages\[0\].lora.r: Input should be greater than or equal"),
                          (["learning_rate"], "expected KEY=V1,V2"),
                          (["stages[0]..r=1"], "not a settings key")):
        with pytest.raises(TuneryError, match=message):
            Plan(config, sets)
    with pytest.raises(TuneryError, match="nothing to sweep"):
        Plan(config, [])
    # a `sweep:` section: each end of a range and each choice is checked too
    doc = yaml.safe_load(Path(config).read_text())
    doc["sweep"] = {"parameters": {lr: {"low": 1e-4, "high": 1e-2, "log": True}, r: [8, 0]}}
    Path(config).write_text(yaml.safe_dump(doc))
    with pytest.raises(TuneryError, match=r"trial .*'stages\[0\].lora.r': 0.*greater than or equal to 1"):
        Plan(config, None)
    doc["sweep"]["parameters"][r] = [8, 16]
    Path(config).write_text(yaml.safe_dump(doc))
    plan = Plan(config, None)
    assert (plan.method, plan.trials, plan.direction) == ("tpe", 8, "minimize") and plan.grid is None
    # through the CLI: one line, exit 1, nothing registered
    env = {**os.environ, "TUNERY_HOME": str(tunery_home)}
    proc = subprocess.run([str(Path(os.sys.executable).parent / "tunery"), "sweep", config, "--set",
                           "stages[0].lerning_rate=1e-3"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "lerning_rate" in proc.stderr
    assert registry.list_versions() == []


def test_an_optuna_sweep_records_every_trial_keeps_failures_and_picks_the_best(prefect_server, tmp_path,
                                                                                tiny_model_dir, garden_rows):
    """The config's `sweep:` section: a log range of learning rates and a choice of LoRA targets, one of which
    does not exist in the model (that trial fails at training). 4 trials by Optuna's random sampler: each one is
    a row with its values; a failed trial is recorded with its error and the sweep goes on; every finished trial
    left a version carrying the sweep's id and values, whose held-out perplexity is the trial's value; the best
    is the lowest."""
    from flows.sweep import sweep_flow

    lr, targets = "stages[0].learning_rate", "stages[0].lora.target_modules"
    config = _config(tmp_path, tiny_model_dir, garden_rows, sweep={
        "parameters": {lr: {"low": 1e-3, "high": 3e-2, "log": True},
                       targets: [["q_proj", "v_proj"], ["no_such_module"]]},
        "trials": 4, "sampler": "random", "seed": 3, "metric": "perplexity"})
    result = sweep_flow(config)
    trials = result["trials"]
    assert [t["trial"] for t in trials] == [0, 1, 2, 3] and result["method"] == "random"
    failed = [t for t in trials if t["values"][targets] == ["no_such_module"]]
    ok = [t for t in trials if t["values"][targets] != ["no_such_module"]]
    assert failed and ok, "the seed must try both choices"
    for t in failed:
        assert t["status"] == "failed" and "no_such_module" in t["error"] and t["value"] is None
    for t in ok:
        assert t["status"] == "ready" and 1e-3 <= t["values"][lr] <= 3e-2 and t["seconds"] > 0
        v = registry.get_version(t["version"])
        assert v.hyperparameters["sft"]["learning_rate"] == t["values"][lr]
        assert {"sweep": result["sweep_id"], "trial": t["trial"], "values": t["values"]} in v.info["sweeps"]
        assert t["value"] == pytest.approx(v.metrics["perplexity"])
    assert result["best"]["trial"] == min(ok, key=lambda t: t["value"])["trial"]
    stored = sweep_store.get_sweep(result["sweep_id"])
    assert stored.status == "done" and stored.best_trial == result["best"]["trial"]
    assert sweep_store.list_sweeps()[0]["failed"] == len(failed)
