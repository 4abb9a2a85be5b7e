"""Export a model folder to GGUF, the file format llama.cpp (and so Ollama) runs, with the `gguf` library.

Llama-family architectures: Llama, SmolLM and Mistral (GGUF arch `llama`, whose q/k projections llama.cpp expects
in its own rotary layout, so they are permuted as its converter does) and Qwen2 (arch `qwen2`, no permutation,
q/k/v biases). The tokenizer (a byte-level BPE: vocabulary, merges, token types), its special tokens and the chat
template are written into the metadata. 1-D tensors (norms) stay F32; matrices are F32 or F16.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.common import TuneryError

ARCHES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
OUTTYPES = ("f32", "f16")


class ExportConfig(BaseModel):
    """How a version becomes a GGUF + Modelfile, and how much of it is checked with llama.cpp."""

    model_config = ConfigDict(extra="forbid")

    quant: str = Field("q4_k_m", description="f32, f16, or a llama.cpp quantization: q8_0, q6_k, q5_k_m, q4_k_m, "
                                              "q4_0, q3_k_m, q2_k.")
    system: str | None = Field(None, description="The Modelfile's SYSTEM prompt (e.g. the one the data trained with).")
    num_ctx: int | None = Field(None, ge=64, description="The Modelfile's num_ctx (context length Ollama allocates).")
    parameters: dict[str, str | int | float] = Field(default_factory=dict,
                                                     description="More Modelfile PARAMETERs, e.g. temperature: 0.7.")
    template: str | None = Field(None, description="An Ollama TEMPLATE to use instead of the one derived from the "
                                                   "chat template; it is still checked against the chat template.")
    max_new_tokens: int = Field(48, ge=4, le=1024, description="Tokens per greedy comparison with HF.")
    answer_tokens: int = Field(256, ge=4, le=4096, description="Most tokens a sample answer may take before it "
                                                               "counts as not stopping (endless generation).")
    heldout_rows: int = Field(16, ge=1, description="Held-out examples for the perplexity and KL checks.")
    window: int = Field(512, ge=32, description="Tokens per held-out example in those checks (longer are cut).")
    threads: int | None = Field(None, ge=1, description="llama.cpp threads; default: every core.")
    keep_full_precision: bool = Field(False, description="Keep the F16 file a quantized export was made from.")

    @field_validator("quant")
    @classmethod
    def _known_quant(cls, v: str) -> str:
        from tasks.verify import QUANTS

        if v not in QUANTS:
            raise ValueError(f"unknown quantization {v!r}; one of {', '.join(QUANTS)}")
        return v


class GateConfig(BaseModel):
    """What a promotion demands of the candidate's export before the alias moves to it."""

    model_config = ConfigDict(extra="forbid")

    alias: str = Field("production", description="The alias to move: NAME@ALIAS.")
    max_perplexity_increase_pct: float = Field(2.0, ge=0, description="Held-out perplexity of the candidate's GGUF "
                                               "may exceed the current holder's (same tokens, same run) by this %.")
    min_decode_tokens_per_s: float = Field(5.0, ge=0, description="llama.cpp decode speed the export must reach.")
    max_mean_kl: float = Field(0.1, ge=0, description="Mean per-token KL(fp32 || export) on held-out data, nats.")
    require_checks: list[str] = Field(
        default_factory=lambda: ["modelfile", "loads", "tokenization", "greedy", "template", "answers_stop"],
        description="Export checks that must pass.")

    @field_validator("alias")
    @classmethod
    def _valid_alias(cls, v: str) -> str:
        import re

        from tasks.common import check_name

        try:
            check_name(v, "alias")
        except TuneryError as e:
            raise ValueError(str(e)) from None
        if re.match(r"^v\d+-", v):
            raise ValueError(f"alias {v!r} looks like an export tag (vN-QUANT); pick another name")
        return v


