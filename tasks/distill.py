"""Stages `distill-prompt` and `distill-model`: a teacher answers the user's prompts, a student learns the answers.

distill-prompt bakes a long system prompt into the weights: the teacher (by default the model the stage starts
from) answers with the long prompt, the student is trained on the same answers with a short system prompt or none,
so every request stops paying for the long prompt's tokens. distill-model teaches a smaller student to answer like
a bigger teacher on the user's own prompts. Both train the student with `sft` (LoRA, full, ...) on the teacher's
greedy answers, kept verbatim (an answer cut at max_new_tokens is trimmed to its last sentence unless told
otherwise), and measure, on held-out prompts the student never trained on:

- the perplexity of the teacher's held-out answers under the teacher (with its prompt), under the start model
  before training, and under the student: how much of the teacher's behaviour the student took on;
- time to first token of the teacher (with its prompt) and the student (without), same machine, same prompts;
- distill-prompt: prompt tokens per request under each system prompt, and the difference (tokens saved);
- distill-model: decode speed of each and the parameter counts.

Teacher answers come from llama.cpp when the teacher has a GGUF export (the highest-precision one), else from
batched HF generation. The raw answers are cached by their inputs, so a retry of a failed training does not ask the
teacher again; the student's rows are prepared like any other data (content-addressed, split kept: answers to the
data's held-out prompts are the held-out answers).
"""
from __future__ import annotations

import json
import math
import re
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from core.errors import TuneryError
from core.files import sha256_json, write_json
from core.home import home
from tasks.common import StageResult, resolve_device, resolve_precision
from tasks.models import (answer_length, conversation, greedy_answers, load_model, load_tokenizer, prompt_ids,
                          turn_end_ids)
from tasks.prep import PrepConfig, load_prepared, prepare, split
from tasks.sft import SftConfig, train_sft
from tasks.stage import StageInputs, TrainingStage, is_path

Context = list[dict[str, str]]  # a conversation that ends with the user turn the teacher answers
LATENCY_PROMPTS = 3  # held-out prompts timed for time to first token (batch 1, median of the runs)
GENERATOR = 1  # bump when a change to how teachers answer should invalidate cached answers
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


# ---------------------------------------------------------------- the teacher


def teacher_answers(model, tokenizer, contexts: list[Context], max_new_tokens: int = 256, batch_size: int = 8,
                    no_repeat_ngram: int = 0, progress: bool = False) -> list[Answer]:
    """Greedy answers of `model` to each context, batched (`models.greedy_answers`: the same as one at a time)."""
    if not contexts:
        raise TuneryError("no prompts to ask the teacher")
    stop = turn_end_ids(tokenizer)
    generated = greedy_answers(model, tokenizer, [prompt_ids(tokenizer, c) for c in contexts], max_new_tokens,
                               batch_size, no_repeat_ngram, progress=progress, desc="teacher answers (HF)")
    return [_answer(tokenizer, g, stop) for g in generated]


def gguf_teacher_answers(gguf: Path, tokenizer, contexts: list[Context], max_new_tokens: int = 256,
                         no_repeat_ngram: int = 0, progress: bool = False) -> list[Answer]:
    """Greedy answers from llama.cpp on a GGUF export, prompted with the same chat-template tokens as HF; the KV
    cache of the prompt prefix the requests share (persona, examples) is computed once and kept."""
    from tasks.verify import greedy_ids, open_gguf

    stop = turn_end_ids(tokenizer)
    prompts = [prompt_ids(tokenizer, c) for c in contexts]
    llm = open_gguf(gguf, n_ctx=max(len(p) for p in prompts) + max_new_tokens + 1)
    try:
        return [_answer(tokenizer, greedy_ids(llm, p, max_new_tokens, stop, no_repeat_ngram, reuse_prefix=True)[0],
                        stop)
                for p in tqdm(prompts, desc="teacher answers (llama.cpp)", unit="prompt", disable=not progress)]
    finally:
        llm.close()


