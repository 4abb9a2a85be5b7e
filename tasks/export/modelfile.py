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

from core.errors import TuneryError

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
    # Where a system message goes: "turn" (a turn of its own), "first" / "last" (inside the first / last user
    # turn, before its content, then `system_join`), or "none": the template refuses system messages, so tunery
    # puts the system prompt into the first user turn the way templates that fold it do ("first", joined by a
    # blank line), for the HF reference as for the Go TEMPLATE.
    system: str = "turn"
    system_join: str = ""
    trims: bool = False      # the template strips whitespace around each content (`| trim`)


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


def _renders(tok, conv: list[dict[str, str]]) -> tuple[str, str] | None:
    """(without, with) the generation prompt, or None when the template refuses the conversation."""
    try:
        return _render(tok, conv, False), _render(tok, conv, True)
    except Exception:  # a Jinja template may raise anything on a conversation it does not accept
        return None


def _generation(tok, full: str, with_prompt: str) -> tuple[str, str]:
    """(the conversation as both renderings share it, the generation prompt). A template may end a conversation
    rendered without a generation prompt with EOS (Phi-3): that trailer is not part of any prompt."""
    for trailer in ("", tok.eos_token or ""):
        shared = full[:len(full) - len(trailer)] if trailer and full.endswith(trailer) else full
        if (not trailer or full.endswith(trailer)) and with_prompt.startswith(shared):
            return shared, with_prompt[len(shared):]
    raise TuneryError("the chat template's generation prompt is not appended at the end")


def chat_frames(tok) -> ChatFrames:
    """Read a tokenizer's chat template into ChatFrames (TuneryError when it has no usable template)."""
    if not getattr(tok, "chat_template", None):
        raise TuneryError("the tokenizer has no chat template; give the export a TEMPLATE")
    m = MARK
    system, user1, assistant, user2 = ({"role": r, "content": m[k]} for r, k in (
        ("system", "system"), ("user", "user1"), ("assistant", "assistant"), ("user", "user2")))
    no_system = _renders(tok, [user1])
    plain = _renders(tok, [user1, assistant, user2])
    if no_system is None or plain is None:
        raise TuneryError("the chat template does not render a user / assistant / user conversation")
    d0, d1 = _split(no_system[0], [m["user1"]])
    shared, generation = _generation(tok, *plain)
    p0, p1, p2, p3 = _split(shared, [m[k] for k in ("user1", "assistant", "user2")])
    bos = tok.bos_token or ""
    if bos and "bos_token" in tok.chat_template and p0.startswith(bos) and d0.startswith(bos):
        p0, d0 = p0[len(bos):], d0[len(bos):]
    else:
        bos = ""
    user_suffix = p3
    if d1 != user_suffix and not d1.startswith(user_suffix) or not p1.startswith(user_suffix):
        raise TuneryError("the chat template ends user turns differently depending on their position")
    assistant_prefix = p1[len(user_suffix):]
    # The text between an assistant turn and the next user turn: ChatML's <|im_end|>\n + <|im_start|>user\n. Most
    # templates close every turn the same way; then it splits as the user suffix + the next user prefix.
    # The first user turn may come after a default system turn (SmolLM2, Qwen2.5), so the user prefix is what the
    # text before the first and before the second user turn end with.
    if p2.startswith(user_suffix) and p0.endswith(p2[len(user_suffix):]) and len(p2) > len(user_suffix):
        assistant_suffix, user_prefix = user_suffix, p2[len(user_suffix):]
    else:
        user_prefix = os.path.commonprefix([p0[::-1], p2[::-1]])[::-1]
        if not user_prefix:
            raise TuneryError("the chat template opens user turns differently after an assistant turn")
        assistant_suffix = p2[:len(p2) - len(user_prefix)]
    if not d0.endswith(user_prefix):
        raise TuneryError("the chat template opens the first user turn differently after another turn")
    default_system = d0[:len(d0) - len(user_prefix)]
    frames = ChatFrames("", "", user_prefix, user_suffix, assistant_prefix, assistant_suffix, generation,
                        default_system, bos, trims=_trims(tok))
    _place_system(tok, frames, system, user1, assistant, user2)
    return frames


def _trims(tok) -> bool:
    try:
        text = _render(tok, [{"role": "user", "content": f"  {MARK['user1']}  "}], False)
    except Exception:
        return False
    return f"  {MARK['user1']}  " not in text and MARK["user1"] in text


