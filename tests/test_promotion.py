"""Promotion (issue 5): the gate compares the candidate's GGUF with the alias holder's on the same tokens and
refuses a worse one without moving anything; rollback restores the previous export; every decision is a row."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import registry
from core.errors import TuneryError
from flows import promotion
from registry import exports as export_store
from tasks.evaluate.evaluation import EvalConfig
from tasks.export.settings import ExportConfig, GateConfig

EXPORT = ExportConfig(quant="f32", heldout_rows=4, max_new_tokens=8, answer_tokens=8, window=256, answer_rows=2)
# A random tiny model never ends its answers, and its decode speed says nothing: gate on what it can pass.
GATE = GateConfig(require_checks=["modelfile", "loads", "tokenization", "template", "greedy"],
                  min_decode_tokens_per_s=0.0, max_mean_kl=0.01)
PROMPTS = ["How often should I water basil?"]
# What the exported file answers is measured (held-out answers, the general suite) in the tests that gate on it.
EVALS = EvalConfig(prompts=PROMPTS, general=None, answer_tokens=8)


def _register(folder: Path) -> str:
    version = registry.create_version("tiny", "base")
    registry.finish_version(version, str(folder))
    return version


def _noisy_copy(src: Path, dst: Path, scale: float) -> Path:
    """The tiny model with every matrix perturbed: a worse model of the same family."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    generator = torch.Generator().manual_seed(1)
    noisy = {k: (v + scale * torch.randn(v.shape, generator=generator) if v.ndim == 2 else v).contiguous()
             for k, v in weights.items()}
    save_file(noisy, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _quiet(_: str) -> None:
    pass


def _link(tunery_home: Path) -> Path:
    return (tunery_home / "exports" / "tiny" / "production").resolve()


def test_gate_refuses_worse_perplexity_and_leaves_the_alias(tiny_model_dir, tmp_path, prepared, tunery_home):
    good = _register(tiny_model_dir)
    worse = _register(_noisy_copy(tiny_model_dir, tmp_path / "noisy", 0.5))
    first = promotion.promote(good, prepared, EXPORT, GATE, PROMPTS, progress=_quiet, evals=EVALS)
    assert first["promoted"] and first["previous"] is None
    assert _link(tunery_home).name == "v1-f32"
    modelfile = (tunery_home / "exports/tiny/production/Modelfile").read_text()
    assert modelfile.startswith("FROM ./tiny-v1-f32.gguf\n") and "PARAMETER stop <|im_end|>" in modelfile

    second = promotion.promote(worse, prepared, EXPORT, GATE, PROMPTS, progress=_quiet, evals=EVALS)
    assert not second["promoted"]
    failed = [v for v in second["gate"] if not v["passed"]]
    assert [v["name"] for v in failed] == ["perplexity_vs_holder"], second["gate"]
    assert failed[0]["value"] > failed[0]["threshold"]
    assert "stays on tiny:1" in promotion.refused_message(second)
    # Nothing moved: alias row, link, and the holder's export are as they were; the refusal is recorded.
    assert export_store.get_alias("tiny", "production").version == "tiny:1"
    assert _link(tunery_home).name == "v1-f32"
    history = export_store.promotion_history("tiny", "production")
    assert [(h.action, h.version) for h in history] == [("promote", "tiny:1"), ("refused", "tiny:2")]
    assert history[1].gate["verdicts"] == second["gate"]
    # The refused candidate's export and its checks are still on record.
    refused = export_store.get_export("tiny/v2-f32")
    assert {"loads", "tokenization", "greedy", "template", "mean_kl", "perplexity"} <= {
        c.name for c in refused.checks}


def test_rollback_restores_the_previous_export(tiny_model_dir, tmp_path, prepared, tunery_home):
    first = _register(tiny_model_dir)
    same = _register(_noisy_copy(tiny_model_dir, tmp_path / "copy", 0.0))
    assert promotion.promote(first, prepared, EXPORT, GATE, PROMPTS, progress=_quiet, evals=EVALS)["promoted"]
    assert promotion.promote(same, prepared, EXPORT, GATE, PROMPTS, progress=_quiet, evals=EVALS)["promoted"]
    assert _link(tunery_home).name == "v2-f32"

    back = promotion.rollback("tiny@production")
    assert (back["version"], back["previous"]) == ("tiny:1", "tiny:2")
    assert back["ollama"] == "not run: no ollama executable on PATH"
    assert export_store.get_alias("tiny", "production").export_id == "tiny/v1-f32"
    assert _link(tunery_home).name == "v1-f32"
    assert (tunery_home / "exports/tiny/production/tiny-v1-f32.gguf").exists()
    actions = [(h.action, h.version) for h in export_store.promotion_history("tiny", "production")]
    assert actions == [("promote", "tiny:1"), ("promote", "tiny:2"), ("rollback", "tiny:1")]
    with pytest.raises(TuneryError, match=r"tiny@production has no earlier holder to roll back to \(it holds tiny:1\)"):
        promotion.rollback("tiny@production")
    # Both exports stay on disk: a rollback never deletes what was recorded.
    assert (tunery_home / "exports/tiny/v2-f32/tiny-v2-f32.gguf").exists()


def test_failed_export_leaves_no_folder_and_no_row(tiny_model_dir, tmp_path, prepared, tunery_home):
    import json

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchForCausalLM"]}))
    version = _register(broken)
    with pytest.raises(TuneryError, match="llama.cpp cannot convert this model"):
        promotion.promote(version, prepared, EXPORT, GATE, PROMPTS, progress=_quiet, evals=EVALS)
    assert export_store.list_exports() == [] and export_store.promotion_history() == []
    assert not list((tunery_home / "exports").rglob("*.gguf"))


def test_holder_from_another_base_model_is_not_compared(tiny_model_dir, prepared):
    first = _register(tiny_model_dir)
    other = registry.create_version("tiny", "base", base_model="another-base")
    registry.finish_version(other, str(tiny_model_dir))
    assert promotion.promote(first, prepared, EXPORT, GATE, PROMPTS, progress=_quiet, evals=EVALS)["promoted"]
    result = promotion.promote(other, prepared, EXPORT, GATE, PROMPTS, progress=_quiet, evals=EVALS)
    failed = [v for v in result["gate"] if not v["passed"]]
    assert [v["name"] for v in failed] == ["perplexity_vs_holder"]
    assert "not comparable" in failed[0]["detail"]
    assert export_store.get_alias("tiny", "production").version == "tiny:1"


def test_checks_with_nothing_to_check_are_not_run_and_the_gate_refuses_them(prepared):
    """0 of 0 prompts compared or answered is "not run" (passed None), never a pass; the gate counts it as failed;
    and an eval section without prompts is refused before anything runs."""
    from pydantic import ValidationError

    from registry.records import Check, Export
    from tasks.evaluate.evaluation import EvalConfig
    from tasks.export import verify

    greedy = verify.check_greedy(None, None, None, [], 8, set())
    answers, speed, samples = verify.check_answers(None, "", [], [], None, 8)
    assert (greedy["passed"], answers["passed"], samples) == (None, None, [])
    assert "not run" in greedy["detail"] and "not run" in answers["detail"]
    candidate = Export(export_id="x/v1-f32", version="x:1", quant="f32", path=".", gguf_file="x.gguf", size_bytes=0,
                       sha256="", modelfile="", passed=False, info={},
                       checks=tuple(Check(**c, file="x.gguf") for c in (greedy, answers, speed)))
    gate = GateConfig(require_checks=["greedy", "answers_stop"])
    verdicts = {v["name"]: v for v in promotion.gate(candidate, None, prepared, gate)}
    assert not verdicts["check greedy"]["passed"] and not verdicts["check answers_stop"]["passed"]
    with pytest.raises(ValidationError, match="prompts"):
        EvalConfig(prompts=[])


def _snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    import hashlib

    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.iterdir())}


