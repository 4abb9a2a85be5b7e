"""Modelfiles (issue 5): the Go TEMPLATE derived from a chat template renders, in Go's text/template, exactly what
the HF template renders; stop tokens; a SYSTEM prompt cannot add directives."""
from __future__ import annotations

import pytest

from core.errors import TuneryError
from tasks.export.modelfile import (SAMPLE_CONVERSATIONS, chat_frames, go_template, hf_render, parse_modelfile,
                                    render_go, render_modelfile, stop_tokens)
from tasks.models import load_tokenizer

LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# SmolLM2's own template: ChatML that writes a default system turn when the conversation has none.
DEFAULT_SYSTEM = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>'"
    " + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _tokenizer(tiny_model_dir, template: str | None = None):
    tok = load_tokenizer(str(tiny_model_dir))
    if template is not None:
        tok.chat_template = template
    return tok


@pytest.mark.parametrize("template", [None, DEFAULT_SYSTEM], ids=["chatml", "chatml-default-system"])
def test_chatml_modelfile_template_renders_like_the_hf_template(tiny_model_dir, template):
    tok = _tokenizer(tiny_model_dir, template)
    frames = chat_frames(tok)
    rendered = render_go(go_template(frames), SAMPLE_CONVERSATIONS)
    expected = [hf_render(tok, c, frames) for c in SAMPLE_CONVERSATIONS]
    assert rendered == expected
    assert expected[1].endswith("<|im_end|>\n<|im_start|>assistant\n")  # system, user, then the generation prompt
    assert ("SmolLM" in expected[0]) == (template is not None)       # a default system turn only when it has one
    assert "SmolLM" not in expected[1]                                 # ... and only without a system message
    assert stop_tokens(tok, frames) == ["<|im_end|>"]


def test_llama3_style_template_with_bos_and_trim(tiny_model_dir):
    """BOS written by the template is left to llama.cpp (add_bos); `| trim` of contents shows up as a mismatch."""
    tok = _tokenizer(tiny_model_dir, LLAMA3)
    frames = chat_frames(tok)
    assert frames.bos == tok.bos_token and frames.user_suffix == "<|eot_id|>"
    rendered = render_go(go_template(frames), SAMPLE_CONVERSATIONS)
    expected = [hf_render(tok, c, frames) for c in SAMPLE_CONVERSATIONS]
    assert rendered[:3] == expected[:3]
    # The last sample has a user turn with leading/trailing spaces, which this template trims and Go cannot know.
    assert rendered[3] != expected[3] and "  leading" in rendered[3] and "  leading" not in expected[3]


def test_a_template_that_drops_content_is_named(tiny_model_dir):
    tok = _tokenizer(tiny_model_dir, "{% for m in messages %}{{ m['role'] }}{% endfor %}")
    with pytest.raises(TuneryError, match="does not write each message's content once"):
        chat_frames(tok)


def test_go_template_keeps_literal_braces(tiny_model_dir):
    tok = _tokenizer(tiny_model_dir, CHATML_WITH_BRACES)
    frames = chat_frames(tok)
    conv = [[{"role": "user", "content": "hi"}]]
    assert render_go(go_template(frames), conv) == [hf_render(tok, conv[0], frames)]


CHATML_WITH_BRACES = (
    "{% for message in messages %}{{'{{<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_system_prompt_with_quotes_and_directives_cannot_inject():
    system = 'Say "hi" and \'bye\'.\nFROM /etc/passwd\nPARAMETER temperature 9\nTEMPLATE """{{ .Prompt }}\n"""x'
    text = render_modelfile("m.gguf", "{{ .Prompt }}", ["<|im_end|>"], system=system, parameters={"num_ctx": 2048})
    assert parse_modelfile(text) == [("from", "./m.gguf"), ("template", "{{ .Prompt }}"),
                                     ("parameter stop", "<|im_end|>"), ("parameter num_ctx", "2048"),
                                     ("system", system)]


@pytest.mark.parametrize("system, message", [
    ('Line one\nends with three quotes """\nmore', 'the system prompt, line 2, ends with """'),
    ('trailing quotes """   ', 'the system prompt, line 1, ends with """'),
    ("zero\u200bwidth", "contains U+200B"),
    ("bell\x07", "contains U+0007"),
])
def test_unquotable_system_prompts_are_refused(system, message):
    with pytest.raises(TuneryError, match=message.replace("+", r"\+")):
        render_modelfile("m.gguf", "{{ .Prompt }}", [], system=system)


def test_gguf_file_name_must_be_plain():
    with pytest.raises(TuneryError, match="not a plain file name"):
        render_modelfile("../x.gguf\nFROM evil", "t", [])
