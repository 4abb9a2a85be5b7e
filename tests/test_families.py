"""The families people fine-tune (issue 17): for each, a tiny model of the real architecture class with a tokenizer
of the family's kind and its real chat template (tests/families.py) is LoRA-trained 2 steps, merged, converted by
llama.cpp's converter to F16 and quantized to Q8_0, and llama.cpp reads it as HF does: the vocabulary id by id,
the same tokens on unicode, whitespace, special-token text and the template's own conversations, and (F16) HF's
greedy tokens."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import write_jsonl
from families import FAMILIES, build

PROMPTS = ["How often should I water basil?", "What can I plant in autumn?"]


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """Each family's tiny model, built once per session on first use."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build(name, tmp_path_factory.mktemp(f"family-{name}"))
        return built[name]

    return get


def _conversations(tokenizer) -> list[str]:
    """The export check's sample conversations as the family's template renders them (those it accepts), without
    the BOS text llama.cpp adds itself."""
    from tasks.modelfile import SAMPLE_CONVERSATIONS

    rendered = []
    for conversation in SAMPLE_CONVERSATIONS:
        try:
            text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        except Exception:  # Gemma 2's template refuses a system turn
            continue
        rendered.append(text.removeprefix(tokenizer.bos_token or ""))
    return rendered


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_family_trains_merges_and_exports_as_llama_cpp_reads_it(name, family_dirs, tmp_path, garden_rows):
    import gguf

    from tasks import verify
    from tasks.convert import convert
    from tasks.merge import merge_adapter
    from tasks.models import conversation, load_model, load_tokenizer, prompt_ids, turn_end_ids
    from tasks.prep import PrepConfig, prepare
    from tasks.sft import SftConfig, train_sft

    family = FAMILIES[name]
    base = family_dirs(name)
    write_jsonl(tmp_path / "garden.jsonl", garden_rows)
    data = prepare(PrepConfig(train=["garden.jsonl"], val_fraction=0.15), tmp_path, str(base))
    config = SftConfig(method="lora", max_steps=2, batch_size=4, max_length=128, learning_rate=1e-2)
    trained = train_sft(config, str(base), data.artifact_path, tmp_path / "adapter", device="cpu")
    assert trained.adapter and trained.metrics["train_steps"] == 2
    merge_adapter(str(base), str(tmp_path / "adapter"), tmp_path / "merged")
    merged = tmp_path / "merged"
    tokenizer, model = load_tokenizer(str(merged)), load_model(str(merged))

    found = convert(merged, tmp_path / "f16.gguf", "f16")
    assert found["architecture"] == family.architecture
    kind = gguf.GGUFReader(str(tmp_path / "f16.gguf")).fields["tokenizer.ggml.model"].contents()
    assert kind == {"bpe": "gpt2", "spm": {"gemma2": "llama"}.get(name, "llama")}[family.tokenizer]
    q8 = verify.quantize(tmp_path / "f16.gguf", tmp_path / "q8_0.gguf", "q8_0")
    rendered = _conversations(tokenizer)
    assert len(rendered) == (2 if not family.system_role else 4)
    for path in (tmp_path / "f16.gguf", q8):
        llm, loads = verify.check_loads(path, tokenizer)
        try:
            assert loads["passed"], loads
            tokens = verify.check_tokenization(llm, tokenizer, rendered)
            assert tokens["passed"], tokens
            assert llm._model.add_bos_token() == (tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id])
            if path.name == "f16.gguf":
                ids = [prompt_ids(tokenizer, conversation(None, p)) for p in PROMPTS]
                greedy = verify.check_greedy(llm, model, tokenizer, ids, 16, turn_end_ids(tokenizer), "f16")
                assert greedy["passed"] and greedy["value"] == len(PROMPTS), greedy
        finally:
            llm.close()


def test_sentencepiece_tokens_equal_hf_and_the_dummy_prefix_is_named_not_hidden(family_dirs, tmp_path):
    """Gemma's SentencePiece has no dummy prefix: every text is identical. Mistral's adds one before leading
    whitespace, which llama.cpp writes and HF's fast tokenizer does not: named as such. A wrong vocabulary still
    fails."""
    from tasks import verify
    from tasks.convert import convert
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