def _place_system(tok, frames: ChatFrames, system, user1, assistant, user2) -> None:
    """Find where the template writes a system message: its own turn, or inside the first or last user turn."""
    m = MARK
    rendered = _renders(tok, [system, user1, assistant, user2])
    if rendered is None:  # no system role: tunery folds it into the first user turn, as Gemma 3's template does
        frames.system, frames.system_join = "none", "\n\n"
        return
    full = _generation(tok, *rendered)[0]
    if frames.bos and full.startswith(frames.bos):
        full = full[len(frames.bos):]
    order = sorted(("system", "user1", "assistant", "user2"), key=lambda k: full.find(m[k]))
    pieces = _split(full, [m[k] for k in order])
    f = frames
    if order == ["system", "user1", "assistant", "user2"]:
        s0, s1, s2, s3, s4 = pieces
        if s1 == "" or s0 == f.user_prefix and f.user_prefix:  # inside the first user turn
            if s0 != f.user_prefix:
                raise TuneryError("the chat template writes the system message where tunery cannot place it")
            f.system, f.system_join = "first", s1
        elif s1.endswith(f.user_prefix):
            f.system_prefix, f.system_suffix, f.system = s0, s1[:len(s1) - len(f.user_prefix)], "turn"
        else:
            raise TuneryError("the chat template opens the first user turn differently after a system turn")
        if s2 != f.user_suffix + f.assistant_prefix or s4 != f.user_suffix:
            raise TuneryError("the chat template writes turns differently when there is a system message")
    elif order == ["user1", "assistant", "system", "user2"]:  # inside the last user turn (Mistral)
        q0, q1, q2, q3, q4 = pieces
        if q0 != f.user_prefix or q2 != f.assistant_suffix + f.user_prefix or q4 != f.user_suffix:
            raise TuneryError("the chat template writes turns differently when there is a system message")
        f.system, f.system_join = "last", q3
    else:
        raise TuneryError("the chat template writes the system message where tunery cannot place it")


def _literal(text: str) -> str:
    """Text for a Go template: `{{` is the only sequence text/template would read as an action."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(frames: ChatFrames) -> str:
    """An Ollama TEMPLATE (Go text/template over .Messages) that renders like the chat template it came from.

    No action trims whitespace (`{{-`): every character outside the actions is the chat template's own text. A
    system prompt folded into a user turn comes from `.System` (Ollama joins the system messages into it).
    """
    f = {k: _literal(v) if isinstance(v, str) else v for k, v in frames.__dict__.items()}
    default = ""
    if frames.default_system:
        default = ('{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}'
                   + f["default_system"] + "{{ end }}")
    folded = ""
    if frames.system in ("first", "none"):
        folded = '{{ if and $first $.System }}{{ $.System }}' + (f["system_join"] or "") + "{{ end }}"
    elif frames.system == "last":
        folded = ('{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}' + f["system_join"]
                  + "{{ end }}")
    system = ('{{ if eq .Role "system" }}' + f["system_prefix"] + "{{ .Content }}" + f["system_suffix"] + "{{ else "
              if frames.system == "turn" else '{{ if eq .Role "system" }}{{ else ')
    return (
        default
        + '{{ $last := "" }}{{ $first := true }}{{ range $i, $m := .Messages }}{{ $last = .Role }}'
        + system + 'if eq .Role "user" }}' + f["user_prefix"] + folded + "{{ $first = false }}{{ .Content }}"
        + f["user_suffix"]
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
    """The HF chat template's prompt for `messages`, without the BOS that llama.cpp adds itself. For a template
    without a system role, the system prompt goes into the first user turn as tunery's Go TEMPLATE puts it."""
    messages = for_template(messages, frames)
    text = _render(tok, messages, messages[-1]["role"] != "assistant")
    return text[len(frames.bos):] if frames.bos and text.startswith(frames.bos) else text


def for_template(messages: list[dict[str, str]], frames: ChatFrames | None) -> list[dict[str, str]]:
    """The conversation as the chat template takes it: with the system prompt in the first user message where the
    template has no system role (as the Go TEMPLATE puts it)."""
    return fold_system(messages, frames.system_join) if frames is not None and frames.system == "none" else messages


def fold_system(messages: list[dict[str, str]], join: str = "\n\n") -> list[dict[str, str]]:
    """The conversation with its system messages moved into the first user message (`system + join + content`),
    for templates that have no system role."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    first = next((m for m in rest if m["role"] == "user"), None)
    if system and first is not None:
        first["content"] = system + join + first["content"]
    return rest


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
