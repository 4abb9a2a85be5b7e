"""Checks of a GGUF export with llama.cpp (llama-cpp-python), the engine inside Ollama.

Each check returns {name, passed, value, detail}; `passed` is None for a measurement that is not pass/fail.
- loads: llama.cpp opens the file and its vocabulary is the tokenizer's size.
- tokenization: llama.cpp's tokens equal the HF tokenizer's on text with unicode, whitespace and special tokens.
- greedy: llama.cpp's greedy tokens equal HF `generate`'s for the same prompt ids (F32 / F16 files; quantized
  arithmetic flips near-ties, so quantized files are judged by perplexity and KL instead).
- perplexity / kl: on held-out examples, the file's perplexity of the scored tokens, the HF fp32 model's on the
  same tokens, the mean KL divergence KL(fp32 || file) of the next-token distributions and how often both pick
  the same top token (the figures llama.cpp's `perplexity --kl-divergence` reports).
- template: the Modelfile's Go TEMPLATE renders sample conversations exactly as the HF chat template does.
- answers: the file answers the eval prompts through the Modelfile's template and stops at a stop token (no
  endless generation); the answers are kept as samples. decode_tokens_per_s is llama.cpp's decode speed there.
- context: the Modelfile's num_ctx holds each eval prompt with the system prompt plus the answer length (Ollama
  cuts a longer prompt from the front, silently, system prompt first).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import TuneryError
from tasks.export.modelfile import SAMPLE_CONVERSATIONS, ChatFrames, hf_render, render_go
from tasks.models import answer_length, conversation, repeated_ngram_ends

TOKENIZER_CORPUS = [
    "Water tomatoes deeply, twice a week.",
    "  two leading spaces, three trailing   ",
    "tabs\tand\nnew lines\n\n\nand a blank line\r\nwith CRLF",
    "Café «jardín» 🌱 — ünïcödé ñ 東京 مرحبا Привет",
    "numbers 12345 3.14159 1,000,000 and 2026-11-23",
    "code: def f(x):\n    return x ** 2  # square",
    "don't won't I'm you'll THEY'RE",
    "emoji sequences 👩‍🌾🍅🪴 and symbols ©®™ ½",
]
LOG = "llama.cpp.log"  # what llama.cpp printed while quantizing and loading, kept beside the export
QUANTS = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
          "q6_k": "MOSTLY_Q6_K", "q5_k_m": "MOSTLY_Q5_K_M", "q4_k_m": "MOSTLY_Q4_K_M", "q4_0": "MOSTLY_Q4_0",
          "q3_k_m": "MOSTLY_Q3_K_M", "q2_k": "MOSTLY_Q2_K"}


def check(name: str, passed: bool | None, value: float | None = None, detail: str = "") -> dict[str, Any]:
    return {"name": name, "passed": passed, "value": None if value is None else float(value), "detail": detail}


@contextlib.contextmanager
def c_output_to(log: Path):
    """Send what llama.cpp prints (per-tensor quantize lines, load messages; from C and through Python's
    sys.stderr) to `log`, not the terminal."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "a", encoding="utf-8", errors="replace") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                yield
        finally:
            f.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def quantize(src: Path, dst: Path, quant: str, threads: int | None = None) -> Path:
    """Quantize an F16/F32 GGUF with llama.cpp's own quantizer (K-quants included)."""
    import llama_cpp

    if quant not in QUANTS:
        raise TuneryError(f"unknown quantization {quant!r}; one of {', '.join(QUANTS)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{QUANTS[quant]}")
    params.nthread = threads or os.cpu_count() or 1
    log = dst.parent / LOG
    with c_output_to(log):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.exists():
        raise TuneryError(f"llama.cpp could not quantize {src.name} to {quant} (code {rc}); see {log}")
    return dst


def open_gguf(path: Path, n_ctx: int = 2048, logits_all: bool = False, threads: int | None = None):
    """Load a GGUF in llama.cpp; TuneryError with llama.cpp's own reason when it cannot."""
    from llama_cpp import Llama

    def load(verbose: bool):
        return Llama(model_path=str(path), n_ctx=n_ctx, logits_all=logits_all, n_threads=threads or os.cpu_count(),
                     n_threads_batch=threads or os.cpu_count(), verbose=verbose, seed=0)

    log = path.parent / LOG
    try:
        with c_output_to(log):
            return load(False)
    except (ValueError, RuntimeError) as e:
        error = str(e)
    try:  # again, verbosely, for llama.cpp's reason
        with c_output_to(log):
            load(True).close()
    except (ValueError, RuntimeError):
        pass
    reasons = [line for line in log.read_text(errors="replace").splitlines() if "error" in line.lower()]
    raise TuneryError(f"llama.cpp cannot load {path.name}: {reasons[-1] if reasons else error}")


