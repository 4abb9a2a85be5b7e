"""What both distill stages are set with, and how their prompts and rows are built from the data."""
from __future__ import annotations

import re
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.errors import TuneryError
from tasks.data.prep import split
from tasks.models import conversation, prompt_ids
from tasks.stages.sft import SftConfig

Context = list[dict[str, str]]  # a conversation that ends with the user turn the teacher answers
SENTENCE_END = re.compile(r"[.!?…][\"')\]]*(?=\s)|\n")


class Answer(NamedTuple):
    text: str       # up to the end-of-turn token, special tokens removed, stripped
    finished: bool  # the teacher ended its turn (False: cut at max_new_tokens)


class DistillSettings(SftConfig):
    """What both distillation stages share: where the prompts come from and how the teacher answers them; the
    student is then trained with these sft hyperparameters."""

    prompts: list[str] | None = Field(None, min_length=2, description="User prompts for the teacher; default: the "
                                      "user turns of the stage's chat data (its held-out rows stay held out).")
    val_fraction: float = Field(0.15, gt=0, lt=1, description="Share of `prompts` held out to measure the student "
                                                              "(with the data's prompts, the data's own split).")
    max_new_tokens: int = Field(256, ge=1, le=4096, description="Longest teacher answer, in tokens.")
    generation_batch_size: int = Field(8, ge=1, description="Prompts answered at once by HF generation.")
    no_repeat_ngram: int = Field(4, ge=0, description="Greedy answers of small models loop: a token that would repeat "
                                 "an n-gram of the answer so far is skipped (0: off). Only the answer counts, so it "
                                 "may still quote the system prompt.")
    unfinished: Literal["trim", "keep", "drop"] = Field(
        "trim", description="A teacher answer still going at max_new_tokens: trim it back to its last full sentence, "
                            "keep it cut mid-sentence, or drop it. A student learns to stop where its answers stop.")
    teacher_backend: Literal["auto", "hf", "llama.cpp"] = Field(
        "auto", description="auto: llama.cpp on the teacher's GGUF export when one passed its checks, else HF "
                            "generation; llama.cpp: such an export is required.")
    teacher_allow_failed_export: bool = Field(
        False, description="Let the teacher answer through a GGUF export whose llama.cpp checks failed (when no "
                           "export passed); the version records the file and the checks that failed.")


class Exchange(BaseModel):
    """One example exchange of a few-shot prompt."""

    model_config = ConfigDict(extra="forbid")

    user: str = Field(min_length=1)
    assistant: str = Field(min_length=1)


class DistillPromptConfig(DistillSettings):
    """System-prompt distillation: the student learns to answer without the long prompt as the teacher does with it."""

    system: str = Field(min_length=1, description="The long system prompt (persona, rules) the teacher answers with.")
    examples: list[Exchange] = Field(default_factory=list, description="Example exchanges the teacher sees as earlier "
                                     "turns after the system prompt (few-shot; small models follow examples better "
                                     "than rules). Part of the long prompt the student learns to do without.")
    student_system: str | None = Field(None, description="The student's short system prompt; default: none.")
    teacher: str | None = Field(None, description="Who answers: 'base', an earlier stage's id, NAME:N, or a local "
                                                  "model folder (a path with '/'); default: the model the stage "
                                                  "starts from.")

    @model_validator(mode="after")
    def _shorter(self) -> "DistillPromptConfig":
        if self.student_system is not None and len(self.student_system) >= len(self.system):
            raise ValueError("student_system must be shorter than system: the point is to drop tokens")
        return self


class DistillModelConfig(DistillSettings):
    """Teacher-to-student distillation: a smaller student (the model the stage starts from) learns the teacher's
    answers to the data's conversations, system prompts included."""

    teacher: str = Field(description="The bigger model: 'base', an earlier stage's id, NAME:N, or a local model "
                                     "folder (a path with '/').")
    preference_pairs: bool = Field(False, description="Also write pairs (teacher answer chosen, the student's own "
                                                      "answer rejected) for a later dpo stage's `pairs_from`.")


# ---------------------------------------------------------------- prompts and rows


def with_system(context: Context, system: str | None) -> Context:
    """The conversation with its system turns replaced by `system` (or removed when None)."""
    return conversation(system, "")[:-1] + [m for m in context if m["role"] != "system"]


def contexts_of(rows: list[dict[str, Any]]) -> list[Context]:
    """The conversation before each chat row's last assistant answer: what the teacher is asked."""
    out = []
    for row in rows:
        messages = row["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        out.append([dict(m) for m in messages[:last]])
    return out


def prompt_contexts(config: DistillSettings, rows: tuple[list[dict], list[dict]] | None
                    ) -> tuple[list[Context], list[Context]]:
    """(training, held-out) contexts: `prompts` split by content hash, else the chat data's own split."""
    if config.prompts:
        train, held = split([{"prompt": p} for p in dict.fromkeys(config.prompts)], config.val_fraction)
        return [conversation(None, r["prompt"]) for r in train], [conversation(None, r["prompt"]) for r in held]
    if rows is None:
        raise TuneryError("distillation needs prompts: give the stage `prompts:` or chat data")
    return contexts_of(rows[0]), contexts_of(rows[1])


def settle(answer: Answer, unfinished: str) -> str:
    """The text a student learns from an answer: a finished one verbatim; a cut one as `unfinished` says (trimmed
    to its last sentence end, kept, or dropped: an empty text)."""
    if answer.finished or unfinished == "keep":
        return answer.text
    if unfinished == "drop":
        return ""
    ends = [m.end() for m in SENTENCE_END.finditer(answer.text + " ")]
    return answer.text[:ends[-1]].strip() if ends else ""


def distill_rows(contexts: list[Context], answers: list[str]) -> list[dict[str, Any]]:
    """Chat rows for the student: each context with the teacher's answer, verbatim; empty answers teach nothing."""
    if len(contexts) != len(answers):
        raise TuneryError(f"{len(contexts)} prompts but {len(answers)} teacher answers")
    return [{"messages": context + [{"role": "assistant", "content": answer}]}
            for context, answer in zip(contexts, answers) if answer]


def prompt_lengths(tokenizer, config: DistillPromptConfig, context: Context) -> tuple[int, int]:
    """Prompt tokens of a request under the teacher's long prompt and under the student's short one."""
    return (len(prompt_ids(tokenizer, teacher_contexts(config, [context])[0])),
            len(prompt_ids(tokenizer, student_contexts(config, [context])[0])))


def prompt_tokens_saved(tokenizer, config: DistillPromptConfig, context: Context) -> int:
    """Prompt tokens a request saves when the student's short prompt replaces the teacher's long one."""
    long, short = prompt_lengths(tokenizer, config, context)
    return long - short


def teacher_contexts(config: DistillSettings, contexts: list[Context]) -> list[Context]:
    """What the teacher is asked: for distill-prompt, its system prompt and example exchanges, then the user's
    conversation without its own system turn; for distill-model, the conversation as it is."""
    if not isinstance(config, DistillPromptConfig):
        return contexts
    shots = [{"role": role, "content": text} for e in config.examples
             for role, text in (("user", e.user), ("assistant", e.assistant))]
    return [with_system(shots + c, config.system) for c in contexts]


def student_contexts(config: DistillSettings, contexts: list[Context]) -> list[Context]:
    if isinstance(config, DistillPromptConfig):
        return [with_system(c, config.student_system) for c in contexts]
    return contexts
