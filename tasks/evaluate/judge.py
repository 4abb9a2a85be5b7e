"""A pairwise judge: which of two versions answers a held-out prompt better, asked twice with the order swapped.

The judge reads the prompt, the reference answer and the two answers (labelled A and B) and names the better one,
or a tie. Each pair is asked twice, the version's answer first and then second, because judges (small ones most of
all) favour a position. A pair is a win for the version when both orders prefer it, a loss when both prefer the
other, and a tie otherwise (the orders disagree, or the judge called a tie). Recorded on the newer version against
its parent:
- `judge_win_rate`: (wins + ties / 2) / pairs; 0.5 is no difference.
- `judge_agreement`: the share of pairs whose two orders agree (both prefer the same version, or both tie): how
  much the verdicts say about the answers rather than their positions. A rate at 0.5 with agreement near 0 means
  the judge only followed positions.

The judge (`eval.judge.model`) is a registered version (transformers), a local GGUF (llama.cpp), or an
OpenAI-compatible endpoint (`http://...`, such as Ollama's `/v1`). The local ones answer with the most likely of
the letters A, B and C after the question (so a small judge always answers); an endpoint's reply is read for the
first of them, and a reply without one counts as a tie.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.errors import TuneryError

SYSTEM = ("You are an impartial judge. You compare two answers to the same question and decide which one is "
          "better: more correct, more helpful, closer to the reference answer. Ignore the order of the answers "
          "and their length.")
QUESTION = ("Question: {prompt}\n\nReference answer: {reference}\n\nAnswer A: {a}\n\nAnswer B: {b}\n\n"
            "Which answer is better? Reply with one letter: A, B, or C for a tie.")
LETTERS = ("A", "B", "C")


class JudgeConfig(BaseModel):
    """Who judges the answers of a version against its parent's."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="NAME:N (a registered version, through transformers), a .gguf file (llama.cpp), "
                                   "or the base URL of an OpenAI-compatible endpoint (http://127.0.0.1:11434/v1).")
    endpoint_model: str | None = Field(None, description="The model name sent to an endpoint (Ollama's tag).")
    rows: int | None = Field(None, ge=1, description="Held-out prompts judged (default: every answered one).")
    reference: bool = Field(True, description="Show the judge the reference answer.")
    timeout_s: float = Field(120, gt=0, description="Seconds an endpoint may take per verdict.")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return {"model": v} if isinstance(v, str) else v

    @property
    def kind(self) -> str:
        if re.match(r"^https?://", self.model):
            return "endpoint"
        if self.model.endswith(".gguf"):
            return "gguf"
        return "version"


def question(prompt: str, reference: str | None, a: str, b: str) -> str:
    text = QUESTION.format(prompt=prompt, reference=reference or "(none)", a=a, b=b)
    return text if reference is not None else text.replace("Reference answer: (none)\n\n", "")


def first_letter(reply: str) -> str:
    """The verdict in an endpoint's reply: its first standalone A, B or C; a tie (C) when there is none."""
    found = re.search(r"\b([ABC])\b", reply)
    return found.group(1) if found else "C"


def judge_pairs(ask: Callable[[str], str], mine: list[dict[str, Any]], theirs: list[dict[str, Any]],
                reference: bool = True) -> list[dict[str, Any]]:
    """Verdicts on two versions' answers to the same prompts (matched by prompt, in `mine`'s order): each asked
    with `mine` first and then second; `ask(question) -> 'A' | 'B' | 'C'`. Returns {prompt, first, second,
    outcome}, where first/second name the winner of each order ('version', 'against', 'tie')."""
    by_prompt = {t["prompt"]: t for t in theirs}
    out = []
    for m in mine:
        t = by_prompt.get(m["prompt"])
        if t is None:
            continue
        ref = m["reference"] if reference else None
        first = {"A": "version", "B": "against", "C": "tie"}[ask(question(m["prompt"], ref, m["answer"],
                                                                         t["answer"]))]
        second = {"A": "against", "B": "version", "C": "tie"}[ask(question(m["prompt"], ref, t["answer"],
                                                                          m["answer"]))]
        outcome = "win" if first == second == "version" else "loss" if first == second == "against" else "tie"
        out.append({"prompt": m["prompt"], "first": first, "second": second, "outcome": outcome})
    return out