def test_re_export_is_a_new_export_and_a_refused_gate_touches_nothing(tiny_model_dir, prepared, tunery_home):
    """Exports are immutable: exporting or promoting the same version and quant again writes vN-QUANT-2 and keeps
    every file and row of vN-QUANT, which the alias still points to when the gate refuses the new one."""
    version = _register(tiny_model_dir)
    first = promotion.promote(version, prepared, EXPORT, GATE, PROMPTS, progress=_quiet, evals=EVALS)
    assert first["promoted"] and first["export"].export_id == "tiny/v1-f32"
    folder = tunery_home / "exports/tiny/v1-f32"
    before, rows_before = _snapshot(folder), export_store.get_export("tiny/v1-f32")

    again = promotion.export_version(version, prepared, EXPORT, PROMPTS, progress=_quiet, evals=EVALS)
    assert again.export_id == "tiny/v1-f32-2" and again.path.endswith("exports/tiny/v1-f32-2")
    assert (tunery_home / "exports/tiny/v1-f32-2" / again.gguf_file).exists()
    assert _snapshot(folder) == before and export_store.get_export("tiny/v1-f32") == rows_before

    # A gate that cannot pass (the random model's answers never stop): refused, and nothing of the holder moves.
    strict = GATE.model_copy(update={"require_checks": [*GATE.require_checks, "answers_stop"]})
    link = tunery_home / "exports/tiny/production"
    link_before = (link.readlink(), link.lstat().st_mtime_ns)
    refused = promotion.promote(version, prepared, EXPORT, strict, PROMPTS, progress=_quiet, evals=EVALS)
    assert not refused["promoted"] and refused["export"].export_id == "tiny/v1-f32-3"
    assert (link.readlink(), link.lstat().st_mtime_ns) == link_before
    assert export_store.get_alias("tiny", "production").export_id == "tiny/v1-f32"
    assert _snapshot(folder) == before and export_store.get_export("tiny/v1-f32") == rows_before
    assert [e.export_id for e in export_store.list_exports()] == ["tiny/v1-f32", "tiny/v1-f32-2", "tiny/v1-f32-3"]


