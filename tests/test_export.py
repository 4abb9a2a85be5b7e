"""GGUF export (issue 5, first part): the file transformers reads back holds the model's weights and tokenizer."""
from __future__ import annotations

import pytest
import torch

from core.errors import TuneryError
from tasks.export.convert import write_gguf
from tasks.models import load_model, load_tokenizer


@pytest.mark.parametrize("outtype, tolerance", [("f32", 0.0), ("f16", 1e-3)])
def test_tiny_gguf_read_back_by_transformers_reproduces_the_weights(tiny_model_dir, tmp_path, outtype, tolerance):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = write_gguf(tiny_model_dir, tmp_path / f"tiny-{outtype}.gguf", outtype)
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    original = load_model(str(tiny_model_dir))
    ours, theirs = original.state_dict(), back.state_dict()
    assert set(ours) == set(theirs)
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    assert worst <= tolerance, worst  # the q/k permutation round-trips exactly
    tok = load_tokenizer(str(tiny_model_dir))
    tok_back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    text = "Water tomatoes deeply, twice a week! <|im_start|>user\nHi<|im_end|>"
    assert tok_back(text)["input_ids"] == tok(text)["input_ids"]
    assert tok_back.chat_template == tok.chat_template


def test_unsupported_architecture_is_named(tiny_model_dir, tmp_path):
    import json
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchForCausalLM"]}))
    with pytest.raises(TuneryError, match="llama.cpp cannot convert this model .*'NoSuchForCausalLM' not supported"):
        write_gguf(tmp_path / "m", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_rope_base_and_logits_survive_the_round_trip(tiny_model_dir, tmp_path):
    """SmolLM2 uses rope_theta 100000: the exported file must carry it, or every logit drifts."""
    import json
    import shutil

    from transformers import AutoModelForCausalLM

    shutil.copytree(tiny_model_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["rope_parameters"] = {"rope_theta": 100000.0, "rope_type": "default"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    (tmp_path / "out").mkdir()
    write_gguf(tmp_path / "m", tmp_path / "out" / "m.gguf", "f32")
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), gguf_file="m.gguf", dtype=torch.float32)
    assert back.config.rope_parameters["rope_theta"] == 100000.0
    ids = torch.tensor([[1, 20, 31, 42, 53, 64, 75, 86]])
    with torch.no_grad():
        assert torch.equal(load_model(str(tmp_path / "m"))(ids).logits, back(ids).logits)


def _checks(found: list[dict]) -> dict[str, dict]:
    return {c["name"]: c for c in found}


def test_llama_cpp_reproduces_a_tiny_f32_export(tiny_model_dir, tiny_gguf, tmp_path, prepared):
    """llama.cpp loads the tiny export, tokenizes like HF, gives HF's greedy tokens and (F32) its distributions."""
    from flows.promotion import heldout_examples
    from tasks.export import distribution, verify
    from tasks.models import prompt_ids

    path = tiny_gguf("f32", tmp_path)
    tok = load_tokenizer(str(tiny_model_dir))
    llm, loads = verify.check_loads(path, tok)
    try:
        assert loads["passed"], loads
        assert verify.check_tokenization(llm, tok)["passed"]
        prompts = [prompt_ids(tok, [{"role": "user", "content": q}]) for q in ("Water basil?", "Prune roses?")]
        greedy = verify.check_greedy(llm, load_model(str(tiny_model_dir)), tok, prompts, 12, {tok.eos_token_id})
        assert greedy["passed"] and greedy["value"] == 2, greedy
    finally:
        llm.close()
    found = _checks(distribution.distribution_checks(path, load_model(str(tiny_model_dir)),
                                               heldout_examples(tok, prepared, 4), 256))
    assert found["mean_kl"]["value"] < 1e-4
    assert found["perplexity"]["value"] == pytest.approx(found["perplexity_hf"]["value"], rel=1e-3)


def test_quantized_tiny_export_is_measured_not_matched(tiny_model_dir, tiny_gguf, tmp_path, prepared):
    """Q8_0 of the tiny model: a real KL above zero, perplexity near fp32's, recorded rather than asserted equal."""
    from flows.promotion import heldout_examples
    from tasks.export import distribution, verify

    f16 = tiny_gguf("f16", tmp_path)
    q8 = verify.quantize(f16, tmp_path / "tiny-q8_0.gguf", "q8_0")
    assert q8.stat().st_size < f16.stat().st_size
    tok = load_tokenizer(str(tiny_model_dir))
    found = _checks(distribution.distribution_checks(q8, load_model(str(tiny_model_dir)),
                                               heldout_examples(tok, prepared, 4), 256))
    assert 0 < found["mean_kl"]["value"] < 0.05
    assert found["perplexity"]["value"] == pytest.approx(found["perplexity_hf"]["value"], rel=0.05)
    with pytest.raises(TuneryError, match="unknown quantization 'q9'"):
        verify.quantize(f16, tmp_path / "x.gguf", "q9")


def test_a_corrupt_gguf_is_named_with_llama_cpp_s_reason(tiny_model_dir, tiny_gguf, tmp_path):
    from tasks.export import verify

    path = tiny_gguf("f32", tmp_path)
    path.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(TuneryError, match="llama.cpp cannot load tiny.gguf: .*(corrupted|incomplete|bounds)"):
        verify.open_gguf(path)


@pytest.mark.e2e
def test_llama_cpp_matches_hf_on_the_smollm2_f16_export(smollm2_dir, tmp_path):
    """The packaged SmolLM2 as F16 GGUF: llama.cpp tokenizes like HF (unicode, whitespace, special tokens) and
    gives HF's greedy tokens on chat prompts."""
    from tasks.export.modelfile import SAMPLE_CONVERSATIONS, chat_frames, hf_render
    from tasks.export import verify
    from tasks.models import prompt_ids

    path = write_gguf(smollm2_dir, tmp_path / "smollm2-f16.gguf", "f16")
    tok = load_tokenizer(str(smollm2_dir))
    llm, loads = verify.check_loads(path, tok)
    try:
        assert loads["passed"] and loads["value"] == 49152
        frames = chat_frames(tok)
        tokenization = verify.check_tokenization(llm, tok, [hf_render(tok, c, frames) for c in SAMPLE_CONVERSATIONS])
        assert tokenization["passed"], tokenization
        prompts = [prompt_ids(tok, [{"role": "user", "content": q}]) for q in
                   ("What is the capital of France?", "How do I keep my basil from wilting?")]
        greedy = verify.check_greedy(llm, load_model(str(smollm2_dir)), tok, prompts, 24, {tok.eos_token_id})
        assert greedy["passed"], greedy
    finally:
        llm.close()


def test_loads_compares_the_vocabulary_token_for_token(tiny_model_dir, tmp_path):
    """A tokenizer smaller than the GGUF's vocabulary used to pass `loads`; now every id's text must match, and
    ids past the tokenizer's must be padding rows (as in a model whose embeddings are padded to a round size)."""
    from conftest import _corpus
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tasks.export import verify

    tok = load_tokenizer(str(tiny_model_dir))
    padded = tmp_path / "padded"
    model = load_model(str(tiny_model_dir))
    model.resize_token_embeddings(len(tok) + 40)
    model.save_pretrained(padded, safe_serialization=True)
    tok.save_pretrained(padded)
    (tmp_path / "out").mkdir()
    path = write_gguf(padded, tmp_path / "out" / "padded.gguf", "f32")
    llm, loads = verify.check_loads(path, tok)
    try:
        assert loads["passed"] and loads["value"] == len(tok) + 40 and "40 padding" in loads["detail"], loads
        other = Tokenizer(models.BPE())
        other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        other.train_from_iterator(_corpus()[::-1], trainers.BpeTrainer(
            vocab_size=500, special_tokens=["<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        smaller = PreTrainedTokenizerFast(tokenizer_object=other)
        assert len(smaller) < llm.n_vocab()  # the old `loads` passed on this
        wrong = verify.check_vocabulary(llm, smaller)
        assert wrong["passed"] is False and "token texts differ, first id 0" in wrong["detail"], wrong
    finally:
        llm.close()


def test_repeat_penalty_decoding_is_llama_cpp_s_own(tiny_model_dir, tiny_gguf, tmp_path):
    """greedy_ids with a repeat penalty picks the tokens llama.cpp's penalties sampler picks (temperature 0)."""
    from tasks.export import verify

    path = tiny_gguf("f32", tmp_path)
    llm = verify.open_gguf(path, threads=2)
    try:
        prompt = llm.tokenize(b"<|im_start|>user\nWater basil?<|im_end|>\n<|im_start|>assistant\n", add_bos=False,
                              special=True)
        plain, _, _ = verify.greedy_ids(llm, prompt, 24, set())
        ours, _, _ = verify.greedy_ids(llm, prompt, 24, set(), repeat_penalty=1.5, repeat_last_n=64,
                                       penalize_prompt=False)
        theirs = []
        for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.5, reset=True):
            theirs.append(token)
            if len(theirs) == 24:
                break
        assert ours == theirs and ours != plain  # the penalty changed the answer, exactly as llama.cpp does
    finally:
        llm.close()


def test_greedy_parts_only_at_a_near_tie_or_it_fails_with_the_gap(tiny_model_dir, tmp_path, monkeypatch):
    """A file of another model parts from HF's greedy tokens at a clear choice: the check fails and names HF's
    log-probability margin there; the same parting counts as a near-tie only under a tolerance above that margin."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from tasks.export import verify
    from tasks.models import prompt_ids

    shutil.copytree(tiny_model_dir, tmp_path / "other")
    weights = load_file(str(tmp_path / "other" / "model.safetensors"))
    torch.manual_seed(0)
    save_file({k: (v + 0.5 * torch.randn_like(v) if v.ndim == 2 else v).contiguous() for k, v in weights.items()},
              str(tmp_path / "other" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "out").mkdir()
    path = write_gguf(tmp_path / "other", tmp_path / "out" / "other.gguf", "f32")
    tok, model = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir)).eval()
    prompts = [prompt_ids(tok, [{"role": "user", "content": "Water basil?"}])]
    llm = verify.open_gguf(path, threads=2)
    try:
        failed = verify.check_greedy(llm, model, tok, prompts, 12, set(), "f32")
        assert failed["passed"] is False and "HF prefers its token by" in failed["detail"], failed
        margin = float(failed["detail"].rsplit("by ", 1)[1].split(" nats")[0])
        assert margin > verify.NEAR_TIE_NATS["f32"]
        monkeypatch.setitem(verify.NEAR_TIE_NATS, "f32", margin + 1.0)
        tie = verify.check_greedy(llm, model, tok, prompts, 12, set(), "f32")
        assert tie["passed"] is True and "near-tie" in tie["detail"] and tie["value"] == 1, tie
    finally:
        llm.close()


def test_answers_are_decoded_with_the_modelfile_s_repeat_penalty(tiny_model_dir, tiny_gguf, tmp_path):
    from tasks.export.modelfile import chat_frames, go_template
    from tasks.export import verify

    tok = load_tokenizer(str(tiny_model_dir))
    template = go_template(chat_frames(tok))
    path = tiny_gguf("f32", tmp_path)
    llm = verify.open_gguf(path, threads=2)
    try:
        plain, _, plain_samples = verify.check_answers(llm, template, ["<|im_end|>"], ["Water basil?"], None, 24)
        penalised, _, samples = verify.check_answers(llm, template, ["<|im_end|>"], ["Water basil?"], None, 24,
                                                     {"repeat_penalty": 1.5, "num_ctx": 2048})
    finally:
        llm.close()
    assert "no repeat penalty" in plain["detail"]
    assert "repeat_penalty 1.5 over the last 64 tokens, as the Modelfile sets" in penalised["detail"]
    assert samples[0]["answer"] != plain_samples[0]["answer"]


def test_the_pre_tokenizer_is_read_from_tokenizer_json_and_an_unknown_one_is_named(tiny_model_dir, tmp_path):
    """llama.cpp's converter writes the file; the pre-tokenizer name comes from tokenizer.json (what HF runs), and
    one that neither tunery nor llama.cpp's hash table knows stops the export with the file named, and no GGUF."""
    import json
    import shutil

    from tasks.export.convert import convert

    found = convert(tiny_model_dir, tmp_path / "tiny.gguf", "f32")
    assert found["architecture"] == "LlamaForCausalLM"
    assert (found["pre_tokenizer"], found["pre_tokenizer_from"]) == ("gpt-2", "tokenizer.json")
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    spec = json.loads((tmp_path / "m" / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [{"type": "WhitespaceSplit"}, spec["pre_tokenizer"]]}
    (tmp_path / "m" / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(TuneryError, match=r"m/tokenizer.json: llama.cpp does not know this tokenizer, and its "
                                          r"pre-tokenizer \(WhitespaceSplit, ByteLevel\) matches none"):
        convert(tmp_path / "m", tmp_path / "m.gguf", "f32")
    assert not (tmp_path / "m.gguf").exists()