def _answer(tokenizer, generated: list[int], stop: set[int]) -> Answer:
    n = answer_length(generated, stop)
    return Answer(tokenizer.decode(generated[:n], skip_special_tokens=True).strip(), n < len(generated))


def _answers(config: DistillSettings, teacher: str, gguf: Path | None, contexts: list[Context], device: str
             ) -> list[Answer]:
    if gguf is not None:
        return gguf_teacher_answers(gguf, load_tokenizer(teacher), contexts, config.max_new_tokens,
                                    config.no_repeat_ngram, progress=True)
    model = load_model(teacher, device=device, precision=resolve_precision("auto", device))
    return teacher_answers(model, load_tokenizer(teacher), contexts, config.max_new_tokens,
                           config.generation_batch_size, config.no_repeat_ngram, progress=True)


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


def make_dataset(config: DistillSettings, teacher: str, gguf: Path | None, contexts: tuple[list, list],
                 student: str, device: str = "auto", key: dict[str, Any] | None = None) -> StageResult:
    """Ask the teacher (model folder `teacher`, or llama.cpp on `gguf`) to answer the training and held-out
    contexts, and prepare the student's chat rows as a dataset (rendered through the student's chat template).

    The teacher's raw answers are cached under TUNERY_HOME/cache/distill by `key` (the teacher's identity and
    everything else they depend on). The dataset's info records the teacher's backend, the generation time and how
    many answers were cut at max_new_tokens and then trimmed or dropped.
    """
    train, held = contexts
    if not held:
        raise TuneryError("no held-out prompts: the student cannot be measured; add prompts or validation rows")
    cache = home() / "cache" / "distill" / f"{sha256_json({**key, 'generator': GENERATOR})[:16]}.json" if key else None
    if cache is not None and cache.exists():
        cached = json.loads(cache.read_text())
        answers, generated = [Answer(*a) for a in cached["answers"]], cached["teacher"]
    else:
        began = time.perf_counter()
        answers = _answers(config, teacher, gguf, teacher_contexts(config, train + held), resolve_device(device))
        generated = {"teacher_backend": "llama.cpp" if gguf else "hf", "teacher_gguf": str(gguf) if gguf else None,
                     "generation_s": time.perf_counter() - began}
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_json(cache, {"answers": answers, "teacher": generated})
    texts = [settle(a, config.unfinished) for a in answers]
    rows = distill_rows(student_contexts(config, train + held), texts)
    n_train = sum(1 for t in texts[:len(train)] if t)
    if not n_train or len(rows) == n_train:
        raise TuneryError(f"no usable teacher answers for the training or the held-out prompts ({len(rows)} of "
                          f"{len(answers)} usable; unfinished: {config.unfinished}); raise max_new_tokens or set "
                          "unfinished: keep")
    data = prepare_rows(rows[:n_train], rows[n_train:], "chat", student)
    unfinished = sum(not a.finished for a in answers)
    info = {**generated, "answers": len(answers), "unfinished_answers": unfinished,
            "trimmed_answers": sum(bool(t) and t != a.text for a, t in zip(answers, texts)),
            "dropped_answers": len(answers) - len(rows)}
    return StageResult("prep", data.artifact_path, metrics=data.metrics, info={**data.info, **info})


def preference_pairs(config: DistillModelConfig, student: str, dataset: str, device: str = "auto") -> StageResult:
    """Pairs for dpo: the teacher's answer `chosen`, the student's own greedy answer (before distillation)
    `rejected`, on the distilled dataset's prompts and split. Pairs where both answers are equal are left out."""
    device = resolve_device(device)
    _, train, held = load_prepared(dataset)
    model = load_model(student, device=device, precision=resolve_precision("auto", device))
    tokenizer = load_tokenizer(student)
    parts = []
    for rows in (train, held):
        contexts = contexts_of(rows)
        own = [settle(a, config.unfinished) for a in teacher_answers(
            model, tokenizer, contexts, config.max_new_tokens, config.generation_batch_size, config.no_repeat_ngram,
            progress=True)]
        parts.append([{"prompt": c, "chosen": r["messages"][-1:], "rejected": [{"role": "assistant", "content": o}]}
                      for c, r, o in zip(contexts, rows, own) if o and o != r["messages"][-1]["content"]])
    if not parts[0] or not parts[1]:
        raise TuneryError("the student already answers like the teacher on the training or held-out prompts: no "
                          "preference pairs to write")
    return prepare_rows(parts[0], parts[1], "preference", student)


