"""Stages distill-prompt and distill-model on the tiny model: the generated datasets keep the teacher's answers
verbatim with the system prompt dropped or shortened as configured, the recorded prompt-token saving is the token
count difference, and each stage registers a version with the teacher as a parent and the distillation metrics."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import write_jsonl

import registry
from core.errors import TuneryError
from flows import inputs, plan, run
from flows.config import BASE_REF, load_config
from tasks.data.prep import load_prepared
from tasks.models import conversation, load_model, load_tokenizer, prompt_ids, repeated_ngram_ends
from tasks.stages.distill.settings import (Answer, DistillModelConfig, DistillPromptConfig, distill_rows,
                                           prompt_tokens_saved, settle, teacher_contexts)
from tasks.stages.distill.teacher import gguf_teacher_answers, make_dataset, teacher_answers, teacher_gguf

PERSONA = ("You are Fern, a friendly gardening helper. Answer in two short sentences, mention the season when it "
           "matters, and end with 'Happy growing!'. Never recommend chemical pesticides.")
PROMPTS = ["How often should I water basil?", "When do I plant garlic?", "Why are my tomato leaves yellow?"]
# The tiny teacher's 12-token answers rarely reach a sentence end, so cut answers are kept as they are here.
FAST = {"max_steps": 3, "batch_size": 4, "learning_rate": 5e-3, "max_length": 160, "max_new_tokens": 12,
        "unfinished": "keep"}


@pytest.fixture(scope="module")
def chatty(tiny_model_dir, tmp_path_factory):
    """The tiny model fully fine-tuned for a few steps on the demo's answers: a random model only says newlines,
    this one answers in (garbled) gardening text."""
    import json

    from conftest import REPO

    from tasks.data.prep import PrepConfig, prepare
    from tasks.stages.sft import SftConfig, train_sft

    folder = tmp_path_factory.mktemp("garden")
    (folder / "garden.jsonl").write_text((REPO / "data/demo/garden_chat.jsonl").read_text())
    data = prepare(PrepConfig(train=["garden.jsonl"]), folder, str(tiny_model_dir))
    out = tmp_path_factory.mktemp("chatty")
    train_sft(SftConfig(method="full", max_steps=30, batch_size=8, learning_rate=1e-2, max_length=160,
                        warmup_ratio=0.0), str(tiny_model_dir), data.artifact_path, out, "cpu")
    return out


def test_batched_teacher_answers_equal_one_at_a_time_greedy(chatty):
    import torch

    model, tok = load_model(str(chatty)), load_tokenizer(str(chatty))
    contexts = [conversation(PERSONA, p) for p in PROMPTS]
    batched = teacher_answers(model, tok, contexts, max_new_tokens=12, batch_size=3)
    for context, answer in zip(contexts, batched):
        ids = torch.tensor([prompt_ids(tok, context)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=12, do_sample=False,
                                 pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        stop = {tok.eos_token_id, *tok.convert_tokens_to_ids(tok.all_special_tokens)}
        end = next((i for i, t in enumerate(out.tolist()) if t in stop), len(out))
        assert answer.text and answer.text == tok.decode(out[:end], skip_special_tokens=True).strip()
        assert answer.finished == (end < len(out))


def test_llama_cpp_teacher_answers_equal_hf_on_an_f32_export(chatty, tmp_path, monkeypatch):
    from llama_cpp import Llama

    from tasks.export.convert import write_gguf

    gguf = write_gguf(chatty, tmp_path / "tiny.gguf", "f32")
    model, tok = load_model(str(chatty)), load_tokenizer(str(chatty))
    contexts = [conversation(PERSONA, p) for p in PROMPTS]
    evaluated = []
    real_eval = Llama.eval
    monkeypatch.setattr(Llama, "eval", lambda self, tokens: evaluated.append(len(tokens)) or real_eval(self, tokens))
    for no_repeat in (0, 2):
        hf = teacher_answers(model, tok, contexts, 10, no_repeat_ngram=no_repeat)
        evaluated.clear()
        assert all(a.text for a in hf) and gguf_teacher_answers(gguf, tok, contexts, 10, no_repeat) == hf
        # The persona's tokens are evaluated for the first request only; later ones evaluate their own question.
        prompts = [evaluated[i] for i, n in enumerate(evaluated) if n > 1]
        persona = len(prompt_ids(tok, conversation(PERSONA, "x"))) - 8
        assert len(prompts) == len(contexts) and prompts[0] > persona and max(prompts[1:]) < persona


def test_no_repeat_bans_only_tokens_that_would_repeat_an_ngram_of_the_answer(chatty):
    assert repeated_ngram_ends([5, 6, 7, 5, 6], 3) == {7}
    assert repeated_ngram_ends([5, 6, 5], 2) == {6}
    assert repeated_ngram_ends([5, 6, 7], 3) == set() and repeated_ngram_ends([5, 5, 5], 0) == set()
    model, tok = load_model(str(chatty)), load_tokenizer(str(chatty))
    contexts = [conversation(PERSONA, p) for p in PROMPTS]
    for answer, _ in teacher_answers(model, tok, contexts, 40, no_repeat_ngram=3):
        ids = tok(answer)["input_ids"]
        grams = [tuple(ids[i:i + 3]) for i in range(len(ids) - 2)]
        # Re-tokenizing the text may merge tokens differently, so allow the odd seam; loops are gone.
        assert len(set(grams)) >= len(grams) - 2, answer


def test_rows_keep_answers_verbatim_and_empty_answers_are_dropped():
    contexts = [conversation("You are Fern.", p) for p in PROMPTS]
    answers = ["Water it  twice a week.\nHappy growing!", "In autumn. Happy growing!", ""]
    rows = distill_rows(contexts, answers)
    assert [r["messages"][-1]["content"] for r in rows] == answers[:2]
    assert [r["messages"][:-1] for r in rows] == contexts[:2]
    with pytest.raises(TuneryError, match="3 prompts but 2 teacher answers"):
        distill_rows(contexts, answers[:2])


def test_prompt_token_saving_is_the_token_count_difference(chatty):
    tok = load_tokenizer(str(chatty))
    context = [{"role": "system", "content": "whatever the data said"}, {"role": "user", "content": PROMPTS[0]}]
    shot = {"user": "Mulch?", "assistant": "Yes, in May. Happy growing!"}
    config = DistillPromptConfig(system=PERSONA, examples=[shot])
    teacher = teacher_contexts(config, [context])[0]
    assert teacher == [{"role": "system", "content": PERSONA}, {"role": "user", "content": "Mulch?"},
                       {"role": "assistant", "content": shot["assistant"]}, context[1]]
    long_ids = tok.apply_chat_template(teacher, add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"]
    short_ids = tok.apply_chat_template(context[1:], add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"]
    saved = prompt_tokens_saved(tok, config, context)
    assert saved == len(long_ids) - len(short_ids) > len(tok(PERSONA + shot["assistant"])["input_ids"])
    shorter = DistillPromptConfig(system=PERSONA, student_system="You are Fern.")
    assert prompt_tokens_saved(tok, shorter, context) == (
        len(prompt_ids(tok, conversation(PERSONA, PROMPTS[0]))) - len(prompt_ids(tok, conversation("You are Fern.",
                                                                                               PROMPTS[0]))))


@pytest.mark.parametrize("student_system", [None, "You are Fern."])
def test_generated_dataset_keeps_teacher_answers_and_swaps_the_system_prompt(chatty, student_system):
    cfg = DistillPromptConfig(system=PERSONA, student_system=student_system, prompts=PROMPTS * 2 + ["Mulch?"],
                              max_new_tokens=10, unfinished="keep")
    model, tok = load_model(str(chatty)), load_tokenizer(str(chatty))
    train = [conversation("data's own system", p) for p in PROMPTS]
    held = [conversation(None, "Mulch?")]
    result = make_dataset(cfg, str(chatty), None, (train, held), str(chatty), "cpu")
    _, train_rows, held_rows = load_prepared(result.artifact_path)
    expected = teacher_answers(model, tok, [conversation(PERSONA, p) for p in PROMPTS + ["Mulch?"]], 10,
                               no_repeat_ngram=cfg.no_repeat_ngram)
    kept = [a.text for a in expected]
    assert all(kept) and [r["messages"][-1]["content"] for r in train_rows + held_rows] == kept  # verbatim, in order
    prompts = [p for p, k in zip(PROMPTS + ["Mulch?"], kept) if k]
    assert [r["messages"][:-1] for r in train_rows + held_rows] == [conversation(student_system, p) for p in prompts]
    assert result.info["teacher_backend"] == "hf" and result.info["answers"] == 4
    assert result.info["dropped_answers"] == 0
    assert result.info["unfinished_answers"] == sum(not a.finished for a in expected)


def test_cut_answers_are_trimmed_to_their_last_sentence_kept_or_dropped():
    cut = Answer("Water it twice a week. Mulch in May! Then the roots", finished=False)
    assert settle(cut, "trim") == "Water it twice a week. Mulch in May!"
    assert settle(cut, "keep") == cut.text and settle(cut, "drop") == ""
    assert settle(Answer("No sentence end here", False), "trim") == ""
    assert settle(Answer("Done. Really", True), "drop") == "Done. Really"  # finished answers stay verbatim
    assert settle(Answer('He said "stop." And then', False), "trim") == 'He said "stop."'
    assert settle(Answer("First line\nsecond", False), "trim") == "First line"


def _config(tmp_path, chatty, garden_rows, stages, **top) -> str:
    write_jsonl(tmp_path / "garden.jsonl", garden_rows)
    doc = {"name": "tiny-fern", "base_model": str(chatty), "base_name": "tiny-base", "device": "cpu",
           "data": {"train": "garden.jsonl", "val_fraction": 0.2}, "stages": stages, **top}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(doc))
    return str(tmp_path / "pipeline.yaml")


def _run(config: str, index: int = 0) -> dict:
    cfg, config_dir = load_config(config)
    base = inputs.run_base(cfg, config_dir)
    data = inputs.run_prep(cfg, config_dir, base.artifact_path)
    return run.run_stage(cfg, index, {BASE_REF: base}, base, data, config_dir)


def test_distill_prompt_registers_the_student_with_the_teacher_as_parent(tmp_path, chatty, garden_rows):
    config = _config(tmp_path, chatty, garden_rows, [{"stage": "distill-prompt", "system": PERSONA, **FAST}])
    version = _run(config)
    assert version.status == "ready" and version.stage == "distill-prompt"
    assert version.parents == ["tiny-base:1"] and version.hyperparameters["teacher"] == "tiny-base:1"
    m = version.metrics
    # Held-out rows are the data's own held-out prompts, answered by the teacher.
    _, train, held = load_prepared(version.info["dataset"])
    assert m["distill_heldout_answers"] == len(held) == 5 and m["distill_train_answers"] == len(train)
    tok = load_tokenizer(str(chatty))
    contexts = [r["messages"][:-1] for r in train + held]
    assert all(c[0]["role"] == "user" for c in contexts)  # the persona is gone from the student's rows
    long = [len(prompt_ids(tok, conversation(PERSONA, c[-1]["content"]))) for c in contexts]
    short = [len(prompt_ids(tok, c)) for c in contexts]
    assert m["distill_prompt_tokens_saved"] == pytest.approx(sum(long) / len(long) - sum(short) / len(short))
    assert m["distill_prompt_tokens_saved"] > len(tok(PERSONA)["input_ids"])
    for key in ("distill_perplexity_teacher", "distill_perplexity_start", "distill_perplexity_student",
                "distill_ttft_ms_teacher", "distill_ttft_ms_student", "distill_gap_closed", "train_loss"):
        assert key in m, key
    # The student was trained on the answers it is measured on the held-out counterparts of: it moved towards them.
    assert m["distill_perplexity_student"] < m["distill_perplexity_start"]
    assert version.info["teacher_backend"] == "hf"


def test_distill_model_learns_from_a_local_teacher_and_feeds_dpo_pairs(tmp_path, chatty, garden_rows):
    """The teacher is a local folder (registered on first use); the pairs it writes train a later dpo stage."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(chatty, tmp_path / "teacher")  # another model: the same one with noise on its MLPs
    weights = load_file(str(tmp_path / "teacher" / "model.safetensors"))
    torch.manual_seed(1)
    for name in [n for n in weights if "mlp" in n]:
        weights[name] += torch.randn_like(weights[name])
    save_file(weights, str(tmp_path / "teacher" / "model.safetensors"), metadata={"format": "pt"})
    stages = [{"stage": "distill-model", "id": "student", "teacher": "./teacher", "preference_pairs": True, **FAST},
              {"stage": "dpo", "pairs_from": "student", "max_steps": 2, "batch_size": 4, "max_length": 160}]
    config = _config(tmp_path, chatty, garden_rows, stages)
    cfg, config_dir = load_config(config)
    base = inputs.run_base(cfg, config_dir)
    data = inputs.run_prep(cfg, config_dir, base.artifact_path)
    student = run.run_stage(cfg, 0, {BASE_REF: base}, base, data, config_dir)
    teacher = next(v for v in registry.list_versions(name="teacher"))
    assert teacher.stage == "base" and teacher.artifact_path == str(tmp_path / "teacher")
    assert student.parents == ["tiny-base:1", teacher.version]
    m = student.metrics
    for key in ("distill_perplexity_teacher", "distill_perplexity_student", "distill_tokens_per_s_teacher",
                "distill_tokens_per_s_student", "distill_speedup", "distill_params_teacher", "distill_params_student"):
        assert key in m, key
    # Measured on the teacher's answers to the held-out prompts, the student moved towards its teacher.
    assert m["distill_perplexity_student"] < m["distill_perplexity_start"], m
    assert m["distill_heldout_answers"] == len(load_prepared(student.info["dataset"])[2]) > 0
    pairs = student.preference_pairs
    meta, train_pairs, _ = load_prepared(pairs)
    assert meta["kind"] == "preference" and train_pairs
    dpo = run.run_stage(cfg, 1, {BASE_REF: base, "student": student}, student, data, config_dir)
    assert dpo.data_hash == meta["data_hash"] and dpo.parents == [student.version]