def test_an_existing_folder_is_never_replaced(tmp_path):
    from core.home import atomic_dir

    final = tmp_path / "v1-f32"
    final.mkdir()
    (final / "model.gguf").write_text("recorded")
    with pytest.raises(TuneryError, match="already exists; tunery never replaces"):
        with atomic_dir(final) as tmp:
            (tmp / "model.gguf").write_text("new")
    assert (final / "model.gguf").read_text() == "recorded" and [p.name for p in tmp_path.iterdir()] == ["v1-f32"]


def test_the_gate_refuses_checks_measured_on_other_data(prepared):
    from dataclasses import replace

    from registry.records import Export

    candidate = Export(export_id="tiny/v1-f32", version="tiny:1", quant="f32", path=".", gguf_file="x.gguf",
                       size_bytes=0, sha256="", modelfile="", passed=True, info={"eval_data_hash": "0" * 64})
    verdicts = {v["name"]: v for v in promotion.gate(candidate, None, prepared, GateConfig(require_checks=[]))}
    assert verdicts["eval data"]["passed"] is False and "other data" in verdicts["eval data"]["detail"]
    matching = replace(candidate, info={"eval_data_hash": prepared.info["data_hash"]})
    assert "eval data" not in {v["name"] for v in promotion.gate(matching, None, prepared, GateConfig())}


def test_a_num_ctx_that_cannot_hold_the_prompts_is_refused_by_name(tiny_model_dir, prepared, tunery_home):
    """Ollama cuts a prompt longer than num_ctx from the front, silently, system prompt first: the export's context
    check measures the longest eval prompt as Ollama renders it, and the gate refuses a num_ctx too small for it."""
    version = _register(tiny_model_dir)
    system = "You are Fern, a patient gardening assistant who answers in short, practical sentences. " * 3
    tight = EXPORT.model_copy(update={"system": system, "num_ctx": 64})
    gate = GATE.model_copy(update={"require_checks": [*GATE.require_checks, "context"]})
    refused = promotion.promote(version, prepared, tight, gate, PROMPTS, progress=_quiet, evals=EVALS)
    context = refused["export"].check("context").json()
    assert not refused["promoted"] and context["passed"] is False and context["value"] > 64
    assert "num_ctx 64" in context["detail"] and "system prompt first" in context["detail"]
    failed = [v for v in refused["gate"] if not v["passed"]]
    assert [v["name"] for v in failed] == ["check context"]
    roomy = promotion.promote(version, prepared, tight.model_copy(update={"num_ctx": 512}), gate, PROMPTS,
                              progress=_quiet)
    context = roomy["export"].check("context").json()
    assert roomy["promoted"] and context["passed"] and context["value"] == refused["export"].check("context").value
    assert GateConfig().require_checks[-1] == "context"  # on by default


def test_the_gate_refuses_an_export_that_forgot_what_its_parent_knew(tiny_model_dir, prepared, tmp_path):
    """The forgetting check in the gate: the exported file is scored on the general suite through llama.cpp and
    compared with its parent's accuracy (transformers, measured on the same data); more points lost than
    `max_general_drop_pct` refuse it by name. Held-out answers through llama.cpp are scored and gated too."""
    from conftest import REPO

    suite = [line for f in sorted((REPO / "data/general").glob("*.jsonl")) for line in f.read_text().splitlines()[:4]]
    (tmp_path / "suite.jsonl").write_text("\n".join(suite) + "\n")
    evals = EvalConfig(prompts=PROMPTS, general=str(tmp_path / "suite.jsonl"), answer_tokens=8)
    parent = _register(tiny_model_dir)
    registry.record_metrics(parent, {"general_accuracy": 1.0}, eval_data_hash=prepared.info["data_hash"])
    child = registry.create_version("tiny", "sft", parents=[parent])
    registry.finish_version(child, str(tiny_model_dir))
    gate = GATE.model_copy(update={"max_general_drop_pct": 5.0, "min_answer_f1": 0.99})
    refused = promotion.promote(child, prepared, EXPORT, gate, PROMPTS, progress=_quiet, evals=evals)
    assert not refused["promoted"]
    checks = {c.name: c.json() for c in refused["export"].checks}
    verdicts = {v["name"]: v for v in refused["gate"]}
    accuracy = checks["general"]["value"]
    assert checks["general"]["detail"].startswith(f"{accuracy:.3f} on 12 items") and accuracy < 0.95
    assert verdicts["general_drop_pct"]["value"] == pytest.approx(100 * (1.0 - accuracy))
    assert not verdicts["general_drop_pct"]["passed"] and verdicts["general_drop_pct"]["threshold"] == 5.0
    assert f"against {parent}'s 1.000 (transformers)" in checks["general_drop_pct"]["detail"]
    # The random model's two held-out answers share little with the references: refused on F1 too.
    assert checks["heldout_answers"]["detail"].startswith("2 held-out answers: token F1")
    assert not verdicts["answer_f1"]["passed"] and verdicts["answer_f1"]["value"] < 0.99
    measured = registry.get_version(child, prepared.info["data_hash"]).metrics
    assert measured["gguf_general_accuracy"] == accuracy and measured["gguf_general_drop_pct"] > 5
    assert len(registry.get_answers(child, refused["export"].export_id)) == 2
    assert export_store.get_alias("tiny", "production") is None  # nothing moved
