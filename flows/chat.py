"""`tunery chat`: a conversation with a version, the way users try a fine-tune first.

Through its GGUF export with the Modelfile (what Ollama would serve: its TEMPLATE rendered with Go's text/template,
its stop tokens, SYSTEM and sampling PARAMETERs, with Ollama's defaults where it sets none) when there is one,
else through transformers with the tokenizer's chat template. Tokens are printed as they come, and each answer
ends with its length and decode speed.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, TextIO

import registry
from core.errors import TuneryError
from flows.inputs import adapter_base, model_folder
from registry import exports as export_store
from registry.records import Export
from tasks.export.modelfile import chat_frames, for_template, parse_modelfile, render_go
from tasks.models import load_model, load_tokenizer, prompt_ids, turn_end_ids

# Ollama's sampling defaults, used where a Modelfile sets no PARAMETER of that name.
OLLAMA_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "repeat_penalty": 1.1, "repeat_last_n": 64,
                   "num_ctx": 2048}
MAX_ANSWER_TOKENS = 512


@dataclass
class Target:
    """What a chat talks to: a version, and the export it answers through (None: transformers)."""

    version: registry.Version
    export: dict[str, Any] | None
    why: str  # how it was chosen, for the first line of the chat


def resolve(ref: str, backend: str = "auto") -> Target:
    """NAME@ALIAS (its export), or a version NAME:N / NAME (its newest export that passed its checks, else
    transformers). `backend` gguf or hf forces one (gguf: the newest export, even one whose checks failed, which
    the chat's first line then names); gguf without any export is an error."""
    if "@" in ref:
        name, alias = ref.split("@", 1)
        held = export_store.get_alias(name, alias)
        if held is None:
            raise TuneryError(f"{ref}: no such alias; `tunery show {name}` lists its aliases")
        version, export = registry.get_version(held.version), export_store.get_export(held.export_id)
        why = f"{ref} -> {export.export_id}"
    else:
        version = registry.get_version(ref)
        exports = [e for e in export_store.list_exports(version.version) if e.gguf.exists()]
        passed = [e for e in exports if e.passed]
        # auto talks to an export only when it passed its checks; asked for gguf, the newest one will do.
        export = passed[-1] if passed else exports[-1] if exports and backend == "gguf" else None
        why = f"{version.version}, export {export.export_id}" if export else f"{version.version}"
        if export is not None and not export.passed:
            failed = [c.name for c in export.checks if c.passed is False]
            why += f" (its checks failed: {', '.join(failed)})"
    if backend == "hf":
        return Target(version, None, f"{why} (transformers)")
    if backend == "gguf" and export is None:
        raise TuneryError(f"{version.version} has no GGUF export; `tunery export {version.version}` makes one, or "
                          "use --backend hf")
    if version.status != "ready":
        raise TuneryError(f"{version.version} is {version.status}; only ready versions can chat")
    return Target(version, export, why + ("" if export else " (transformers: no export that passed its checks)"))


@dataclass
class Answer:
    text: str = ""
    tokens: int = 0
    seconds: float = 0.0  # from the first token to the last

    @property
    def tokens_per_s(self) -> float:
        return (self.tokens - 1) / self.seconds if self.tokens > 1 and self.seconds > 0 else 0.0


@dataclass
class Settings:
    system: str | None = None
    temperature: float | None = None   # None: the Modelfile's, else Ollama's default
    seed: int = 0
    max_tokens: int = MAX_ANSWER_TOKENS
    parameters: dict[str, Any] = field(default_factory=dict)


class GgufChat:
    """Answers through llama.cpp on the export's GGUF, prompted by the Modelfile's Go TEMPLATE."""

    def __init__(self, export: Export, settings: Settings):
        from llama_cpp import Llama

        directives = parse_modelfile(export.modelfile)
        self.template = next(v for k, v in directives if k == "template")
        self.stops = [v for k, v in directives if k == "parameter stop"]
        params = {k.removeprefix("parameter "): v for k, v in directives if k.startswith("parameter ")
                  and k != "parameter stop"}
        self.default_system = next((v for k, v in directives if k == "system"), None)
        self.parameters = {**OLLAMA_DEFAULTS, **{k: float(v) for k, v in params.items()
                                                 if k in OLLAMA_DEFAULTS}}
        self.settings = settings
        self.llm = Llama(model_path=str(export.gguf),
                         n_ctx=int(self.parameters["num_ctx"]), verbose=False, seed=settings.seed)

    def answer(self, messages: list[dict[str, str]]) -> Iterator[str]:
        prompt = render_go(self.template, [messages])[0]
        ids = self.llm.tokenize(prompt.encode("utf-8"), add_bos=self.llm._model.add_bos_token(), special=True)
        temperature = self.settings.temperature
        if temperature is None:
            temperature = self.parameters["temperature"]
        stream = self.llm.create_completion(
            ids, max_tokens=self.settings.max_tokens, temperature=temperature, top_k=int(self.parameters["top_k"]),
            top_p=self.parameters["top_p"], repeat_penalty=self.parameters["repeat_penalty"], stop=self.stops,
            seed=self.settings.seed, stream=True)
        for chunk in stream:
            yield chunk["choices"][0]["text"]

    def count(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def close(self) -> None:
        self.llm.close()


class HfChat:
    """Answers through transformers with the tokenizer's chat template."""

    def __init__(self, version: registry.Version, settings: Settings):
        self.settings = settings
        self.default_system = None
        folder = adapter_base(version) if version.adapter else model_folder(version)
        self.tokenizer = load_tokenizer(version.artifact_path if version.adapter else folder)
        try:
            self.frames = chat_frames(self.tokenizer)
        except TuneryError:
            self.frames = None  # the template is used as it is
        self.model = load_model(folder, adapter=version.artifact_path if version.adapter else None,
                                merge=version.adapter)

    def answer(self, messages: list[dict[str, str]]) -> Iterator[str]:
        import torch
        from transformers import TextIteratorStreamer

        ids = torch.tensor([prompt_ids(self.tokenizer, for_template(messages, self.frames))])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        temperature = 0.8 if self.settings.temperature is None else self.settings.temperature
        torch.manual_seed(self.settings.seed)
        kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=self.settings.max_tokens,
                      eos_token_id=sorted(turn_end_ids(self.tokenizer)), streamer=streamer,
                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                      do_sample=temperature > 0, **({"temperature": temperature} if temperature > 0 else {}))
        worker = threading.Thread(target=self.model.generate, args=(ids,), kwargs=kwargs, daemon=True)
        worker.start()
        yield from streamer
        worker.join()

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def close(self) -> None:
        pass


HELP = "/reset forgets the conversation, /system TEXT sets the system prompt (empty: none), /quit ends"


def converse(target: Target, settings: Settings, read: Callable[[], str | None], out: TextIO) -> int:
    """The chat loop: read a line (None at end of input), answer it streaming to `out`; return the turns answered."""
    engine = GgufChat(target.export, settings) if target.export else HfChat(target.version, settings)
    system = settings.system if settings.system is not None else engine.default_system
    messages: list[dict[str, str]] = []
    turns = 0
    out.write(f"chatting with {target.why}; {HELP}\n")
    try:
        while True:
            line = read()
            if line is None or line.strip() == "/quit":
                break
            line = line.rstrip("\n")
            if line.strip() == "/reset":
                messages = []
                out.write("(conversation reset)\n")
                continue
            if line.startswith("/system"):
                system = line[len("/system"):].strip() or None
                messages = []
                out.write(f"(system prompt {'set' if system else 'removed'}; conversation reset)\n")
                continue
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            conversation = ([{"role": "system", "content": system}] if system else []) + messages
            answer = Answer()
            began = None
            for piece in engine.answer(conversation):
                if began is None:
                    began = time.perf_counter()
                answer.text += piece
                out.write(piece)
                out.flush()
            answer.seconds = time.perf_counter() - began if began else 0.0
            answer.tokens = engine.count(answer.text)
            messages.append({"role": "assistant", "content": answer.text.strip()})
            turns += 1
            out.write(f"\n[{answer.tokens} tokens, {answer.tokens_per_s:.1f} tokens/s]\n")
            out.flush()
    finally:
        engine.close()
    return turns
