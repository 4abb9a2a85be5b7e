"""The Prefect pipeline flow and the registry bookkeeping around stages, on the tiny model."""
from __future__ import annotations

import pytest
import yaml

import registry
from conftest import chat, write_jsonl
from flows import steps
from flows.config import load_config
from tasks.common import TuneryError


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


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
        prefect_harness, tmp_path, tiny_model_dir, garden_rows, tunery_home):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.pipeline import pipeline

    result = pipeline(tiny_config(tmp_path, tiny_model_dir, garden_rows))
    assert (result["base"], result["tuned"]) == ("tiny-base:1", "tiny-fern:1")
    tuned = registry.get_version("tiny-fern:1")
    assert tuned["status"] == "ready" and tuned["parents"] == ["tiny-base:1"]
    assert tuned["base_model"] == registry.get_version("tiny-base:1")["base_model"] == str(tiny_model_dir)
    assert tuned["data_hash"] == result["data_hash"] and tuned["hyperparameters"]["sft"]["max_steps"] == 4
    for v in (tuned, registry.get_version("tiny-base:1")):
        assert {"perplexity", "tokens_per_s", "ttft_ms", "peak_rss_mb"} <= set(v["metrics"]), v["version"]
    assert len(registry.get_history("tiny-fern:1")) >= 4
    assert (tunery_home / "artifacts" / "tiny-fern" / "1" / "adapter_model.safetensors").exists()
    keys = ["tiny-fern-prep", "tiny-fern-sft", "tiny-fern-eval", "tiny-base-eval", "tiny-fern-summary"]
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    assert {a.key for a in found} == set(keys)

    # A second run adds a new version of the fine-tune and reuses the registered base.
    pipeline(tiny_config(tmp_path, tiny_model_dir, garden_rows))
    assert [v["version"] for v in registry.list_versions()] == ["tiny-base:1", "tiny-fern:1", "tiny-fern:2"]


def test_failed_training_is_recorded_as_failed_and_leaves_no_artifact(tmp_path, tiny_model_dir, garden_rows,
                                                                       tunery_home):
    cfg, config_dir = load_config(tiny_config(tmp_path, tiny_model_dir, garden_rows, max_length=16))
    base = steps.run_base(cfg, config_dir)
    data = steps.run_prep(cfg, config_dir, base["artifact_path"])
    with pytest.raises(TuneryError, match="cuts off every answer"):
        steps.run_train(cfg, cfg.stages[0], base, data)
    failed = registry.get_version("tiny-fern:1")
    assert failed["status"] == "failed" and "cuts off every answer" in failed["error"]
    assert not (tunery_home / "artifacts" / "tiny-fern" / "1").exists()
    assert not list((tunery_home / "artifacts" / "tiny-fern").glob(".*tmp*"))


def test_eval_refuses_a_version_that_is_not_ready(tmp_path, tiny_model_dir, garden_rows):
    cfg, config_dir = load_config(tiny_config(tmp_path, tiny_model_dir, garden_rows))
    data = steps.run_prep(cfg, config_dir)
    v = registry.get_version(registry.create_version("tiny-fern", "sft"))
    with pytest.raises(TuneryError, match="tiny-fern:1 is running"):
        steps.run_eval(v, data, cfg.eval_config())


def test_bad_data_stops_before_any_version_is_registered(tmp_path, tiny_model_dir, garden_rows):
    path = tiny_config(tmp_path, tiny_model_dir, garden_rows)
    write_jsonl(tmp_path / "garden.jsonl", garden_rows + [chat("Q", "A"), {"messages": [{"role": "user"}]}])
    cfg, config_dir = load_config(path)
    with pytest.raises(TuneryError, match=r"garden.jsonl line 26: field 'messages\[0\].content'"):
        steps.run_prep(cfg, config_dir)
    assert registry.list_versions(name="tiny-fern") == []
