"""Tiny random-initialised models of the families people fine-tune, built offline in seconds (issue 17).

Each is the family's real architecture class with a tokenizer of the family's kind trained on the demo text
(`tokenizers` byte-level BPE with the family's pre-tokenizer for Llama 3 and Qwen2; `sentencepiece` BPE with byte
fallback for Gemma 2, Phi-3 and Mistral, with the family's dummy-prefix convention) and the family's real chat
template (tests/data/templates, copied from llama.cpp's models/templates at the pinned llama-cpp-python, and
Llama 3's from Ollama's library via @huggingface/ollama-utils).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = Path(__file__).resolve().parent / "data" / "templates"
SIZE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512)

LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")


@dataclass(frozen=True)
class Family:
    name: str
    architecture: str            # the transformers class
    tokenizer: str               # "bpe" (tokenizers, byte-level) or "spm" (sentencepiece)
    template: str                # file in tests/data/templates
    specials: list[str]          # the family's turn markers (added as special tokens)
    bos: str | None
    eos: str                     # what ends an assistant turn
    pad: str | None = None
    unk: str | None = None
    regex: str | None = None     # BPE: the family's pre-tokenizer split
    dummy_prefix: bool = True    # SPM: a space before the first word (Llama 2 / Mistral / Phi-3 yes, Gemma no)
    system_role: bool = True     # whether its template accepts a system message
    config: dict = field(default_factory=dict)


FAMILIES = {f.name: f for f in (
    Family("llama3", "LlamaForCausalLM", "bpe", "meta-llama-Meta-Llama-3-8B-Instruct.jinja",
           ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
           bos="<|begin_of_text|>", eos="<|eot_id|>", regex=LLAMA3_REGEX, config={"rope_theta": 500000.0}),
    Family("qwen2", "Qwen2ForCausalLM", "bpe", "Qwen-Qwen2.5-7B-Instruct.jinja",
           ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None, eos="<|im_end|>", pad="<|endoftext|>",
           regex=QWEN2_REGEX),
    Family("gemma2", "Gemma2ForCausalLM", "spm", "google-gemma-2-2b-it.jinja",
           ["<mask>", "<start_of_turn>", "<end_of_turn>"],
           bos="<bos>", eos="<end_of_turn>", pad="<pad>", unk="<unk>", dummy_prefix=False, system_role=False,
           config={"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64}),
    Family("phi3", "Phi3ForCausalLM", "spm", "microsoft-Phi-3.5-mini-instruct.jinja",
           ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"], bos="<s>", eos="<|end|>",
           pad="<|endoftext|>", unk="<unk>"),
    Family("mistral", "MistralForCausalLM", "spm", "mistralai-Mistral-Nemo-Instruct-2407.jinja", ["[INST]", "[/INST]"],
           bos="<s>", eos="</s>", unk="<unk>", config={"sliding_window": None}),
)}


def _corpus() -> list[str]:
    rows = [json.loads(line) for line in (REPO / "data/demo/garden_chat.jsonl").read_text().splitlines()]
    return [m["content"] for r in rows for m in r["messages"]] + [
        "Café «jardín» 🌱 — ünïcödé? 你好, 3.14 and 2024.", "code: def f(x):\n    return x ** 2  # square"]


def _bpe_tokenizer(family: Family, out: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(family.regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=700, special_tokens=family.specials,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if family.bos:  # Llama 3's tokenizer starts every text with its BOS, as llama.cpp's add_bos_token says
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A", pair=f"{family.bos} $A {family.bos} $B",
            special_tokens=[(family.bos, tok.token_to_id(family.bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=family.bos, eos_token=family.eos,
                                   pad_token=family.pad or family.eos, unk_token=family.unk)


def _spm_tokenizer(family: Family, out: Path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    work = out / "spm"
    work.mkdir()
    (work / "corpus.txt").write_text("\n".join(_corpus()), encoding="utf-8")
    reserved = {"<s>", "</s>", "<bos>", "<eos>", "<unk>", "<pad>"}
    spm.SentencePieceTrainer.train(
        input=str(work / "corpus.txt"), model_prefix=str(work / "tok"), vocab_size=700, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", add_dummy_prefix=family.dummy_prefix,
        user_defined_symbols=[s for s in family.specials if s not in reserved],
        unk_id=0, bos_id=1, eos_id=2, pad_id=3 if family.pad in ("<pad>",) else -1,
        unk_piece=family.unk or "<unk>", bos_piece=family.bos or "<s>",
        eos_piece=family.eos if family.eos in reserved else "</s>", pad_piece=family.pad or "<pad>", minloglevel=2)
    shutil.copy(work / "tok.model", out / "tokenizer.model")
    shutil.rmtree(work)
    tokenizer_class = {"gemma2": "GemmaTokenizer"}.get(family.name, "LlamaTokenizer")
    config = {"tokenizer_class": tokenizer_class, "bos_token": family.bos, "eos_token": family.eos,
              "unk_token": family.unk, "add_bos_token": True, "add_eos_token": False,
              # legacy: a dummy prefix before the first word, as SentencePiece (and llama.cpp) write it
              "legacy": True}
    if family.pad:
        config["pad_token"] = family.pad
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    from tokenizers import AddedToken

    tok = AutoTokenizer.from_pretrained(out)
    # Phi-3's turn markers swallow the whitespace after them (rstrip), as its own tokenizer.json says.
    markers = [AddedToken(s, special=True, rstrip=family.name == "phi3" and s != "<|endoftext|>", normalized=False)
               for s in family.specials if s not in reserved]
    tok.add_special_tokens({"additional_special_tokens": markers})
    return tok


def build(name: str, out: Path) -> Path:
    """Write the tiny model of family `name` into `out` (config, safetensors, tokenizer, chat template)."""
    import torch
    import transformers

    family = FAMILIES[name]
    out.mkdir(parents=True, exist_ok=True)
    tok = _bpe_tokenizer(family, out) if family.tokenizer == "bpe" else _spm_tokenizer(family, out)
    tok.chat_template = (TEMPLATES / family.template).read_text()
    tok.save_pretrained(out)
    model_class = getattr(transformers, family.architecture)
    config_class = model_class.config_class
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in (("bos_token_id", family.bos), ("eos_token_id", family.eos),
                                                         ("pad_token_id", family.pad or family.eos)) if v}
    config = config_class(vocab_size=len(tok), tie_word_embeddings=True, **SIZE, **ids, **family.config)
    torch.manual_seed(0)
    model_class(config).save_pretrained(out, safe_serialization=True)
    return out


SHORT_ANSWERS = [("Is basil a herb?", "Yes."), ("Is a tomato a fruit?", "Yes."), ("Is soil blue?", "No."),
                 ("Do roses need sun?", "Yes."), ("Is snow hot?", "No."), ("Can mint spread?", "Yes."),
                 ("Is sand wet?", "No."), ("Do weeds grow?", "Yes.")]


def taught(name: str, work: Path) -> Path:
    """The family's tiny model after 60 full fine-tuning steps on yes/no answers (with and without a system
    prompt where the template has a system role): it answers briefly and ends its
    turn with the family's end-of-turn token, so an export's answers can be checked to stop (a random model never
    stops). Returns the trained model folder."""
    import os

    from tasks.data.prep import PrepConfig, prepare
    from tasks.stages.sft import SftConfig, train_sft

    base = build(name, work / "random")
    system = [{"role": "system", "content": "You are Fern, a gardener."}] if FAMILIES[name].system_role else []
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in SHORT_ANSWERS] * 2 + [{"messages": system + [
                {"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in SHORT_ANSWERS] * 2
    (work / "short.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    saved = os.environ.get("TUNERY_HOME")
    os.environ["TUNERY_HOME"] = str(work / "home")
    try:
        # The rows repeat on purpose (with and without a system prompt): the held-out ones are in the training
        # rows, which the contamination check would refuse.
        data = prepare(PrepConfig(train=["short.jsonl"], val_fraction=0.15,
                                  contamination={"max_heldout_share": 1, "general": None}), work, str(base))
        train_sft(SftConfig(method="full", max_steps=60, batch_size=8, max_length=64, learning_rate=3e-3,
                            warmup_ratio=0.0), str(base), data.artifact_path, work / "taught", device="cpu")
    finally:
        if saved is None:
            os.environ.pop("TUNERY_HOME")
        else:
            os.environ["TUNERY_HOME"] = saved
    return work / "taught"
