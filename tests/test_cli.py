"""The `tunery` command as a user runs it: one-line errors without tracebacks, JSON shapes, and the whole
pipeline end to end on the packaged SmolLM2-135M-Instruct."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import REPO

import registry

TUNERY = str(Path(os.sys.executable).parent / "tunery")


def tunery(*args: str, home: Path, check_exit: int | None = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "TUNERY_HOME": str(home), "PREFECT_HOME": str(home / "prefect"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([TUNERY, *args], capture_output=True, text=True, env=env, timeout=900)
    if check_exit is not None:
        assert proc.returncode == check_exit, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("args, message", [
    (["show", "fern:3"], "error: unknown version 'fern:3'"),
    (["compare", "fern:1", "fern:2"], "error: unknown version 'fern:1'"),
    (["run", "nope.yaml"], "error: nope.yaml: config file not found"),
    (["eval", "fern:1", "--config", "nope.yaml"], "error: unknown version 'fern:1'"),
    (["export", "fern:9"], "error: unknown version 'fern:9'"),
    (["promote", "fern:9", "--alias", "production"], "error: unknown version 'fern:9'"),
    (["rollback", "fern"], "error: expected NAME@ALIAS, got 'fern'"),
    (["rollback", "fern@production"], "error: fern@production does not exist; `tunery promote` creates it"),
    (["rollback", "../x@production"], "error: invalid model name '../x'"),
])
def test_user_errors_print_one_line_and_exit_1(tunery_home, args, message):
    proc = tunery(*args, home=tunery_home, check_exit=1)
    assert message in proc.stderr and "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("args, message", [
    (["export", "tiny:1", "--quant", "q9"], "error: --quant: unknown quantization 'q9'"),
    (["promote", "tiny:1", "--alias", "v2-q8_0"], "error: --alias: alias 'v2-q8_0' looks like an export tag"),
    (["promote", "tiny:1", "--alias", "a/b"], "error: --alias: invalid alias 'a/b'"),
])
def test_bad_export_options_are_named_before_any_work(tunery_home, tiny_model_dir, args, message):
    version = registry.create_version("tiny", "base")
    registry.finish_version(version, str(tiny_model_dir))
    proc = tunery(*args, home=tunery_home, check_exit=1)
    assert message in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
    assert not (tunery_home / "exports").exists()


def test_bad_config_key_is_named_before_anything_runs(tmp_path, tunery_home):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: fern\ndata: {train: x.jsonl}\nstages: [{stage: sft, learning_rat: 0.1}]\n")
    proc = tunery("run", str(bad), home=tunery_home, check_exit=1)
    assert "unknown key 'stages[0].learning_rat' (did you mean 'learning_rate'?)" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tunery_home / "registry.duckdb").exists()


def test_bad_row_is_named_by_the_cli(tmp_path, tunery_home, tiny_model_dir):
    (tmp_path / "d.jsonl").write_text('{"prompt": "Hi", "completion": "Yo"}\n{"prompt": "Hi"}\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"name": "x", "base_model": str(tiny_model_dir), "data": {"train": "d.jsonl"}}))
    proc = tunery("prep", str(cfg), home=tunery_home, check_exit=1)
    assert "d.jsonl line 2: field 'completion': missing" in proc.stderr and "Traceback" not in proc.stderr


def test_every_unreadable_line_of_a_file_is_named_by_the_cli(tmp_path, tunery_home, tiny_model_dir):
    """Bad encodings and invalid JSON do not stop the scan: each bad line is listed with the row errors, and the
    command ends with exit code 1, no traceback and nothing prepared."""
    good = b'{"prompt": "Hi", "completion": "Yo"}\n'
    (tmp_path / "d.jsonl").write_bytes(good + b'{"prompt": "caf\xe9", "completion": "Yo"}\n' + b'{not json\n'
                                       + good.replace(b"Hi", b"Hey") + b'{"prompt": "Hi"}\n')
    (tmp_path / "e.csv").write_bytes(b"prompt,completion\nHi,Yo\nCaf\xe9,Yo\n")
    for data, expected in (("d.jsonl", ["d.jsonl line 2: not valid UTF-8 (byte 0xe9", "d.jsonl line 3: invalid JSON",
                                        "d.jsonl line 5: field 'completion': missing", "3 bad row(s)"]),
                           ("e.csv", ["e.csv line 3: not valid UTF-8 (byte 0xe9)"])):
        cfg = tmp_path / "c.yaml"
        cfg.write_text(yaml.safe_dump({"name": "x", "base_model": str(tiny_model_dir), "data": {"train": data}}))
        proc = tunery("prep", str(cfg), home=tunery_home, check_exit=1)
        for message in expected:
            assert message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout
        assert not (tunery_home / "datasets").exists() or not any((tunery_home / "datasets").iterdir())
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"name: x\ndata: {train: d.jsonl}\n# caf\xe9\n")
    proc = tunery("run", str(bad), home=tunery_home, check_exit=1)
    assert "bad.yaml line 3: not valid UTF-8 (byte 0xe9)" in proc.stderr and "Traceback" not in proc.stderr


def test_models_show_compare_json_shapes(tunery_home):
    base = registry.create_version("smol", "base")
    registry.finish_version(base, "/m")
    tuned = registry.create_version("fern", "sft", parents=[base], hyperparameters={"sft": {"lr": 0.001}})
    registry.record_metrics(base, {"perplexity": 30.0, "tokens_per_s": 18.0})
    registry.record_metrics(tuned, {"perplexity": 12.0, "tokens_per_s": 17.0})
    listed = json.loads(tunery("models", "--json", home=tunery_home).stdout)
    assert [v["version"] for v in listed] == ["fern:1", "smol:1"]
    shown = json.loads(tunery("show", "fern:1", "--json", home=tunery_home).stdout)
    assert shown["parents"] == ["smol:1"] and shown["metrics"]["perplexity"] == 12.0
    compared = json.loads(tunery("compare", "smol:1", "fern:1", "--json", home=tunery_home).stdout)
    ppl = next(r for r in compared["metrics"] if r["metric"] == "perplexity")
    assert ppl["change"] == -18.0 and ppl["better"] is True
    assert "fern:1" in tunery("models", home=tunery_home).stdout


def write_chat(path: Path) -> None:
    path.write_text("".join(f'{{"prompt": "Question {i}?", "completion": "Answer {i}."}}\n' for i in range(4)))


def test_lineage_prints_the_ancestry_and_json_nests_it(tunery_home):
    base = registry.create_version("smol", "base")
    registry.finish_version(base, "/m")
    sft = registry.create_version("fern", "sft", parents=[base])
    registry.finish_version(sft, "/a")
    dpo = registry.create_version("fern", "dpo", parents=[sft])
    registry.fail_version(dpo, "boom")
    text = tunery("lineage", "fern:2", home=tunery_home).stdout
    assert text.index("fern:2") < text.index("fern:1") < text.index("smol:1") and "failed" in text
    tree = json.loads(tunery("lineage", "fern:2", "--json", home=tunery_home).stdout)
    assert tree["parents"][0]["version"] == "fern:1" and tree["parents"][0]["parents"][0]["version"] == "smol:1"
    proc = tunery("lineage", "fern:9", home=tunery_home, check_exit=1)
    assert "unknown version 'fern:9'" in proc.stderr


def test_dpo_refuses_a_bad_preference_row_by_line_and_registers_nothing(tmp_path, tunery_home, tiny_model_dir):
    write_chat(tmp_path / "chat.jsonl")
    (tmp_path / "prefs.jsonl").write_text(
        '{"prompt": "Best mulch?", "chosen": "Straw.", "rejected": "Plastic."}\n'
        '{"prompt": "Best soil?", "chosen": "Loam."}\n'
        '{"prompt": "Water when?", "chosen": "Morning.", "rejected": "Morning."}\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"name": "x", "base_model": str(tiny_model_dir), "data": {"train": "chat.jsonl"},
                                   "stages": [{"stage": "dpo", "data": {"train": "prefs.jsonl"}}]}))
    proc = tunery("dpo", str(cfg), home=tunery_home, check_exit=1)
    assert "prefs.jsonl line 2: field 'rejected': missing" in proc.stderr
    assert "prefs.jsonl line 3: field 'rejected': identical to chosen" in proc.stderr
    assert "Traceback" not in proc.stderr and registry.list_versions(name="x") == []


def test_single_stage_merge_takes_registered_sources(tmp_path, tunery_home, tiny_model_dir):
    write_chat(tmp_path / "chat.jsonl")
    stages = [{"stage": "sft"}, {"stage": "merge", "method": "slerp", "sources": ["sft", "base"], "t": 0.0}]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"name": "mix", "base_model": str(tiny_model_dir), "base_name": "tiny",
                                   "data": {"train": "chat.jsonl"}, "stages": stages}))
    proc = tunery("merge", str(cfg), home=tunery_home, check_exit=1)
    assert "uses stage 'sft' of this config; a single-stage run needs registered versions" in proc.stderr
    other = registry.create_version("other", "base")
    registry.finish_version(other, str(tiny_model_dir))
    proc = tunery("merge", str(cfg), "--source", "other:1", "--source", "tiny:1", home=tunery_home, check_exit=1)
    assert "cannot merge tiny:1 with other:1: they are the same model" in proc.stderr
    shutil.copytree(tiny_model_dir, tmp_path / "copy")
    other = registry.create_version("other", "base")
    registry.finish_version(other, str(tmp_path / "copy"))
    merged = json.loads(tunery("merge", str(cfg), "--source", "other:2", "--source", "tiny:1", "--json",
                               home=tunery_home).stdout)
    assert merged["version"] == "mix:1" and merged["parents"] == ["other:2", "tiny:1"]
    assert merged["info"]["mergekit_config"]["merge_method"] == "slerp"
    assert (Path(merged["artifact_path"]) / "model.safetensors").exists()


@pytest.mark.e2e
def test_run_on_smollm2_registers_base_and_a_better_fine_tune(tmp_path, tunery_home, smollm2_dir):
    """`tunery run` on the real model with a few steps: both versions land with every metric, perplexity falls."""
    cfg = yaml.safe_load((REPO / "configs/demo.yaml").read_text())
    cfg["base_model"] = str(smollm2_dir)
    cfg["data"]["train"] = str(REPO / "data/demo/garden_chat.jsonl")
    # Enough steps that the fine-tune ends its answers (6 still looped past the gate's answer_tokens).
    cfg["stages"] = [{"stage": "sft", "method": "lora", "max_steps": 14, "batch_size": 8, "max_length": 256,
                      "learning_rate": 2.0e-3, "warmup_ratio": 0.0}]
    # The forgetting check on 8 items of each kind of the packaged suite, one held-out answer per category (the
    # full suite and every answer cost about a minute per evaluation on this model); the judge has its own test.
    suite = [line for f in sorted((REPO / "data/general").glob("*.jsonl")) for line in f.read_text().splitlines()[:8]]
    (tmp_path / "suite.jsonl").write_text("\n".join(suite) + "\n")
    cfg["eval"].update({"prompts": ["When should I plant garlic?"], "max_new_tokens": 8, "repeats": 1,
                        "general": str(tmp_path / "suite.jsonl"), "generation_rows": 1, "answer_tokens": 48,
                        "judge": None})
    cfg["promote"]["max_general_drop_pct"] = 50  # 24 items: one item is 4 points
    (tmp_path / "e2e.yaml").write_text(yaml.safe_dump(cfg))
    run = tunery("run", str(tmp_path / "e2e.yaml"), "--json", home=tunery_home)
    summary = json.loads(run.stdout)
    assert (summary["base"], summary["tuned"]) == ("SmolLM2-135M-Instruct:1", "fern:1")
    versions = {v["version"]: v for v in json.loads(tunery("models", "--json", home=tunery_home).stdout)}
    base, tuned = versions["SmolLM2-135M-Instruct:1"], versions["fern:1"]
    for v in (base, tuned):
        assert v["status"] == "ready"
        assert {"perplexity", "tokens_per_s", "ttft_ms", "peak_rss_mb"} <= set(v["metrics"])
    assert tuned["parents"] == [base["version"]] and tuned["data_hash"] == summary["data_hash"]
    assert tuned["metrics"]["perplexity"] < base["metrics"]["perplexity"]
    assert tuned["metrics"]["train_loss"] < tuned["metrics"]["train_loss_first"]
    # What a user decides with: per-category numbers, cost, both latency forms, health, pre-flight, samples.
    m = tuned["metrics"]
    categories = [k.split("/", 1)[1] for k in m if k.startswith("perplexity/")]
    assert categories and all(f"gen_tokens/{c}" in m for c in categories)
    assert {"cost_per_mtok_usd", "tokens_per_s_adapter", "ttft_ms_adapter", "estimate_train_time_s",
            "train_time_vs_estimate", "health_warnings"} <= set(m)
    assert set(tuned["info"]["health"]) == {"loss", "grad_norm", "learning_rate", "memory"}
    # Answer scores against the held-out references and the forgetting check against the base.
    assert m["answer_rows"] == len(categories) and all(f"answer_f1/{c}" in m for c in categories)
    assert m["general_items"] == 24 and m["general_accuracy_parent"] == base["metrics"]["general_accuracy"]
    assert m["general_drop_pct"] == pytest.approx(100 * (base["metrics"]["general_accuracy"] - m["general_accuracy"]))
    assert tuned["samples"] and all("<|im_" not in s["answer"] for s in tuned["samples"])
    shown = tunery("show", "fern:1", home=tunery_home).stdout
    assert "training health" in shown and "sample answers" in shown and "cost_per_mtok_usd" in shown
    # The demo config ends by promoting the best version: a Q4_K_M GGUF + Modelfile checked with llama.cpp.
    promotion = summary["promotion"]
    assert promotion["version"] == "fern:1" and promotion["alias"] == "fern@production"
    checks = {c["name"]: c for c in promotion["export"]["checks"]}
    for name in ("modelfile", "loads", "tokenization", "greedy", "template"):
        assert checks[name]["passed"], checks[name]
    # The promotion must pass the gate's own limits (the demo config's `promote:`), each verdict checked here.
    gate = cfg["promote"]
    verdicts = {v["name"]: v for v in promotion["gate"]}
    assert promotion["promoted"] is True and all(v["passed"] for v in promotion["gate"]), promotion["gate"]
    assert checks["mean_kl"]["value"] <= gate["max_mean_kl"] and verdicts["mean_kl"]["threshold"] == gate["max_mean_kl"]
    assert checks["decode_tokens_per_s"]["value"] >= gate["min_decode_tokens_per_s"]
    assert checks["answers_stop"]["passed"], checks["answers_stop"]
    # What the exported file answers: held-out answers scored and the suite scored through llama.cpp, gated.
    assert "held-out answers: token F1" in checks["heldout_answers"]["detail"]
    assert 0 <= checks["general"]["value"] <= 1 and "on 24 items" in checks["general"]["detail"]
    assert verdicts["general_drop_pct"]["value"] == pytest.approx(checks["general_drop_pct"]["value"])
    exported = registry.get_version("fern:1").metrics
    assert exported["gguf_general_accuracy"] == checks["general"]["value"]
    assert exported["gguf_answer_f1"] == pytest.approx(checks["heldout_answers"]["value"])
    assert {f"check {n}" for n in ("modelfile", "loads", "tokenization", "greedy", "template", "answers_stop")} <= \
        set(verdicts)
    folder = tunery_home / "exports" / "fern" / "v1-q4_k_m"
    assert (folder / "fern-v1-q4_k_m.gguf").exists() and (folder / "Modelfile").exists()
    assert "PARAMETER stop <|im_end|>" in (folder / "Modelfile").read_text()
    history = registry.exports.promotion_history("fern", "production")
    assert [h.action for h in history] == ["promote"]
    shown = json.loads(tunery("show", "fern:1", "--json", home=tunery_home).stdout)
    assert shown["exports"][0]["export_id"] == "fern/v1-q4_k_m"
    assert shown["aliases"] == ["fern@production"]
    assert (tunery_home / "exports/fern/production").resolve() == folder.resolve()