def rates(verdicts: list[dict[str, Any]]) -> dict[str, float]:
    """judge_win_rate (ties count half), judge_agreement (both orders name the same side), and the counts."""
    if not verdicts:
        return {}
    n = len(verdicts)
    wins = sum(v["outcome"] == "win" for v in verdicts)
    losses = sum(v["outcome"] == "loss" for v in verdicts)
    return {"judge_win_rate": (wins + (n - wins - losses) / 2) / n,
            "judge_agreement": sum(v["first"] == v["second"] for v in verdicts) / n,
            "judge_wins": float(wins), "judge_losses": float(losses), "judge_ties": float(n - wins - losses),
            "judge_pairs": float(n)}


# ---------------------------------------------------------------- the judges


def endpoint_judge(url: str, model: str | None, timeout_s: float) -> Callable[[str], str]:
    """An OpenAI-compatible chat endpoint as a judge (temperature 0, a few tokens)."""
    import httpx

    client = httpx.Client(timeout=timeout_s)

    def ask(text: str) -> str:
        body = {"model": model or "judge", "temperature": 0, "max_tokens": 8,
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]}
        try:
            reply = client.post(url.rstrip("/") + "/chat/completions", json=body)
            reply.raise_for_status()
            return first_letter(reply.json()["choices"][0]["message"]["content"] or "")
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
            raise TuneryError(f"judge endpoint {url}: {e}") from None

    return ask


def hf_judge(folder: str) -> Callable[[str], str]:
    """A transformers model as a judge: the likeliest of the letters after its chat template's generation prompt."""
    import torch

    from tasks.models import load_model, load_tokenizer, prompt_ids

    tokenizer, model = load_tokenizer(folder), load_model(folder)
    letters = [tokenizer(letter, add_special_tokens=False)["input_ids"][0] for letter in LETTERS]

    def ask(text: str) -> str:
        ids = prompt_ids(tokenizer, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}])
        with torch.inference_mode():
            logits = model(torch.tensor([ids])).logits[0, -1]
        return LETTERS[int(torch.argmax(logits[letters]))]

    return ask


def gguf_judge(path: str, threads: int | None = None) -> Callable[[str], str]:
    """A GGUF through llama.cpp as a judge: its own chat template (the file's), the likeliest of the letters."""
    import numpy as np

    from tasks.export.verify import last_logits, open_gguf

    llm = open_gguf(Path(path), n_ctx=4096, logits_all=True, threads=threads)
    letters = [llm.tokenize(letter.encode(), add_bos=False, special=False)[0] for letter in LETTERS]
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise TuneryError(f"{path}: the GGUF carries no chat template to ask it as a judge")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    render = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template).render

    def ask(text: str) -> str:
        prompt = render(messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
                        add_generation_prompt=True, bos_token="", eos_token="")
        llm.reset()
        llm.eval(llm.tokenize(prompt.encode(), add_bos=llm._model.add_bos_token(), special=True))
        return LETTERS[int(np.argmax(last_logits(llm)[letters]))]

    return ask


def make_judge(cfg: JudgeConfig, version_folder: str | None = None) -> Callable[[str], str]:
    if cfg.kind == "endpoint":
        return endpoint_judge(cfg.model, cfg.endpoint_model, cfg.timeout_s)
    if cfg.kind == "gguf":
        if not Path(cfg.model).is_file():
            raise TuneryError(f"eval.judge: {cfg.model}: no such GGUF file")
        return gguf_judge(cfg.model)
    return hf_judge(version_folder)


def _judge(spec: dict[str, Any]) -> dict[str, Any]:
    cfg = JudgeConfig(**spec["config"])
    ask = make_judge(cfg, spec.get("folder"))
    mine = spec["mine"][:cfg.rows] if cfg.rows else spec["mine"]
    return {"verdicts": judge_pairs(ask, mine, spec["theirs"], cfg.reference)}


def run_judge(cfg: JudgeConfig, mine: list[dict], theirs: list[dict], folder: str | None = None
              ) -> list[dict[str, Any]]:
    """`judge_pairs` with the configured judge, in a child process (a local judge's model is loaded there)."""
    from tasks.child import run_child

    spec = {"config": cfg.model_dump(), "mine": mine, "theirs": theirs, "folder": folder}
    return run_child("tasks.evaluate.judge", spec, f"judging with {cfg.model}")["verdicts"]


if __name__ == "__main__":
    from tasks.child import child_main

    raise SystemExit(child_main(_judge))