def test_bad_distill_settings_are_named(tmp_path, chatty, garden_rows):
    config = _config(tmp_path, chatty, garden_rows,
                     [{"stage": "distill-prompt", "system": "short", "student_system": "much longer than that"}])
    with pytest.raises(TuneryError, match=r"stages\[0\].*student_system must be shorter than system"):
        load_config(config)
    config = _config(tmp_path, chatty, garden_rows, [{"stage": "distill-model", "teacher": "./nowhere"}])
    with pytest.raises(TuneryError, match="teacher ./nowhere: no such model folder"):
        _run(config)
    assert registry.list_versions(name="tiny-fern") == []
    config = _config(tmp_path, chatty, garden_rows, [{"stage": "distill-model", "teacher": "base",
                                                              "teacher_backend": "llama.cpp"}])
    with pytest.raises(TuneryError, match="tiny-base:1 has no GGUF export"):
        _run(config)
    assert registry.list_versions(name="tiny-fern") == []


def test_cli_distill_prompt_prints_the_closing_table(tmp_path, chatty, garden_rows, tunery_home):
    from test_cli import tunery

    config = _config(tmp_path, chatty, garden_rows, [{"stage": "distill-prompt", "system": PERSONA, **FAST}])
    proc = tunery("distill-prompt", config, home=tunery_home)
    assert "registered tiny-fern:1 (distill-prompt, parents tiny-base:1)" in proc.stdout
    for row in ("prompt tokens per request", "time to first token (ms)", "perplexity of held-out teacher answers"):
        assert row in proc.stdout, proc.stdout
    shown = json.loads(tunery("show", "tiny-fern:1", "--json", home=tunery_home).stdout)
    saved = shown["metrics"]["distill_prompt_tokens_saved"]
    assert f"-{saved:.0f}" in proc.stdout and saved > 30