def check_loads(path: Path, tokenizer) -> tuple[Any, dict[str, Any]]:
    try:
        llm = open_gguf(path)
    except TuneryError as e:
        return None, check("loads", False, detail=str(e))
    return llm, check_vocabulary(llm, tokenizer)


def check_vocabulary(llm, tokenizer) -> dict[str, Any]:
    """The `loads` verdict: llama.cpp's vocabulary is the tokenizer's, token for token (same id, same text);
    ids past the tokenizer's (embedding rows padded to a round size) must be padding entries."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    n = llm.n_vocab()
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    size = max(by_id) + 1
    differ = [i for i in range(min(n, size)) if i in by_id and
              llama_cpp.llama_vocab_get_text(vocab, i) != by_id[i].encode("utf-8")]
    extra = [i for i in range(size, n) if not llama_cpp.llama_vocab_get_text(vocab, i).startswith(b"[PAD")]
    problems = []
    if n < size:
        problems.append(f"{size - n} of the tokenizer's ids are missing")
    if differ:
        i = differ[0]
        problems.append(f"{len(differ)} token texts differ, first id {i}: "
                        f"{llama_cpp.llama_vocab_get_text(vocab, i)!r} vs the tokenizer's {by_id[i]!r}")
    if extra:
        problems.append(f"{len(extra)} ids past the tokenizer's {size} are not padding, first {extra[0]}")
    detail = (f"vocabulary {n} tokens, the tokenizer's {len(by_id)} identical by id and text"
              + (f", {n - size} padding" if n > size else "")) if not problems else "; ".join(problems)
    return check("loads", not problems, n, detail)


def check_tokenization(llm, tokenizer, extra: list[str] = ()) -> dict[str, Any]:
    """llama.cpp's tokens against HF's on the corpus and `extra` texts (rendered conversations).

    One difference is known and named rather than failed: a SentencePiece tokenizer's text that starts with
    whitespace, at the start or right after a special token. SentencePiece, and so llama.cpp, puts its dummy-prefix
    space before it anyway; HF's fast tokenizer (tokenizers' Metaspace) does not when the text already starts with
    a space. Such a text passes when llama.cpp's tokens equal HF's with that one space added (Ollama then sends one
    more space token than training saw there)."""
    texts = TOKENIZER_CORPUS + list(extra)
    bad, prefixed = [], []
    for text in texts:
        ours = list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))
        if ours == tokenizer(text, add_special_tokens=False)["input_ids"]:
            continue
        spaced = _dummy_prefixed(tokenizer, text)
        if spaced != text and ours == tokenizer(spaced, add_special_tokens=False)["input_ids"]:
            prefixed.append(text)
        else:
            bad.append(text)
    same = len(texts) - len(bad) - len(prefixed)
    detail = f"{same}/{len(texts)} texts tokenize identically"
    if prefixed:
        detail += (f", {len(prefixed)} more but for SentencePiece's dummy-prefix space before leading whitespace "
                   f"(e.g. {prefixed[0][:40]!r})")
    if bad:
        detail += f"; first mismatch: {bad[0]!r}"
    return check("tokenization", not bad, same + len(prefixed), detail)


def _dummy_prefixed(tokenizer, text: str) -> str:
    """`text` with one space added where SentencePiece's dummy prefix lands on whitespace: at the start, and after
    each special token, where the following text starts with whitespace."""
    import re

    specials = sorted({t for t in [*tokenizer.all_special_tokens, *tokenizer.get_added_vocab()] if t}, key=len,
                      reverse=True)
    if not specials:
        return " " + text if text[:1].isspace() else text
    parts = re.split("(" + "|".join(map(re.escape, specials)) + ")", text)
    return "".join(" " + p if i % 2 == 0 and p[:1].isspace() else p for i, p in enumerate(parts))


def last_logits(llm) -> np.ndarray:
    """The next-token logits after the last eval (llama-cpp-python keeps them only with logits_all)."""
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))


def greedy_ids(llm, prompt: list[int], max_new_tokens: int, stop: set[int], no_repeat_ngram: int = 0,
               reuse_prefix: bool = False, repeat_penalty: float = 1.0, repeat_last_n: int = 64,
               penalize_prompt: bool = True) -> tuple[list[int], float, float]:
    """llama.cpp greedy continuation of `prompt`: (tokens, seconds to first token, decode tokens/s). With
    `no_repeat_ngram`, a token that would repeat an n-gram of the continuation is skipped. With `repeat_penalty`
    (Ollama's and llama.cpp's PARAMETER of that name), the logit of every token among the last `repeat_last_n` of
    the context is divided by it when positive and multiplied when negative, as llama.cpp's penalties sampler does,
    before the greedy choice; the prompt's tokens count, as in Ollama's runner, which feeds them to that sampler
    (`penalize_prompt=False`: only the answer's, as llama-cpp-python's `generate`). With `reuse_prefix`, the
    KV cache of the tokens `prompt` shares with what the context last held (a persona, few-shot examples) is kept
    and only the rest is evaluated, as llama-cpp-python's own `generate` does (`eval` drops the cache from
    `n_tokens` on); the time to first token then measures the rest only."""
    from tasks.models import common_prefix

    kept = 0
    if reuse_prefix and llm.n_tokens > 0:
        kept = min(len(common_prefix([llm.input_ids[:llm.n_tokens].tolist(), prompt])), len(prompt) - 1)
    if kept > 0:
        llm.n_tokens = kept
    else:
        llm.reset()
    began = time.perf_counter()
    llm.eval(prompt[kept:])
    out: list[int] = []
    first = time.perf_counter() - began
    decode_began = time.perf_counter()
    for _ in range(max_new_tokens):
        logits = last_logits(llm)
        banned = repeated_ngram_ends(out, no_repeat_ngram)
        if banned:
            logits = logits.copy()
            logits[sorted(banned)] = -np.inf
        if repeat_penalty != 1.0 and repeat_last_n != 0:
            context = (list(prompt) if penalize_prompt else []) + out
            recent = context[-repeat_last_n:] if repeat_last_n > 0 else context
            seen = np.fromiter(set(recent), dtype=np.int64)
            logits = logits.copy() if not banned else logits
            logits[seen] = np.where(logits[seen] > 0, logits[seen] / repeat_penalty, logits[seen] * repeat_penalty)
        token = int(np.argmax(logits))
        out.append(token)
        if token in stop:
            break
        llm.eval([token])
    decode = time.perf_counter() - decode_began
    return out, first, (len(out) / decode if decode > 0 else 0.0)


# Greedy decoding of two correct implementations parts at a near-tie: where HF's top two tokens are closer than
# the file's rounding moves a log-probability. A divergence there is a tie, not a fault.
NEAR_TIE_NATS = {"f32": 1e-3, "f16": 0.02}


def check_greedy(llm, model, tokenizer, prompts: list[list[int]], max_new_tokens: int, stop: set[int],
                 outtype: str = "f16") -> dict[str, Any]:
    """HF's greedy tokens (models.greedy_answers, one prompt at a time) against llama.cpp's on the full-precision
    file. A prompt passes when the tokens are identical, or part only at a near-tie: HF's log-probability of its own
    token exceeds that of llama.cpp's choice by at most NEAR_TIE_NATS for the file type (a broken file parts at a
    clear choice)."""
    import torch

    from tasks.models import greedy_answers

    if not prompts:  # nothing compared is not a pass: the gate counts "not run" as not passed
        return check("greedy", None, 0, "not run: no prompts to compare")
    tolerance = NEAR_TIE_NATS[outtype]
    same, ties, bad = 0, [], []
    for number, prompt in enumerate(prompts, 1):
        hf = greedy_answers(model, tokenizer, [prompt], max_new_tokens)[0]
        hf = hf[:min(answer_length(hf, stop) + 1, len(hf))]  # up to and including the stop token
        ours, _, _ = greedy_ids(llm, prompt, len(hf), stop)
        if ours == hf:
            same += 1
            continue
        at = next((i for i, (a, b) in enumerate(zip(ours, hf)) if a != b), min(len(ours), len(hf)))
        gap = None
        if at < min(len(ours), len(hf)):
            with torch.no_grad():
                lp = model(torch.tensor([prompt + hf[:at]])).logits[0, -1].double().log_softmax(-1)
            gap = float(lp[hf[at]] - lp[ours[at]])
        where = f"prompt {number} parts at generated token {at + 1}"
        if gap is not None and gap <= tolerance:
            ties.append(f"{where}, a near-tie (HF prefers {tokenizer.decode([hf[at]])!r} over "
                        f"{tokenizer.decode([ours[at]])!r} by {gap:.4f} nats)")
        else:
            bad.append(where + (f" (HF prefers its token by {gap:.3f} nats)" if gap is not None else
                                " (one sequence ends first)"))
    detail = f"{same}/{len(prompts)} prompts give HF's greedy tokens ({max_new_tokens} tokens)"
    if ties:
        detail += f", {len(ties)} identical up to a near-tie (at most {tolerance:g} nats): " + "; ".join(ties)
    if bad:
        detail += "; " + "; ".join(bad)
    return check("greedy", not bad, same + len(ties), detail)


def check_template(template: str, tokenizer, frames: ChatFrames | None) -> dict[str, Any]:
    if frames is None:
        return check("template", False, detail="no template derived from the chat template")
    # A template that trims contents (Llama 3's `| trim`) is compared on what it gives the model: Go's text/template
    # has no trim, so Go renders the trimmed contents and the detail says where Ollama differs.
    conversations = ([[{**m, "content": m["content"].strip()} for m in c] for c in SAMPLE_CONVERSATIONS]
                     if frames.trims else SAMPLE_CONVERSATIONS)
    try:
        go = render_go(template, conversations)
    except TuneryError as e:
        return check("template", False, detail=str(e))
    same = sum(g == hf_render(tokenizer, c, frames) for g, c in zip(go, SAMPLE_CONVERSATIONS))
    detail = f"{same}/{len(go)} sample conversations render identically in Go and in the HF chat template"
    if frames.trims:
        detail += (" (the chat template trims whitespace around each message and Ollama's template cannot: compared "
                   "on trimmed messages; a message sent with surrounding whitespace keeps it in Ollama)")
    if frames.system == "none":
        detail += "; the chat template has no system role: a system prompt opens the first user message"
    elif frames.system in ("first", "last"):
        detail += f"; the system prompt goes into the {frames.system} user message, as the chat template puts it"
    return check("template", same == len(go), same, detail)


# What Ollama allocates when a Modelfile sets no num_ctx (its documented default).
OLLAMA_DEFAULT_NUM_CTX = 2048


def check_context(llm, template: str, prompts: list[str], system: str | None, parameters: dict[str, Any],
                  answer_tokens: int) -> dict[str, Any]:
    """Whether the Modelfile's num_ctx holds every eval prompt as Ollama renders it (system prompt included) plus
    `answer_tokens` to answer in. Ollama cuts a longer prompt silently, from the front, and the system prompt goes
    first."""
    if not prompts:
        return check("context", None, 0, "not run: no prompts to measure")
    num_ctx = int(parameters.get("num_ctx", OLLAMA_DEFAULT_NUM_CTX))
    source = "" if "num_ctx" in parameters else " (Ollama's default; the Modelfile sets none)"
    rendered = render_go(template, [conversation(system, p) for p in prompts])
    lengths = [len(llm.tokenize(t.encode("utf-8"), add_bos=llm._model.add_bos_token(), special=True))
               for t in rendered]
    longest = max(range(len(prompts)), key=lambda i: lengths[i])
    need = lengths[longest] + answer_tokens
    detail = (f"num_ctx {num_ctx}{source}; the longest eval prompt takes {lengths[longest]} tokens with the system "
              f"prompt, + {answer_tokens} to answer = {need}")
    if need > num_ctx:
        detail += (f": Ollama would cut {prompts[longest][:40]!r} from the front, system prompt first; raise "
                   "export.num_ctx or shorten the system prompt")
    return check("context", need <= num_ctx, float(need), detail)


def check_answers(llm, template: str, stops: list[str], prompts: list[str], system: str | None,
                  max_new_tokens: int, parameters: dict[str, Any] | None = None
                  ) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, str]]]:
    """Answer each prompt the way Ollama would with the Modelfile: the Go template renders it, llama.cpp tokenizes
    and decodes greedily (temperature 0), with the Modelfile's `repeat_penalty` and `repeat_last_n` where it sets
    them (else none), until a stop string. Returns (answers check, decode speed, samples)."""
    if not prompts:  # nothing answered is not a pass: the gate counts "not run" as not passed
        return (check("answers_stop", None, 0, "not run: no prompts to answer"),
                check("decode_tokens_per_s", None, None, "not run: no prompts to answer"), [])
    parameters = parameters or {}
    penalty, last_n = float(parameters.get("repeat_penalty", 1.0)), int(parameters.get("repeat_last_n", 64))
    rendered = render_go(template, [conversation(system, p) for p in prompts])
    stop_ids = {t for s in stops for t in llm.tokenize(s.encode(), add_bos=False, special=True)[:1]}
    samples, stopped, speeds = [], 0, []
    for prompt, text in zip(prompts, rendered):
        ids = llm.tokenize(text.encode("utf-8"), add_bos=llm._model.add_bos_token(), special=True)
        out, _, speed = greedy_ids(llm, ids, max_new_tokens, stop_ids, repeat_penalty=penalty,
                                   repeat_last_n=last_n)
        speeds.append(speed)
        ended = bool(out) and out[-1] in stop_ids
        stopped += ended
        answer = llm.detokenize(out[:-1] if ended else out).decode("utf-8", errors="replace").strip()
        samples.append({"prompt": prompt, "answer": answer})
    detail = (f"{stopped}/{len(prompts)} answers end at a stop token within {max_new_tokens} tokens (greedy"
              + (f", repeat_penalty {penalty:g} over the last {last_n} tokens, as the Modelfile sets)"
                 if penalty != 1.0 else ", no repeat penalty)"))
    speed = float(np.median(speeds)) if speeds else 0.0
    return (check("answers_stop", stopped == len(prompts), stopped, detail),
            check("decode_tokens_per_s", None, speed, "llama.cpp greedy decode at batch 1, median over prompts"),
            samples)
