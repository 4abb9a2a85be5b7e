"""`tunery chat` (issue 17): a conversation piped into the real command, through the export as Ollama would serve
it and through transformers; history, /reset, /system, /quit and end of input."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import registry
from flows import promotion
from tasks.evaluate.evaluation import EvalConfig
from tasks.export.settings import ExportConfig, GateConfig

EXPORT = ExportConfig(quant="f32", heldout_rows=4, max_new_tokens=8, answer_tokens=8, window=256)
ANSWERED = re.compile(r"\[(\d+) tokens, ([\d.]+) tokens/s\]")


@pytest.fixture
def registered(tiny_model_dir) -> str:
    """The tiny model registered as it is (no export)."""
    version = registry.create_version("tiny", "base")
    registry.finish_version(version, str(tiny_model_dir))
    return version


@pytest.fixture
def promoted(registered, prepared) -> str:
    """The tiny model registered and promoted to tiny@production (an f32 export that passed what it can)."""
    version = registered
    gate = GateConfig(require_checks=["modelfile", "loads", "tokenization", "template", "greedy"],
                      min_decode_tokens_per_s=0.0)
    result = promotion.promote(version, prepared, EXPORT, gate, ["How often should I water basil?"],
                               progress=lambda _: None, evals=EvalConfig(general=None, generation_rows=0))
    assert result["promoted"], result["gate"]
    return version


def _chat(args: list[str], conversation: str, tunery_home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", "chat", *args], input=conversation, text=True,
                          capture_output=True, timeout=300, env={**os.environ, "TUNERY_HOME": str(tunery_home)})


def test_chat_answers_a_piped_two_turn_conversation_through_the_export(promoted, tunery_home):
    done = _chat(["tiny@production", "--temperature", "0", "--max-tokens", "6"],
                 "How do I water basil?\nAnd tomatoes?\n/quit\nnever read\n", tunery_home)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stdout.startswith("chatting with tiny@production -> tiny/v1-f32;")
    speeds = ANSWERED.findall(done.stdout)
    assert len(speeds) == 2 and all(int(n) >= 1 for n, _ in speeds)  # two answers, then /quit
    # End of input without /quit ends the chat cleanly too. By version, auto uses an export only when it passed
    # every check (a random model's answers never stop): here transformers; --backend gguf names what failed.
    done = _chat([promoted, "--temperature", "0", "--max-tokens", "4"], "Hello?\n", tunery_home)
    assert done.returncode == 0 and len(ANSWERED.findall(done.stdout)) == 1, done.stderr[-2000:]
    assert done.stdout.startswith(f"chatting with {promoted} (transformers: no export that passed its checks);")
    done = _chat([promoted, "--backend", "gguf", "--temperature", "0", "--max-tokens", "4"], "Hello?\n", tunery_home)
    assert done.returncode == 0 and len(ANSWERED.findall(done.stdout)) == 1, done.stderr[-2000:]
    assert done.stdout.startswith(f"chatting with {promoted}, export tiny/v1-f32 (its checks failed: answers_stop);")


def test_chat_through_transformers_and_its_commands(registered, tunery_home):
    done = _chat([registered, "--backend", "hf", "--temperature", "0", "--max-tokens", "5"],
                 "Water?\n/reset\nWater?\n/system Be brief.\nWater?\n", tunery_home)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "(transformers)" in done.stdout.splitlines()[0]
    assert "(conversation reset)" in done.stdout and "(system prompt set; conversation reset)" in done.stdout
    answers = re.split(r"\n\[\d+ tokens, [\d.]+ tokens/s\]\n", done.stdout.split("\n", 1)[1])
    first, again = answers[0], answers[1].removeprefix("(conversation reset)\n")
    assert first == again  # greedy, and /reset forgot the first exchange


def test_the_conversation_keeps_its_history_and_the_system_prompt(promoted, monkeypatch):
    """Each turn is answered with every earlier turn and the system prompt, as the template renders them."""
    import io

    from flows import chat

    seen = []
    real = chat.GgufChat.answer

    def spy(self, messages):
        seen.append([dict(m) for m in messages])
        return real(self, messages)

    monkeypatch.setattr(chat.GgufChat, "answer", spy)
    lines = iter(["Hi", "/system Be brief.", "Water?", "And roses?"])
    out = io.StringIO()
    target = chat.resolve("tiny@production")
    turns = chat.converse(target, chat.Settings(temperature=0.0, max_tokens=3), lambda: next(lines, None), out)
    assert turns == 3
    assert [m["role"] for m in seen[2]] == ["system", "user", "assistant", "user"]
    assert seen[2][0]["content"] == "Be brief." and seen[2][1]["content"] == "Water?"
    pieces = re.split(r"\n\[\d+ tokens, [\d.]+ tokens/s\]\n", out.getvalue())
    second = pieces[1].removeprefix("(system prompt set; conversation reset)\n")
    assert seen[2][2]["content"] == second.strip()  # the answer it gave to "Water?"
    assert seen[0] == [{"role": "user", "content": "Hi"}]


def test_chat_names_what_it_cannot_find(registered, tunery_home):
    done = _chat(["tiny@staging"], "", tunery_home)
    assert done.returncode == 1 and "tiny@staging: no such alias" in done.stderr and "Traceback" not in done.stderr
    base = registry.create_version("other", "base")
    registry.finish_version(base, "/nowhere")
    done = _chat([base, "--backend", "gguf"], "", tunery_home)
    assert done.returncode == 1 and "other:1 has no GGUF export; `tunery export other:1` makes one" in done.stderr