@pytest.mark.e2e
def test_demo_persona_on_smollm2_is_learned_without_its_prompt(tmp_path, smollm2_dir):
    """The demo's distill-prompt stage on the real model, shortened: the teacher follows the few-shot persona, the
    saving is the persona's tokens, and the student moves towards the teacher's held-out answers."""
    from conftest import REPO

    from tasks.data.prep import load_prepared

    cfg = yaml.safe_load((REPO / "configs/demo.yaml").read_text())
    stage = cfg["stages"][0]
    stage.update({"max_new_tokens": 48, "max_steps": 8, "warmup_ratio": 0.0})
    cfg.update({"base_model": str(smollm2_dir), "stages": [stage]})
    cfg["data"].update({"train": str(REPO / "data/demo/garden_chat.jsonl"), "max_rows": 32})
    (tmp_path / "e2e.yaml").write_text(yaml.safe_dump(cfg))
    version = _run(str(tmp_path / "e2e.yaml"))
    m = version.metrics
    _, train, held = load_prepared(version.info["dataset"])
    answers = [r["messages"][-1]["content"] for r in train + held]
    assert sum(a.startswith("Fern here!") for a in answers) >= 0.8 * len(answers), answers[:3]
    tok = load_tokenizer(str(smollm2_dir))
    config = load_config(tmp_path / "e2e.yaml")[0].stages[0]
    user = [{"role": "user", "content": "Any question?"}]
    persona = len(prompt_ids(tok, teacher_contexts(config, [user])[0])) - len(prompt_ids(tok, user))
    assert m["distill_prompt_tokens_saved"] == pytest.approx(persona) and persona > 400
    assert m["distill_perplexity_student"] < m["distill_perplexity_start"]
    assert m["distill_perplexity_teacher"] < m["distill_perplexity_start"]  # the persona changes what it says


