"""Distillation data (issue 8, first part): a teacher's answers, and the training rows a student learns them from.

System-prompt distillation asks the teacher with the long system prompt and trains the student on the same answers
with a short system prompt, or none: the student learns to behave as if the long prompt were there, and every
request stops paying for its tokens. Teacher answers are greedy and kept verbatim.

Not a stage yet: the `distill-prompt` / `distill-model` stages, their metrics and the demo story come next.
"""
from __future__ import annotations

from typing import Any

from tasks.common import TuneryError
from tasks.models import answer_length, conversation, prompt_ids, turn_end_ids


def teacher_answers(model, tokenizer, system: str | None, prompts: list[str], max_new_tokens: int = 256,
                    batch_size: int = 8) -> list[str]:
    """Greedy answers of `model` to each prompt under `system`, batched with left padding; the text up to the
    end-of-turn token, special tokens removed, otherwise verbatim."""
    import torch

    if not prompts:
        raise TuneryError("no prompts to ask the teacher")
    device = next(model.parameters()).device
    stop = turn_end_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = [prompt_ids(tokenizer, conversation(system, p)) for p in prompts[start:start + batch_size]]
        width = max(len(ids) for ids in batch)
        ids = torch.tensor([[pad] * (width - len(b)) + b for b in batch], device=device)
        mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch], device=device)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad)[:, width:].tolist()
        for generated in out:
            answers.append(tokenizer.decode(generated[:answer_length(generated, stop)], skip_special_tokens=True)
                           .strip())
    return answers


def distill_rows(prompts: list[str], answers: list[str], student_system: str | None) -> list[dict[str, Any]]:
    """Chat rows for the student: its own (short or no) system prompt, the user turn, the teacher's answer."""
    if len(prompts) != len(answers):
        raise TuneryError(f"{len(prompts)} prompts but {len(answers)} teacher answers")
    rows = []
    for prompt, answer in zip(prompts, answers):
        if not answer:
            continue  # an empty answer teaches nothing
        rows.append({"messages": conversation(student_system, prompt) + [{"role": "assistant", "content": answer}]})
    return rows


def prompt_tokens_saved(tokenizer, teacher_system: str | None, student_system: str | None, prompt: str) -> int:
    """Prompt tokens a request saves when the student's system prompt replaces the teacher's."""
    return (len(prompt_ids(tokenizer, conversation(teacher_system, prompt)))
            - len(prompt_ids(tokenizer, conversation(student_system, prompt))))
