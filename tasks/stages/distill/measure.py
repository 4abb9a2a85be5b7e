"""The distilled student measured against its teacher and its start, on the held-out teacher answers (see the
package docstring): perplexity and bits per byte of each, time to first token, prompt tokens saved (distill-prompt),
decode speed and size (distill-model). This is measuring code: a change here re-measures a version, it does not
retrain it (flows/plan.py keeps it out of the training fingerprint)."""
from __future__ import annotations

import math

from tasks.common import resolve_device, resolve_precision
from tasks.data.prep import load_prepared
from tasks.models import load_model, load_tokenizer
from tasks.stages.distill.settings import (Context, DistillPromptConfig, DistillSettings, contexts_of, prompt_lengths,
                                           teacher_contexts)

LATENCY_PROMPTS = 3  # held-out prompts timed for time to first token (batch 1, median of the runs)


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
    from tasks.evaluate.evaluation import latency, perplexity

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
