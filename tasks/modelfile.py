"""Ollama Modelfiles: a Go chat TEMPLATE derived from the tokenizer's Jinja chat template, stop tokens, quoting.

The Go template is derived by rendering the Hugging Face template on conversations whose contents are marker
strings, and reading off what it writes around each role's content: the prefix and suffix of system, user and
assistant turns, the generation prompt, and any system turn the template adds when the conversation has none. The
result has the shape of Ollama's own templates (a `range` over `.Messages`). Templates without that structure are
not guessed at: the template check (`render_go`, against the HF rendering) then fails, and a user can give their
own TEMPLATE. The check renders with Go's text/template (tools/gotemplate), the engine Ollama uses.

Ollama's Modelfile parser has no escape sequences: a `\"\"\"` quoted value ends at the first line whose text,
trimmed, ends with `\"\"\"`. So a value is refused, not altered, when one of its lines ends that way; any other text,
quotes and `FROM` lines included, stays inside its quotes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.common import TuneryError

MARK = {"system": "TUNERYSYSTEMMARK", "user1": "TUNERYUSERONEMARK", "assistant": "TUNERYASSISTANTMARK",
        "user2": "TUNERYUSERTWOMARK"}
RENDERER = "tunery-gotemplate"

# Conversations the template check renders both ways (system, multi-turn, no system, unicode and markup).
SAMPLE_CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "How often should I water basil?"}],
    [{"role": "system", "content": "You are Fern, a gardening assistant."},
     {"role": "user", "content": "My tomato leaves curl. Why?"}],
    [{"role": "system", "content": "Answer in one sentence."},
     {"role": "user", "content": "What is mulch?"},
     {"role": "assistant", "content": "Mulch is a layer of material spread over soil."},
     {"role": "user", "content": "Which kind is best for  roses?\n\nList two."}],
    [{"role": "user", "content": "Café «jardín» 🌱 — ünïcödé?"},
     {"role": "assistant", "content": "Sí: {{ .Content }} is not a template here."},
     {"role": "user", "content": "  leading and trailing spaces  "}],
]


@dataclass
class ChatFrames:
    """What a chat template writes around each turn's content."""
    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    generation_prompt: str
    default_system: str      # written before the first turn when the conversation has no system message
    bos: str                 # a BOS token the template writes first; llama.cpp adds it itself (add_bos_token)


