"""The families people fine-tune (issue 17): for each, a tiny model of the real architecture class with a tokenizer
of the family's kind and its real chat template (tests/families.py) is LoRA-trained 2 steps, merged, converted by
llama.cpp's converter to F16 and quantized to Q8_0, and llama.cpp reads it as HF does: the vocabulary id by id,
the same tokens on unicode, whitespace, special-token text and the template's own conversations, and (F16) HF's
greedy tokens."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_jsonl
from families import FAMILIES, build, taught

import registry

PROMPTS = ["How often should I water basil?", "What can I plant in autumn?"]


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """Each family's tiny model, random (`build`), built once per session on first use."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build(name, tmp_path_factory.mktemp(f"family-{name}"))
        return built[name]

    return get


@pytest.fixture(scope="session")
def taught_dirs(tmp_path_factory):
    """Each family's tiny model taught to answer briefly and end its turn (`taught`), once per session."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = taught(name, tmp_path_factory.mktemp(f"taught-{name}"))
        return built[name]

    return get


def _register(name: str, folder: Path, parents: list[str] = ()) -> str:
    version = registry.create_version(name, "base" if not parents else "merge", parents=list(parents))
    registry.finish_version(version, str(folder))
    return version


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_family_trains_merges_and_exports_with_every_check_passing(name, taught_dirs, tmp_path, garden_rows):
    """LoRA sft 2 steps, merge, then `tunery export`'s path: F16 by llama.cpp's converter, Q8_0 by its quantizer,
    the Modelfile's TEMPLATE derived from the family's chat template with a SYSTEM prompt, and every check passes:
    the template renders like HF, the vocabulary and tokens match, greedy F16 == HF, answers stop, context fits."""
    from flows import promotion
    from tasks.data.prep import PrepConfig, prepare
    from tasks.evaluate.evaluation import EvalConfig
    from tasks.export.settings import ExportConfig
    from tasks.stages.merge import merge_adapter
    from tasks.stages.sft import SftConfig, train_sft

    family = FAMILIES[name]
    start = taught_dirs(name)
    write_jsonl(tmp_path / "garden.jsonl", garden_rows)
    data = prepare(PrepConfig(train=["garden.jsonl"], val_fraction=0.15), tmp_path, str(start))
    config = SftConfig(method="lora", max_steps=2, batch_size=4, max_length=128)
    trained = train_sft(config, str(start), data.artifact_path, tmp_path / "adapter", device="cpu")
    assert trained.adapter and trained.metrics["train_steps"] == 2
    merge_adapter(str(start), str(tmp_path / "adapter"), tmp_path / "merged")
    version = _register(name, tmp_path / "merged", [_register(f"{name}-base", start)])

    export = promotion.export_version(version, data, ExportConfig(
        quant="q8_0", system="You are Fern, a gardener.", heldout_rows=4, max_new_tokens=16, answer_tokens=16,
        window=128, answer_rows=2), PROMPTS, progress=lambda _: None,
        evals=EvalConfig(prompts=PROMPTS, general=None, answer_tokens=16))
    checks = {c.name: c.json() for c in export.checks}
    failed = {n: c["detail"] for n, c in checks.items() if c["passed"] is False}
    assert export.passed and not failed, (failed, export.info["answers"])
    for required in ("modelfile", "template", "loads", "tokenization", "greedy", "answers_stop", "context"):
        assert checks[required]["passed"] is True, (required, checks[required])
    assert checks["greedy"]["file"].endswith("-f16.gguf") and export.gguf_file.endswith("-q8_0.gguf")
    assert export.info["conversion"]["architecture"] == family.architecture
    assert f"PARAMETER stop {family.eos}" in export.modelfile
    assert checks["heldout_answers"]["detail"].startswith("2 held-out answers")  # through the family's template
    placement = {"turn": "", "none": "no system role", "last": "last user message"}[
        {"gemma2": "none", "mistral": "last"}.get(name, "turn")]
    assert placement in checks["template"]["detail"]
    assert [a["answer"] for a in export.info["answers"]] and all(
        a["answer"] in ("Yes.", "No.") for a in export.info["answers"]), export.info["answers"]


def test_sentencepiece_tokens_equal_hf_and_the_dummy_prefix_is_named_not_hidden(family_dirs, tmp_path):
    """Gemma's SentencePiece has no dummy prefix: every text is identical. Mistral's adds one before leading
    whitespace, which llama.cpp writes and HF's fast tokenizer does not: named as such. A wrong vocabulary still
    fails."""
    from tasks.export.convert import convert
    from tasks.export import verify
    from tasks.models import load_tokenizer

    gemma, mistral = family_dirs("gemma2"), family_dirs("mistral")
    convert(gemma, tmp_path / "gemma.gguf", "f32")
    convert(mistral, tmp_path / "mistral.gguf", "f32")
    gemma_tok, mistral_tok = load_tokenizer(str(gemma)), load_tokenizer(str(mistral))
    text = "<start_of_turn>user\nCafé «jardín» 🌱\n\n  two  spaces\r\n\tand 3.14<end_of_turn>\n<start_of_turn>model\n"
    llm, _ = verify.check_loads(tmp_path / "gemma.gguf", gemma_tok)
    try:
        same = verify.check_tokenization(llm, gemma_tok, [text])
        assert same["passed"] and "more but" not in same["detail"], same
    finally:
        llm.close()
    llm, _ = verify.check_loads(tmp_path / "mistral.gguf", mistral_tok)
    try:
        named = verify.check_tokenization(llm, mistral_tok, ["[INST]  leading spaces[/INST]"])
        assert named["passed"] and "dummy-prefix space before leading whitespace" in named["detail"], named
        wrong = verify.check_tokenization(llm, gemma_tok)  # another tokenizer's ids
        assert not wrong["passed"] and "first mismatch" in wrong["detail"]
    finally:
        llm.close()