def test_dpo_pairs_from_a_stage_without_pairs_is_named(tmp_path, chatty, garden_rows):
    stages = [{"stage": "distill-model", "id": "student", "teacher": "base"},
              {"stage": "dpo", "pairs_from": "student"}]
    cfg, config_dir = load_config(_config(tmp_path, chatty, garden_rows, stages))
    with pytest.raises(TuneryError, match="stage dpo: pairs_from 'student' wrote no preference pairs"):
        plan.stage_data(cfg, 1, {"student": SimpleNamespace(preference_pairs=None, status="ready")}, None, config_dir)
    both = _config(tmp_path, chatty, garden_rows, [stages[0], {**stages[1], "data": {"train": "garden.jsonl"}}])
    with pytest.raises(TuneryError, match="not both"):
        load_config(both)


def test_distill_prompt_in_the_prefect_flow_reports_and_is_cached(tmp_path, chatty, garden_rows, prefect_server):
    """The flow runs the stage as a task with its own artifact, and a second run with nothing changed reuses it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.pipeline import pipeline

    config = _config(tmp_path, chatty, garden_rows, [{"stage": "distill-prompt", "system": PERSONA, **FAST}],
                     eval={"prompts": ["How deep?"], "max_new_tokens": 4, "repeats": 1, "warmup": 0})
    first = pipeline(config)
    assert first["tuned"] == "tiny-fern:1" and [r["this run"] for r in first["rows"]] == ["base", "trained"]
    with get_client(sync_client=True) as client:
        artifact = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["tiny-fern-distill-prompt"])))[0]
    assert "| prompt tokens per request |" in artifact.data and "teacher tiny-base:1 (hf)" in artifact.data
    second = pipeline(config)
    assert [r["this run"] for r in second["rows"]] == ["base", "reused"]
    assert [v.version for v in registry.list_versions(name="tiny-fern")] == ["tiny-fern:1"]


def test_a_teacher_export_that_failed_its_checks_is_used_only_on_request(tmp_path):
    """auto falls back to HF and records which export it skipped; llama.cpp refuses naming the export and its
    failed checks; teacher_allow_failed_export uses it and the record says it failed; a passed export wins."""
    from registry import exports as export_store
    from registry.records import Check, Export

    teacher = registry.create_version("tiny-base", "base")
    registry.finish_version(teacher, str(tmp_path))

    def export(tag: str, quant: str, passed: bool) -> Path:
        (tmp_path / tag).mkdir()
        (tmp_path / tag / "t.gguf").write_bytes(b"GGUF")
        export_store.record_export(Export(
            export_id=f"tiny-base/{tag}", version=teacher, quant=quant, path=str(tmp_path / tag), gguf_file="t.gguf",
            size_bytes=4, sha256="0", modelfile="", passed=passed, info={},
            checks=(Check("answers_stop", "t.gguf", passed, 0.0, ""),)))
        return tmp_path / tag / "t.gguf"

    failed = export("v1-f16", "f16", False)
    version = registry.get_version(teacher)
    assert teacher_gguf(version, registry.exports.list_exports(version.version), "auto") == (
        None, {"teacher_export_skipped": "tiny-base/v1-f16 (failed: answers_stop)"})
    with pytest.raises(TuneryError, match=r"no GGUF export that passed its checks; tiny-base/v1-f16 \(failed: "
                                          r"answers_stop\): set teacher_allow_failed_export: true"):
        teacher_gguf(version, registry.exports.list_exports(version.version), "llama.cpp")
    assert teacher_gguf(version, registry.exports.list_exports(version.version), "llama.cpp", allow_failed=True) == (
        failed, {"teacher_export": "tiny-base/v1-f16", "teacher_gguf_checks": "failed: answers_stop"})
    passed = export("v1-q8_0", "q8_0", True)
    assert teacher_gguf(version, registry.exports.list_exports(version.version), "auto", allow_failed=True) == (
        passed, {"teacher_export": "tiny-base/v1-q8_0", "teacher_gguf_checks": "passed"})