def prepare_rows(train: list[dict], held: list[dict], fmt: str, tokenizer_path: str) -> StageResult:
    """Generated rows prepared like a user's data files (checked, content-addressed), with the split given."""
    with tempfile.TemporaryDirectory(prefix="tunery-distill-") as tmp:
        for name, part in (("train", train), ("validation", held)):
            (Path(tmp) / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part),
                                                     encoding="utf-8")
        # The prompts were checked for contamination with the data they came from; the answers are the teacher's,
        # and share its stock phrases across questions by design: recorded, never refused.
        lenient = {"max_heldout_share": 1.0, "general": None}
        return prepare(PrepConfig(train=["train.jsonl"], validation=["validation.jsonl"], format=fmt,
                                  contamination=lenient), Path(tmp), tokenizer_path=tokenizer_path)


# ---------------------------------------------------------------- the student


def train_student(config: DistillSettings, start: str, dataset: str, out_dir: str | Path, teacher: str,
                  device: str = "auto", seed: int = 0, launch=None, checkpoints: str | None = None) -> StageResult:
    """Train the student from `start` on the distilled dataset with sft (or `launch`, for several processes), then
    measure it against the teacher and the start model (see the module docstring); the metrics are `distill_*`."""
    if launch is not None:
        result = launch("sft", config, start, dataset, Path(out_dir), device, seed, checkpoints)
    else:
        result = train_sft(config, start, dataset, out_dir, device, seed, checkpoints)
    adapter = str(out_dir) if result.adapter else None
    result.metrics.update(distill_metrics(config, teacher, start, adapter or str(out_dir), dataset, device,
                                          adapter=adapter is not None))
    return result


def distill_metrics(config: DistillSettings, teacher: str, start: str, student: str, dataset: str,
                    device: str = "auto", adapter: bool = False) -> dict[str, float]:
    """Held-out perplexity of the teacher's answers and time to first token, of teacher, start model and student
    (each loaded in turn, so at most one model is in memory; a teacher that is the start model is loaded once);
    prompt tokens saved; speed and size for distill-model. `student` is a model folder, or with `adapter` a LoRA
    adapter on `start`."""
    import gc

    device = resolve_device(device)
    precision = resolve_precision("auto", device)
    _, train, held = load_prepared(dataset)
    teacher_rows = [{"messages": c + r["messages"][-1:]}
                    for c, r in zip(teacher_contexts(config, contexts_of(held)), held)]
    timed = contexts_of(held)[:LATENCY_PROMPTS]
    metrics: dict[str, float] = {"distill_train_answers": float(len(train)),
                                 "distill_heldout_answers": float(len(held))}
    sides = (("teacher", teacher, None, teacher_rows, teacher_contexts(config, timed)),
             ("start", start, None, held, timed),
             ("student", start if adapter else student, student if adapter else None, held, timed))
    loaded, model = None, None
    for side, path, lora, rows, prompts in sides:
        if loaded != (path, lora):  # distill-prompt's default teacher is the start model: loaded once for both
            del model
            gc.collect()
            model = load_model(path, device=device, precision=precision, adapter=lora, merge=lora is not None)
            tokenizer, loaded = load_tokenizer(lora or path), (path, lora)
        metrics.update(_side_metrics(config, side, model, tokenizer, rows, prompts, held))
        if side == "teacher" and isinstance(config, DistillPromptConfig):
            long, short = zip(*(prompt_lengths(tokenizer, config, c) for c in contexts_of(train + held)))
            metrics["distill_prompt_tokens_teacher"] = sum(long) / len(long)
            metrics["distill_prompt_tokens_student"] = sum(short) / len(short)
            metrics["distill_prompt_tokens_saved"] = metrics["distill_prompt_tokens_teacher"] - \
                metrics["distill_prompt_tokens_student"]
    del model
    gc.collect()
    return {**metrics, **_comparisons(metrics)}


