"""The Prefect pipeline flow and the registry bookkeeping around stages, on the tiny model."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import chat, write_jsonl

import registry
from core.errors import TuneryError
from flows import evaluate, inputs, run
from flows.config import load_config


def tiny_config(tmp_path, tiny_model_dir, garden_rows, **sft) -> str:
    write_jsonl(tmp_path / "garden.jsonl", garden_rows)
    doc = {
        "name": "tiny-fern", "base_model": str(tiny_model_dir), "base_name": "tiny-base", "device": "cpu",
        "data": {"train": "garden.jsonl", "val_fraction": 0.2},
        "stages": [{"stage": "sft", "max_steps": 4, "batch_size": 4, "learning_rate": 5e-3, "max_length": 128,
                    **sft}],
        "eval": {"prompts": ["How deep?"], "max_new_tokens": 4, "repeats": 1, "warmup": 0},
    }
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(doc))
    return str(tmp_path / "pipeline.yaml")


def test_pipeline_flow_registers_base_and_tuned_with_metrics_and_artifacts(
        prefect_server, tmp_path, tiny_model_dir, garden_rows, tunery_home):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.pipeline import pipeline

    result = pipeline(tiny_config(tmp_path, tiny_model_dir, garden_rows))
    assert (result["base"], result["tuned"]) == ("tiny-base:1", "tiny-fern:1")
    tuned = registry.get_version("tiny-fern:1")
    assert tuned.status == "ready" and tuned.parents == ["tiny-base:1"]
    assert tuned.base_model == registry.get_version("tiny-base:1").base_model == str(tiny_model_dir)
    assert tuned.data_hash == result["data_hash"] and tuned.hyperparameters["sft"]["max_steps"] == 4
    for v in (tuned, registry.get_version("tiny-base:1")):
        assert {"perplexity", "tokens_per_s", "ttft_ms", "peak_rss_mb"} <= set(v.metrics), v.version
    assert len(registry.get_history("tiny-fern:1")) >= 4
    assert (tunery_home / "artifacts" / "tiny-fern" / "1" / "adapter_model.safetensors").exists()
    keys = ["tiny-fern-prep", "tiny-fern-sft", "tiny-fern-eval", "tiny-base-eval", "tiny-fern-summary",
            "tiny-fern-dashboard"]
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
        assert {a.key for a in found} == set(keys)
        link = next(a for a in found if a.key == "tiny-fern-dashboard")
        assert "http://127.0.0.1:8501/version?v=tiny-fern:1" in link.data
        run = client.read_flow_run(next(a for a in found if a.key == "tiny-fern-summary").flow_run_id)
        assert run.name == "tiny-fern -> tiny-fern:1"



def _task_states(flow_run_id: str) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r.state.name for r in runs}


def test_unchanged_inputs_skip_training_and_changed_data_retrains(prefect_server, tmp_path, tiny_model_dir,
                                                                 garden_rows, tunery_home):
    from flows.pipeline import pipeline

    config = tiny_config(tmp_path, tiny_model_dir, garden_rows)
    first = pipeline(config)
    assert first["tuned"] == "tiny-fern:1"
    fingerprint = registry.get_version("tiny-fern:1").fingerprint
    # The same config and data again: the stage and both evaluations come from Prefect's cache, no new version.
    state = pipeline(config, return_state=True)
    second = state.result()
    assert second["tuned"] == "tiny-fern:1" and [r["this run"] for r in second["rows"]] == ["base", "reused"]
    assert [v.version for v in registry.list_versions()] == ["tiny-base:1", "tiny-fern:1"]
    states = _task_states(str(state.state_details.flow_run_id))
    assert states["sft tiny-fern from tiny-base:1"] == "Cached", states
    assert states["eval tiny-fern:1"] == "Cached" and states["eval tiny-base:1"] == "Cached", states
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        assert client.read_flow_run(state.state_details.flow_run_id).name == "tiny-fern -> tiny-fern:1 (nothing changed)"
    # Changed data: a new hash, a new fingerprint, a new version trained from the same base.
    tiny_config(tmp_path, tiny_model_dir, garden_rows + [chat("What is compost?", "Rotted plant matter.")])
    third = pipeline(config)
    assert third["tuned"] == "tiny-fern:2" and third["data_hash"] != first["data_hash"]
    v2 = registry.get_version("tiny-fern:2")
    assert v2.parents == ["tiny-base:1"] and v2.fingerprint != fingerprint


def test_failed_training_is_recorded_as_failed_and_leaves_no_artifact(tmp_path, tiny_model_dir, garden_rows,
                                                                       tunery_home):
    cfg, config_dir = load_config(tiny_config(tmp_path, tiny_model_dir, garden_rows, max_length=16))
    base = inputs.run_base(cfg, config_dir)
    data = inputs.run_prep(cfg, config_dir, base.artifact_path)
    with pytest.raises(TuneryError, match="cuts off every answer"):
        run.run_train(cfg, cfg.stages[0], base, data)
    failed = registry.get_version("tiny-fern:1")
    assert failed.status == "failed" and "cuts off every answer" in failed.error
    assert not (tunery_home / "artifacts" / "tiny-fern" / "1").exists()
    assert not list((tunery_home / "artifacts" / "tiny-fern").glob(".*tmp*"))


def test_eval_refuses_a_version_that_is_not_ready(tmp_path, tiny_model_dir, garden_rows):
    cfg, config_dir = load_config(tiny_config(tmp_path, tiny_model_dir, garden_rows))
    data = inputs.run_prep(cfg, config_dir)
    v = registry.get_version(registry.create_version("tiny-fern", "sft"))
    with pytest.raises(TuneryError, match="tiny-fern:1 is running"):
        evaluate.run_eval(v, data, cfg.eval_config())


def test_bad_data_stops_before_any_version_is_registered(tmp_path, tiny_model_dir, garden_rows):
    path = tiny_config(tmp_path, tiny_model_dir, garden_rows)
    write_jsonl(tmp_path / "garden.jsonl", garden_rows + [chat("Q", "A"), {"messages": [{"role": "user"}]}])
    cfg, config_dir = load_config(path)
    with pytest.raises(TuneryError, match=r"garden.jsonl line 26: field 'messages\[0\].content'"):
        inputs.run_prep(cfg, config_dir)
    assert registry.list_versions(name="tiny-fern") == []


def test_shipped_full_chain_config_registers_every_stage_with_its_lineage(
        prefect_server, tmp_path, tiny_model_dir, tunery_home):
    """configs/full_chain.yaml on the tiny model with 2 steps a stage: the versions form the expected chain."""
    from conftest import REPO

    from flows.pipeline import pipeline

    doc = yaml.safe_load((REPO / "configs/full_chain.yaml").read_text())
    doc.update(base_model=str(tiny_model_dir), base_name="tiny-base", device="cpu",
               eval={"prompts": ["How deep?"], "max_new_tokens": 4, "repeats": 1, "warmup": 0})

    def local(data: dict) -> dict:
        return {**data, "train": str((REPO / "configs" / data["train"]).resolve())}

    doc["data"] = local(doc["data"])
    for stage in doc["stages"]:
        if stage["stage"] != "merge":
            stage.update(max_steps=2, batch_size=4, max_length=128)
        if "data" in stage:
            stage["data"] = local(stage["data"])
    (tmp_path / "chain.yaml").write_text(yaml.safe_dump(doc))

    result = pipeline(str(tmp_path / "chain.yaml"))
    assert result["versions"] == ["tiny-base:1"] + [f"fern-chain:{n}" for n in range(1, 6)]
    v = {x.version: x for x in registry.list_versions()}
    cpt, sft, dpo, merged, blend = (v[f"fern-chain:{n}"] for n in range(1, 6))
    assert [x.stage for x in (cpt, sft, dpo, merged, blend)] == ["cpt", "sft", "dpo", "merge", "merge"]
    assert cpt.parents == ["tiny-base:1"] and sft.parents == [cpt.version]
    assert dpo.parents == [sft.version] and merged.parents == [dpo.version]
    assert blend.parents == [sft.version, merged.version]  # a mergekit merge has both sources as parents
    for x in (cpt, sft, dpo, merged, blend):
        assert x.status == "ready" and x.base_model == str(tiny_model_dir)
        assert {"perplexity", "tokens_per_s", "ttft_ms", "peak_rss_mb"} <= set(x.metrics), x.version
    # Each stage trained on its own data and recorded what it is about.
    assert cpt.info["method"] == "spectrum" and cpt.info["spectrum"]["selected"]
    assert "text_perplexity" in cpt.metrics and cpt.data_hash != sft.data_hash != dpo.data_hash
    assert {"preference_accuracy", "preference_accuracy_start", "reward_margin"} <= set(dpo.metrics)
    assert merged.info["merge"] == "lora" and not merged.adapter
    assert blend.info["mergekit_config"]["base_model"] == sft.version
    assert blend.hyperparameters["merge"]["method"] == "slerp"
    assert (tunery_home / "artifacts" / "fern-chain" / "5" / "mergekit_config.yml").exists()
    # The whole ancestry of the blend reaches the base along both of its parents.
    tree = registry.lineage(blend.version)
    assert [p["version"] for p in tree["parents"]] == [sft.version, merged.version]
    deepest = tree["parents"][1]
    chain = []
    while deepest["parents"]:
        deepest = deepest["parents"][0]
        chain.append(deepest["version"])
    assert chain == [dpo.version, sft.version, cpt.version, "tiny-base:1"]


def test_stage_given_the_wrong_kind_of_data_registers_nothing(tmp_path, tiny_model_dir, garden_rows):
    path = tiny_config(tmp_path, tiny_model_dir, garden_rows)
    doc = yaml.safe_load(open(path))
    doc["stages"] = [{"stage": "dpo"}]
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(doc))
    cfg, config_dir = load_config(path)
    base = inputs.run_base(cfg, config_dir)
    data = inputs.run_prep(cfg, config_dir, base.artifact_path)
    with pytest.raises(TuneryError, match=r"stage dpo \(dpo\) needs preference data, but its data holds chat"):
        run.run_stage(cfg, 0, {"base": base}, base, data, config_dir)
    assert registry.list_versions(name="tiny-fern") == []


def test_a_flow_that_failed_at_a_stage_resumes_there(prefect_server, tmp_path, tiny_model_dir, garden_rows):
    from flows.pipeline import pipeline

    config = tiny_config(tmp_path, tiny_model_dir, garden_rows)
    doc = yaml.safe_load(open(config))
    first_stage = {**doc["stages"][0], "id": "a"}
    doc["stages"] = [first_stage, {**first_stage, "id": "b", "from": "a", "max_length": 16}]  # b cuts every answer
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(Exception, match="cuts off every answer"):
        pipeline(config)
    assert [(v.version, v.status) for v in registry.list_versions(name="tiny-fern")] == [
        ("tiny-fern:1", "ready"), ("tiny-fern:2", "failed")]
    doc["stages"][1]["max_length"] = 128  # the fix
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(doc))
    state = pipeline(config, return_state=True)
    result = state.result()
    states = _task_states(str(state.state_details.flow_run_id))
    assert states["sft tiny-fern from tiny-base:1"] == "Cached", states   # stage a is not trained again
    assert result["versions"] == ["tiny-base:1", "tiny-fern:1", "tiny-fern:3"]
    assert registry.get_version("tiny-fern:3").parents == ["tiny-fern:1"]
    assert [r["this run"] for r in result["rows"]] == ["base", "reused", "trained"]


def test_a_stopped_training_resumes_from_its_last_checkpoint(tmp_path, tiny_model_dir, garden_rows, tunery_home,
                                                             monkeypatch):
    import tasks.train.training as training

    cfg, config_dir = load_config(tiny_config(tmp_path, tiny_model_dir, garden_rows, max_steps=6, save_steps=2))
    base = inputs.run_base(cfg, config_dir)
    data = inputs.run_prep(cfg, config_dir, base.artifact_path)
    real_guard = training.nan_guard

    def crashing_guard():  # fault injection: the process "dies" after step 5
        guard = real_guard()

        def on_step_end(args, state, control, **kwargs):
            if state.global_step == 5:
                raise RuntimeError("simulated crash after step 5")

        guard.on_step_end = on_step_end
        return guard

    monkeypatch.setattr(training, "nan_guard", crashing_guard)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run.run_stage(cfg, 0, {"base": base}, base, data, config_dir)
    assert [p.name for p in (tunery_home / "checkpoints").glob("*/checkpoint-*")] == ["checkpoint-4"]
    assert registry.get_version("tiny-fern:1").status == "failed"

    monkeypatch.setattr(training, "nan_guard", real_guard)
    version = run.run_stage(cfg, 0, {"base": base}, base, data, config_dir)
    assert version.version == "tiny-fern:2" and version.info["resumed_from"] == "checkpoint-4"
    assert version.metrics["train_steps"] == 6
    assert [h["step"] for h in registry.get_history("tiny-fern:2")] == [5, 6]  # steps 1-4 were not run again
    assert not list((tunery_home / "checkpoints").iterdir())  # removed once the stage succeeded


def test_a_stage_with_two_processes_trains_under_accelerate_launch(tmp_path, tiny_model_dir, garden_rows):
    """Data-parallel training as on several GPUs, here with 2 CPU processes (gloo): one version, trained weights."""
    import torch
    from safetensors.torch import load_file

    cfg, config_dir = load_config(tiny_config(tmp_path, tiny_model_dir, garden_rows, processes=2, max_steps=3))
    base = inputs.run_base(cfg, config_dir)
    data = inputs.run_prep(cfg, config_dir, base.artifact_path)
    version = run.run_stage(cfg, 0, {"base": base}, base, data, config_dir)
    assert version.status == "ready" and version.info["processes"] == version.info["world_size"] == 2
    assert version.metrics["train_steps"] == 3 and len(registry.get_history(version.version)) == 3
    adapter = load_file(str(Path(version.artifact_path) / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and torch.count_nonzero(v) for k, v in adapter.items())  # B moved off 0
    assert not list(Path(version.artifact_path).glob("launch.json"))


def test_a_copy_of_tunery_home_at_another_path_reuses_every_stage(prefect_server, tmp_path, tiny_model_dir,
                                                                   garden_rows, tunery_home, monkeypatch):
    """A worker that mounts the shared storage at another path: TUNERY_HOME copied elsewhere (and the original moved
    away, so nothing can read the old path) reruns the same config without registering or training anything, and
    every recorded path leads into the new place. The base is `default`, the model under TUNERY_HOME/base_models
    (the tiny one stands in for SmolLM2 here). Each version records the machine (host) that made it."""
    import os
    import shutil
    import socket

    from core.home import base_models_dir
    from flows.pipeline import pipeline

    shutil.copytree(tiny_model_dir, tunery_home / "base_models" / "tiny")
    real = inputs.resolve_base_model
    monkeypatch.setattr(inputs, "resolve_base_model", lambda spec, config_dir=None: str(
        base_models_dir() / "tiny") if spec == "default" else real(spec, config_dir))
    config = tiny_config(tmp_path, tiny_model_dir, garden_rows)
    doc = yaml.safe_load(Path(config).read_text())
    doc["base_model"] = "default"
    doc["stages"].append({"stage": "distill-prompt", "system": "You are Fern. Answer briefly.", "max_steps": 2,
                          "batch_size": 4, "max_length": 128, "max_new_tokens": 6, "unfinished": "keep"})
    Path(config).write_text(yaml.safe_dump(doc))
    first = pipeline(config)
    assert first["versions"] == ["tiny-base:1", "tiny-fern:1", "tiny-fern:2"]
    registry.db.release()
    moved = tmp_path / "elsewhere" / "home"
    shutil.copytree(tunery_home, moved, symlinks=True)
    tunery_home.rename(tmp_path / "gone")
    monkeypatch.setenv("TUNERY_HOME", str(moved))
    monkeypatch.setenv("PREFECT_HOME", str(moved / "prefect"))
    datasets = sorted(os.listdir(moved / "datasets"))

    again = pipeline(config)
    assert again["versions"] == first["versions"]
    assert [r["this run"] for r in again["rows"]] == ["base", "reused", "reused"]
    assert [v.version for v in registry.list_versions()] == first["versions"]  # not even the base again
    assert sorted(os.listdir(moved / "datasets")) == datasets  # the teacher was not asked again
    for v in registry.list_versions():
        assert v.host == socket.gethostname()
        folder = moved / ("base_models/tiny" if v.stage == "base" else f"artifacts/{v.name}/{v.number}")
        assert v.artifact_path == str(folder) and Path(v.artifact_path, "config.json" if v.stage == "base"
                                                       else "adapter_config.json").exists()