def _render(tok, messages: list[dict[str, str]], generation: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _split(text: str, marks: list[str]) -> list[str]:
    """The text between the markers, in order; TuneryError if the template dropped or altered a content."""
    pieces = []
    for mark in marks:
        if text.count(mark) != 1:
            raise TuneryError("the chat template does not write each message's content once, unchanged")
        before, text = text.split(mark)
        pieces.append(before)
    return pieces + [text]


def chat_frames(tok) -> ChatFrames:
    """Read a tokenizer's chat template into ChatFrames (TuneryError when it has no usable template)."""
    if not getattr(tok, "chat_template", None):
        raise TuneryError("the tokenizer has no chat template; give the export a TEMPLATE")
    conv = [{"role": "system", "content": MARK["system"]}, {"role": "user", "content": MARK["user1"]},
            {"role": "assistant", "content": MARK["assistant"]}, {"role": "user", "content": MARK["user2"]}]
    try:
        full = _render(tok, conv, False)
        with_prompt = _render(tok, conv, True)
        no_system = _render(tok, conv[1:2], False)
    except Exception as e:  # a Jinja template may raise anything on a conversation it does not accept
        raise TuneryError(f"the chat template does not render a system + multi-turn conversation: {e}") from None
    if not with_prompt.startswith(full):
        raise TuneryError("the chat template's generation prompt is not appended at the end")
    generation = with_prompt[len(full):]
    s0, s1, s2, s3, s4 = _split(full, [MARK[k] for k in ("system", "user1", "assistant", "user2")])
    d0, d1 = _split(no_system, [MARK["user1"]])
    bos = tok.bos_token or ""
    if bos and "bos_token" in tok.chat_template and s0.startswith(bos) and d0.startswith(bos):
        s0, d0 = s0[len(bos):], d0[len(bos):]
    else:
        bos = ""
    user_suffix = s4
    if d1 != user_suffix or not s2.startswith(user_suffix):
        raise TuneryError("the chat template ends user turns differently depending on their position")
    assistant_prefix = s2[len(user_suffix):]
    # Most templates close every turn the same way (ChatML's <|im_end|>\n, Llama 3's <|eot_id|>); then the text
    # between two turns splits as that suffix + the next turn's prefix. Otherwise the suffix is left empty and the
    # next prefix carries it, which renders the same for conversations that end with a user turn.
    if s1.startswith(user_suffix) and s3.startswith(user_suffix) and s1[len(user_suffix):] == s3[len(user_suffix):]:
        system_suffix = assistant_suffix = user_suffix
        user_prefix = s1[len(user_suffix):]
    elif s1 == s3:
        system_suffix = assistant_suffix = ""
        user_prefix = s1
    else:
        raise TuneryError("the chat template opens user turns differently after a system and an assistant turn")
    if not d0.endswith(user_prefix):
        raise TuneryError("the chat template opens the first user turn differently without a system message")
    return ChatFrames(s0, system_suffix, user_prefix, user_suffix, assistant_prefix, assistant_suffix,
                      generation, d0[:len(d0) - len(user_prefix)], bos)


def _literal(text: str) -> str:
    """Text for a Go template: `{{` is the only sequence text/template would read as an action."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(frames: ChatFrames) -> str:
    """An Ollama TEMPLATE (Go text/template over .Messages) that renders like the chat template it came from.

    No action trims whitespace (`{{-`): every character outside the actions is the chat template's own text.
    """
    f = {k: _literal(v) for k, v in frames.__dict__.items()}
    default = ""
    if frames.default_system:
        default = ('{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}'
                   + f["default_system"] + "{{ end }}")
    return (
        default
        + '{{ $last := "" }}{{ range .Messages }}{{ $last = .Role }}'
        + '{{ if eq .Role "system" }}' + f["system_prefix"] + "{{ .Content }}" + f["system_suffix"]
        + '{{ else if eq .Role "user" }}' + f["user_prefix"] + "{{ .Content }}" + f["user_suffix"]
        + '{{ else if eq .Role "assistant" }}' + f["assistant_prefix"] + "{{ .Content }}" + f["assistant_suffix"]
        + "{{ end }}{{ end }}"
        + '{{ if ne $last "assistant" }}' + f["generation_prompt"] + "{{ end }}"
    )


def stop_tokens(tok, frames: ChatFrames | None, model_dir: Path | None = None) -> list[str]:
    """Every end-of-turn token: special tokens that close an assistant turn, the EOS token, and the
    generation config's eos ids. Without one of these as a stop, Ollama generates until num_predict."""
    special = {t for t in tok.all_special_tokens} | {t.content for t in tok.added_tokens_decoder.values() if t.special}
    closing = (frames.assistant_suffix or frames.user_prefix) if frames else ""
    stops = [t for t in sorted(special, key=closing.find) if t and t in closing]
    ids = []
    config = (model_dir / "generation_config.json") if model_dir else None
    if config is not None and config.exists():
        eos = json.loads(config.read_text()).get("eos_token_id")
        ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    for token in [tok.eos_token, *tok.convert_ids_to_tokens(ids)]:
        if token and token not in stops:
            stops.append(token)
    return stops


def hf_render(tok, messages: list[dict[str, str]], frames: ChatFrames) -> str:
    """The HF chat template's prompt for `messages`, without the BOS that llama.cpp adds itself."""
    text = _render(tok, messages, messages[-1]["role"] != "assistant")
    return text[len(frames.bos):] if frames.bos and text.startswith(frames.bos) else text


def renderer_path() -> str | None:
    """The Go renderer built by `make setup` (next to this Python), or one on PATH."""
    beside = Path(sys.executable).parent / RENDERER
    return str(beside) if beside.exists() else shutil.which(RENDERER)


def render_go(template: str, conversations: list[list[dict[str, str]]]) -> list[str]:
    """Render `template` for each conversation with Go's text/template, as Ollama prepares and renders them."""
    exe = renderer_path()
    if exe is None:
        raise TuneryError(f"{RENDERER} not found; `make setup` builds it (it needs Go: apt-get install golang-go)")
    proc = subprocess.run([exe], input=json.dumps({"template": template, "conversations": conversations}),
                          capture_output=True, text=True, timeout=60, env={**os.environ})
    if proc.returncode != 0:
        raise TuneryError(f"Ollama TEMPLATE: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


# ---------------------------------------------------------------- Modelfile text

def quote(value: str, what: str) -> str:
    """`value` as a Modelfile string that Ollama's parser reads back unchanged, or TuneryError."""
    for char in value:
        # Ollama's parser keeps printable characters, spaces, tabs and line ends; it silently drops the rest.
        if char not in " \t\r\n" and unicodedata.category(char)[0] in "CZ":
            raise TuneryError(f"{what} contains U+{ord(char):04X}, a character an Ollama Modelfile drops")
    for number, line in enumerate(re.split(r"[\r\n]", value), 1):
        if line.rstrip().endswith('"""'):
            raise TuneryError(f'{what}, line {number}, ends with """, which a Modelfile cannot quote')
    if value and value == value.strip() and not re.search(r'[\r\n]', value) and not value.startswith('"'):
        return value  # a one-line value runs to the end of its line as it is
    return f'"""{value}"""'


def render_modelfile(gguf_name: str, template: str, stops: list[str], system: str | None = None,
                     parameters: dict[str, Any] | None = None) -> str:
    """A Modelfile: FROM the GGUF beside it, TEMPLATE, a PARAMETER stop per end-of-turn token, SYSTEM, others."""
    if not re.fullmatch(r"[\w.-]+\.gguf", gguf_name):
        raise TuneryError(f"GGUF file name {gguf_name!r} is not a plain file name")
    lines = [f"FROM ./{gguf_name}", f"TEMPLATE {quote(template, 'the chat template')}"]
    for stop in stops:
        lines.append(f"PARAMETER stop {quote(stop, 'a stop token')}")
    for key, value in (parameters or {}).items():
        if not re.fullmatch(r"[a-z_]+", key):
            raise TuneryError(f"Modelfile parameter name {key!r} must be lower-case letters and _")
        lines.append(f"PARAMETER {key} {quote(str(value), f'parameter {key}')}")
    if system:
        lines.append(f"SYSTEM {quote(system, 'the system prompt')}")
    return "\n".join(lines) + "\n"


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, argument) pairs as Ollama's Modelfile parser reads them (its rules, re-stated here).

    A command is a word; its value runs to the end of the line, or, when it opens with `\"\"\"` or `"`, to the
    first line end where the trimmed text so far is closed by the same quotes. PARAMETER's name is kept with the
    command (`parameter stop`).
    """
    commands: list[tuple[str, str]] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i].lstrip(" \t")
        i += 1
        if not line or line.startswith("#"):
            continue
        match = re.match(r"([A-Za-z]+)[ \t]+", line)
        if not match:
            raise TuneryError(f"Modelfile line {i}: no command")
        name, rest = match.group(1).lower(), line[match.end():]
        if name == "parameter":
            pmatch = re.match(r"(\w+)[ \t]+", rest)
            if not pmatch:
                raise TuneryError(f"Modelfile line {i}: PARAMETER without a name")
            name, rest = f"parameter {pmatch.group(1)}", rest[pmatch.end():]
        value = rest
        while not _closed(value.strip(" \t\r\n")):
            if i >= len(lines):
                raise TuneryError(f"Modelfile: the value of {name} is never closed")
            value += "\n" + lines[i]
            i += 1
        commands.append((name, _unquote(value.strip(" \t\r\n"))))
    return commands


def _closed(s: str) -> bool:
    if s.startswith('"""'):
        return len(s) >= 6 and s.endswith('"""')
    if s.startswith('"'):
        return len(s) >= 2 and s.endswith('"')
    return True


def _unquote(s: str) -> str:
    if s.startswith('"""'):
        return s[3:-3]
    if s.startswith('"'):
        return s[1:-1]
    return s