def _side_metrics(config: DistillSettings, side: str, model, tokenizer, rows: list[dict], prompts: list[Context],
                  held: list[dict]) -> dict[str, float]:
    """One side's (teacher, start or student) perplexity and bits per byte of the held-out answers, and, for
    teacher and student, time to first token (and, for distill-model, decode speed and size)."""
    from tasks.evaluation import latency, perplexity

    # One window per example (no sliding): a window that cut off the long system prompt would not measure the
    # teacher with it.
    window = max(len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
                 for r in rows) + 1
    scored = perplexity(model, tokenizer, rows, max_length=window)
    answer_bytes = sum(len(r["messages"][-1]["content"].encode()) for r in held)
    out = {f"distill_perplexity_{side}": scored["perplexity"],
           f"distill_bits_per_byte_{side}": scored["nll_sum"] / math.log(2) / max(answer_bytes, 1)}
    if side == "start":
        return out
    prompt_only = isinstance(config, DistillPromptConfig)
    speed = latency(model, tokenizer, prompts, max_new_tokens=2 if prompt_only else 16, repeats=3, warmup=1)
    out[f"distill_ttft_ms_{side}"] = speed["ttft_ms"]
    if not prompt_only:
        out[f"distill_tokens_per_s_{side}"] = speed["tokens_per_s"]
        out[f"distill_params_{side}"] = float(sum(p.numel() for p in model.parameters()))
    return out


def _comparisons(m: dict[str, float]) -> dict[str, float]:
    """The student against the teacher and its start: time to first token and perplexity reductions, the share of
    the perplexity gap closed, and (distill-model) the decode speed-up."""
    gap = m["distill_perplexity_start"] - m["distill_perplexity_teacher"]
    out = {"distill_ttft_reduction": 1 - m["distill_ttft_ms_student"] / m["distill_ttft_ms_teacher"],
           "distill_perplexity_reduction": 1 - m["distill_perplexity_student"] / m["distill_perplexity_start"],
           # Share of the way from the start model to the teacher that the student covered (1: as close as it).
           "distill_gap_closed": (m["distill_perplexity_start"] - m["distill_perplexity_student"]) / gap if gap
           else 1.0}
    if "distill_tokens_per_s_teacher" in m:
        out["distill_speedup"] = m["distill_tokens_per_s_student"] / m["distill_tokens_per_s_teacher"]
    return out


class DistillStage(TrainingStage):
    """What the two distill stages share: a teacher to answer, a student trained with sft on its answers."""

    data_kind: ClassVar[str | None] = "chat"

    def references(self) -> list[str]:
        teacher = getattr(self, "teacher", None)
        return super().references() + ([teacher] if teacher and not is_path(teacher) else [])

    def run(self, inputs: StageInputs, out_dir: Path) -> StageResult:
        """Train the student on the teacher's answers (`inputs.data`) and measure it against `inputs.teacher`."""
        from tasks.launched import launch

        return train_student(self, inputs.start, inputs.data, out_dir, inputs.teacher, inputs.device, inputs.seed,
                             launch=launch if self.processes > 1 else None, checkpoints=inputs.checkpoints)


class DistillPromptStage(DistillStage, DistillPromptConfig):
    """A `distill-prompt` stage of a pipeline config."""

    kind: ClassVar[str] = "distill-prompt"
    summary: ClassVar[str] = ("Bake a long system prompt into the weights: the teacher answers with it, the student "
                              "learns without it.")
    stage: Literal["distill-prompt"] = "distill-prompt"


class DistillModelStage(DistillStage, DistillModelConfig):
    """A `distill-model` stage of a pipeline config."""

    kind: ClassVar[str] = "distill-model"
    summary: ClassVar[str] = "Teach a smaller student (the stage's start) to answer the data's prompts like a bigger teacher."
    stage: Literal["distill-model"] = "distill-model"
