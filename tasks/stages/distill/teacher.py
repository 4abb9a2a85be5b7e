"""The teacher's side: greedy answers to the stage's prompts (llama.cpp on its best checked GGUF export, else
transformers), cached by their inputs, prepared as the student's dataset; and preference pairs for a later dpo."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from core.errors import TuneryError
from core.files import sha256_json, write_json
from core.home import home, home_relative
from tasks.common import resolve_device, resolve_precision
from tasks.data.prep import PreparedData, PrepConfig, load_prepared, prepare
from tasks.models import answer_length, greedy_answers, load_model, load_tokenizer, prompt_ids, turn_end_ids
from tasks.stages.distill.settings import (Answer, Context, DistillModelConfig, DistillSettings, contexts_of,
                                           distill_rows, prompt_contexts, settle, student_contexts, teacher_contexts)

GENERATOR = 1  # bump when a change to how teachers answer should invalidate cached answers


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
    from tasks.export.verify import greedy_ids, open_gguf

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




def make_dataset(config: DistillSettings, teacher: str, gguf: Path | None, contexts: tuple[list, list],
                 student: str, device: str = "auto", key: dict[str, Any] | None = None) -> PreparedData:
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
    return PreparedData(data.artifact_path, data.data_hash, data.kind, {**data.info, **info})


def preference_pairs(config: DistillModelConfig, student: str, dataset: str, device: str = "auto") -> PreparedData:
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


def prepare_rows(train: list[dict], held: list[dict], fmt: str, tokenizer_path: str) -> PreparedData:
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


# ---------------------------------------------------------------- which export the teacher answers through

# Export precisions, best first: the teacher answers through the most faithful GGUF it has.
GGUF_ORDER = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_0", "q4_k_m", "q4_k_s", "q4_0")


def teacher_gguf(teacher: Any, exports: list[Any], backend: str, allow_failed: bool = False
                 ) -> tuple[Path | None, dict[str, Any]]:
    """The GGUF export (of the teacher version's `exports`) the teacher answers through (backend auto or
    llama.cpp), or None for HF generation, and what the version records about it: the export, its file and its
    check status.

    Only an export that passed its llama.cpp checks is used, unless `allow_failed` (then the best failed one)."""
    if backend == "hf":
        return None, {}
    found = sorted(((not e.passed, GGUF_ORDER.index(e.quant) if e.quant in GGUF_ORDER else len(GGUF_ORDER),
                     e.export_id, e) for e in exports if e.gguf.exists()), key=lambda f: f[:3])
    passed = [e for failed, _, _, e in found if not failed]
    failed = [e for bad, _, _, e in found if bad]

    def status(e: Any) -> str:
        names = [c.name for c in e.checks if c.passed is False]
        return "passed" if e.passed else f"failed: {', '.join(names) or 'checks'}"

    chosen = passed[0] if passed else failed[0] if failed and allow_failed else None
    if chosen is not None:
        return chosen.gguf, {"teacher_export": chosen.export_id, "teacher_gguf_checks": status(chosen)}
    skipped = f"{failed[0].export_id} ({status(failed[0])})" if failed else None
    if backend == "llama.cpp":
        raise TuneryError(f"teacher {teacher.version} has no GGUF export that passed its checks"
                          + (f"; {skipped}: set teacher_allow_failed_export: true to use it anyway" if skipped else
                             f"; run `tunery export {teacher.version} --quant f16`") + ", or set teacher_backend: hf")
    return None, ({"teacher_export_skipped": skipped} if skipped else {})


def ask(config: DistillSettings, stage_id: str, start: Any, teacher: Any, data: PreparedData | None, ctx: Any
        ) -> tuple[PreparedData, str | None, dict[str, Any]]:
    """Ask the teacher, prepare the student's rows (and, when asked, preference pairs); the generated datasets are
    recorded like any prepared data. Returns (the student's dataset, the pairs' folder or None, what the version's
    info records about the teacher's answers)."""
    rows = None
    if data is not None:
        if data.kind != "chat":
            raise TuneryError(f"stage {stage_id} asks the teacher the user turns of chat data, but its data holds "
                              f"{data.kind} examples; give it chat `data:` or `prompts:`")
        _, train, held = load_prepared(data.artifact_path)
        rows = (train, held)
    contexts = prompt_contexts(config, rows)
    start_folder, teacher_folder = ctx.folder(start), ctx.folder(teacher)
    gguf, teacher_export = teacher_gguf(teacher, ctx.exports(teacher), config.teacher_backend,
                                        config.teacher_allow_failed_export)
    # What the teacher's raw answers depend on (how they are trimmed and learned from is applied afterwards).
    generation = {"max_new_tokens", "generation_batch_size", "no_repeat_ngram", "teacher_backend", "system",
                  "examples"}
    # (the GGUF by its path in TUNERY_HOME: the same answers wherever a worker mounts the shared storage)
    key = {"teacher": teacher.version, "gguf": str(gguf) if gguf is None else home_relative(gguf),
           "contexts": contexts, "registry": ctx.registry_id,
           "settings": config.model_dump(mode="json", include=generation), "device": resolve_device(ctx.device)}
    dataset = make_dataset(config, teacher_folder, gguf, contexts, start_folder, ctx.device, key)
    ctx.record_dataset(dataset)
    info = {"dataset": dataset.artifact_path,
            **{k: dataset.info[k] for k in ("teacher_backend", "teacher_gguf", "generation_s", "unfinished_answers",
                                            "trimmed_answers", "dropped_answers")}, **teacher_export}
    pairs = None
    if getattr(config, "preference_pairs", False):
        made = preference_pairs(config, start_folder, dataset.artifact_path, ctx.device)
        ctx.record_dataset(made)
        pairs = made.artifact_path
    return dataset, pairs, info