def _permute(weight, n_head: int):
    """HF's rotary layout -> llama.cpp's (the same permutation as llama.cpp's own HF converter)."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


# Hugging Face pre-tokenizers and the llama.cpp pre-tokenizer that splits text the same way. llama.cpp's
# converter recognises a tokenizer by hashing its output on a test text; this reads the tokenizer.json instead.
_GPT2_SPLIT = ("ByteLevel", True)
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")


def pre_tokenizer(spec: dict[str, Any], where: Path) -> str:
    """The llama.cpp `tokenizer.ggml.pre` name for a tokenizer.json's pre-tokenizer (TuneryError if unknown)."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    shape = []
    for step in steps:
        if step.get("type") == "ByteLevel":
            shape.append(("ByteLevel", bool(step.get("use_regex", True))))
        elif step.get("type") == "Digits":
            shape.append(("Digits", bool(step.get("individual_digits"))))
        elif step.get("type") == "Split":
            shape.append(("Split", (step.get("pattern") or {}).get("Regex")))
        else:
            shape.append((step.get("type"), None))
    known = {
        (_GPT2_SPLIT,): "gpt-2",
        (("Digits", True), _GPT2_SPLIT): "smollm",
        (("Split", _LLAMA3_REGEX), ("ByteLevel", False)): "llama-bpe",
        (("Split", _QWEN2_REGEX), ("ByteLevel", False)): "qwen2",
    }
    name = known.get(tuple(shape))
    if name is None:
        raise TuneryError(f"{where}/tokenizer.json: its pre-tokenizer ({', '.join(str(s[0]) for s in shape)}) has "
                          f"no llama.cpp equivalent tunery knows; known: gpt-2, smollm, llama-bpe, qwen2")
    return name


def _tokenizer_metadata(writer, model_dir: Path, config: dict[str, Any]) -> None:
    import gguf
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    spec = json.loads((model_dir / "tokenizer.json").read_text()) if (model_dir / "tokenizer.json").exists() else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise TuneryError(f"{model_dir}: GGUF export supports byte-level BPE tokenizers; this one is "
                          f"{model.get('type', 'unknown')}")
    vocab = tok.get_vocab()
    size = max(config.get("vocab_size", 0), max(vocab.values()) + 1)
    by_id = {i: t for t, i in vocab.items()}
    added = {t.content: t for t in tok.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(size):
        token = by_id.get(i, f"[PAD{i}]")
        tokens.append(token)
        if token in added:
            types.append(gguf.TokenType.CONTROL if added[token].special else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            types.append(gguf.TokenType.NORMAL)
        else:
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(spec, model_dir))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("pad_token_id", writer.add_pad_token_id), ("unk_token_id", writer.add_unk_token_id)):
        value = getattr(tok, attr)
        if value is not None:
            add(value)
    writer.add_add_bos_token(False)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def write_gguf(model_dir: str | Path, out_path: str | Path, outtype: str = "f16", name: str | None = None) -> Path:
    """Write the model in `model_dir` (config.json + safetensors + tokenizer) as one GGUF file at `out_path`."""
    import gguf

    model_dir, out_path = Path(model_dir), Path(out_path)
    if outtype not in OUTTYPES:
        raise TuneryError(f"GGUF outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    config = json.loads((model_dir / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in ARCHES:
        raise TuneryError(f"{model_dir}: cannot export model_type {model_type!r} to GGUF; supported: "
                          f"{', '.join(sorted(ARCHES))}")
    arch = ARCHES[model_type]
    writer = gguf.GGUFWriter(str(out_path), arch)
    writer.add_name(name or model_dir.name)
    _hyperparameters(writer, model_dir, config)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.ALL_F32)
    _tokenizer_metadata(writer, model_dir, config)
    _tensors(writer, model_dir, config, arch, outtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()
    return out_path


def _hyperparameters(writer, model_dir: Path, config: dict[str, Any]) -> None:
    """The architecture's sizes, RoPE and norm settings from config.json."""
    n_head = config["num_attention_heads"]
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads", n_head))
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // n_head)
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise TuneryError(f"{model_dir}: GGUF export does not write rope scaling {rope.get('rope_type')!r} yet")
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(config["vocab_size"])


def _tensors(writer, model_dir: Path, config: dict[str, Any], arch: str, outtype: str) -> None:
    """Every weight under its GGUF name (Llama's q and k rows permuted as llama.cpp expects), f16 for matrices of
    an f16 file."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    n_layers, n_head = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads", n_head)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2 if arch == "qwen2" else gguf.MODEL_ARCH.LLAMA, n_layers)
    tensors: dict[str, Any] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="np") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    if "lm_head.weight" not in tensors and not config.get("tie_word_embeddings", False):
        raise TuneryError(f"{model_dir}: no lm_head.weight and the embeddings are not tied")
    for key, value in tensors.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise TuneryError(f"{model_dir}: no GGUF name for tensor {key}")
        value = value.astype(np.float32)
        if arch == "llama" and key.endswith("q_proj.weight"):
            value = _permute(value, n_head)
        elif arch == "llama" and key.endswith("k_proj.weight"):
            value = _permute(value, n_kv)
        if outtype == "f16" and value.ndim > 1:
            value = value.astype(np.float16)
        writer.add_tensor(target, value)
