"""A model folder to GGUF with llama.cpp's own converter, the one that matches the llama.cpp tunery runs.

`make setup` unpacks `convert_hf_to_gguf.py`, its `conversion/` package and its `gguf-py` from the source archive
of the pinned llama-cpp-python into `.venv/llama.cpp/`, so every architecture and tokenizer kind that llama.cpp
converts (Llama 2/3, Mistral, Qwen2/3, Gemma 2/3, Phi-3, ...: byte-level BPE and SentencePiece) converts here the
same way. The converter runs in a child process (its own `gguf` package and its logging stay out of this one).

One thing differs: how a byte-level BPE tokenizer's pre-tokenizer (how text is split before merging) is named.
llama.cpp hashes the tokens of a fixed text and looks the hash up among the models it knows. A tokenizer trained
for a fine-tune (or a fixture) has a hash it has never seen, and a hash can also match a tokenizer that splits
some text differently: SmolLM2's tokenizer as transformers rebuilds it from a GGUF has GPT-2's split only, hashes
as `smollm` (which splits every numeric character) and so tokenized " ½" unlike HF. So the name is read from
`tokenizer.json`'s pre-tokenizer first (`pre_tokenizer`: what HF itself runs), and llama.cpp's hash decides only
where that names nothing tunery knows. The result records which way it was found.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from core.errors import TuneryError

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def converter_dir() -> Path:
    """Where `make setup` unpacked llama.cpp's converter (inside the virtual environment it belongs to)."""
    return Path(sys.prefix) / "llama.cpp"


def write_gguf(model_dir: str | Path, out_path: str | Path, outtype: str = "f16", name: str | None = None) -> Path:
    """Write the model in `model_dir` (config.json, safetensors, tokenizer) as one GGUF file at `out_path`."""
    return Path(convert(model_dir, out_path, outtype, name)["path"])


def convert(model_dir: str | Path, out_path: str | Path, outtype: str = "f16", name: str | None = None
            ) -> dict[str, Any]:
    """write_gguf, returning what the conversion found: {"path", "architecture", "pre_tokenizer",
    "pre_tokenizer_from"} (pre_tokenizer None for a SentencePiece tokenizer)."""
    from tasks.child import run_child

    model_dir, out_path = Path(model_dir), Path(out_path)
    if outtype not in OUTTYPES:
        raise TuneryError(f"GGUF outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    if not (converter_dir() / "convert_hf_to_gguf.py").exists():
        raise TuneryError(f"llama.cpp's converter is not in {converter_dir()}; run `make setup`")
    spec = {"model_dir": str(model_dir), "out": str(out_path), "outtype": outtype,
            "name": _general_name(model_dir, name or model_dir.name)}
    try:
        return run_child("tasks.export.convert", spec, f"converting {model_dir} to GGUF")
    except BaseException:
        out_path.unlink(missing_ok=True)  # no half-written file
        raise


def _general_name(model_dir: Path, name: str) -> str:
    """The GGUF's general.name: the name given, with the model type in brackets (`fern:3 (phi3)`). llama.cpp
    reads some tokenizer behaviour off this name: Phi-3's turn markers strip the whitespace after them, as HF's
    tokenizer.json says, only when the name contains "phi3"."""
    config_file = model_dir / "config.json"
    model_type = json.loads(config_file.read_text()).get("model_type") if config_file.exists() else None
    return f"{name} ({model_type})" if model_type and model_type not in name else name


# Hugging Face pre-tokenizers and the llama.cpp pre-tokenizer that splits text the same way, for tokenizers whose
# hash llama.cpp does not know.
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
        raise TuneryError(f"{where}/tokenizer.json: llama.cpp does not know this tokenizer, and its pre-tokenizer "
                          f"({', '.join(str(s[0]) for s in shape)}) matches none tunery can name; known: gpt-2, "
                          "smollm, llama-bpe, qwen2")
    return name


def _staged(model_dir: Path, tmp: Path) -> Path:
    """The model folder as llama.cpp's converter reads it: the same files (links), and a tokenizer_config.json
    that lists the added tokens. transformers 5 keeps them only in tokenizer.json, and without that list the
    converter writes a SentencePiece model's turn markers ([INST], <start_of_turn>) as plain text tokens, which
    llama.cpp then spells out letter by letter."""
    config_file, spec_file = model_dir / "tokenizer_config.json", model_dir / "tokenizer.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    if config.get("added_tokens_decoder") or not spec_file.exists():
        return model_dir
    added = json.loads(spec_file.read_text()).get("added_tokens", [])
    config["added_tokens_decoder"] = {str(t["id"]): {"content": t["content"], "special": t.get("special", False)}
                                      for t in added}
    for entry in model_dir.iterdir():
        if entry.name != "tokenizer_config.json":
            (tmp / entry.name).symlink_to(entry.resolve())
    (tmp / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp


def _convert(spec: dict[str, Any]) -> dict[str, Any]:
    """The child's side: run llama.cpp's converter on the folder, with the pre-tokenizer fallback."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tunery-convert-") as tmp:
        return _convert_staged(spec, _staged(Path(spec["model_dir"]), Path(tmp)))


def _convert_staged(spec: dict[str, Any], model_dir: Path) -> dict[str, Any]:
    root = converter_dir()
    sys.path[:0] = [str(root / "gguf-py"), str(root)]
    for noisy in ("hf-to-gguf", "gguf.gguf_writer", "gguf.vocab"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import convert_hf_to_gguf
    from conversion import ModelBase, ModelType, base, get_model_architecture, get_model_class

    where = Path(spec["model_dir"])  # the folder the user knows, for messages
    found: dict[str, Any] = {"path": spec["out"], "pre_tokenizer": None, "pre_tokenizer_from": None}
    known = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        spec_file = model_dir / "tokenizer.json"
        try:
            name = pre_tokenizer(json.loads(spec_file.read_text()) if spec_file.exists() else {}, where)
            found.update(pre_tokenizer=name, pre_tokenizer_from="tokenizer.json")
            return name
        except TuneryError as unnamed:
            hashed = logging.getLogger("hf-to-gguf")
            level = hashed.level
            hashed.setLevel(logging.CRITICAL)  # its "not recognized" banner is not the outcome
            try:
                found.update(pre_tokenizer=known(self, tokenizer), pre_tokenizer_from="llama.cpp (tokenizer hash)")
            except NotImplementedError:
                raise unnamed from None
            finally:
                hashed.setLevel(level)
        return found["pre_tokenizer"]

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    hparams = ModelBase.load_hparams(model_dir, False)
    try:
        found["architecture"] = get_model_architecture(hparams, ModelType.TEXT)
        get_model_class(found["architecture"], mmproj=False)
    except NotImplementedError as e:
        raise TuneryError(f"{where}: llama.cpp cannot convert this model ({e})") from None
    sys.argv = ["convert_hf_to_gguf.py", str(model_dir), "--outfile", spec["out"], "--outtype", spec["outtype"],
                "--model-name", spec["name"]]
    try:
        convert_hf_to_gguf.main()
    except FileNotFoundError as e:
        raise TuneryError(f"{where}: llama.cpp's converter needs {Path(e.filename or '?').name}, which the folder "
                          "does not have") from None
    except SystemExit as e:
        if e.code:
            raise TuneryError(f"{where}: llama.cpp's converter stopped (exit {e.code}); its output is above")
    if not Path(spec["out"]).exists():
        raise TuneryError(f"{where}: llama.cpp's converter wrote no file")
    return found


if __name__ == "__main__":
    from tasks.child import child_main

    raise SystemExit(child_main(_convert))
