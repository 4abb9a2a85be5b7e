"""Export a version to GGUF + Modelfile and check it with llama.cpp: exports/NAME/vN-QUANT with its checks, recorded.

Exports are immutable: exporting the same version and quantization again writes `vN-QUANT-2/` (then `-3`, ...)
with its own registry rows, and never touches an earlier export's files or rows. The folder holds the GGUF, the
Modelfile, checks.json and llama.cpp.log.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import registry
from core.errors import TuneryError
from core.files import write_json
from core.home import atomic_dir, home
from flows.evaluate import forgetting
from flows.inputs import model_folder
from registry import exports as export_store
from registry.records import Check, Export
from tasks.data.prep import PreparedData, load_prepared
from tasks.evaluate import general
from tasks.evaluate.evaluation import EvalConfig, answer_targets, scored_tokens
from tasks.evaluate.scores import answer_scores
from tasks.export import distribution, verify
from tasks.export.convert import convert
from tasks.export.modelfile import (SAMPLE_CONVERSATIONS, chat_frames, for_template, go_template, hf_render,
                                    parse_modelfile, render_modelfile, stop_tokens)
from tasks.export.settings import ExportConfig
from tasks.models import conversation, load_model, load_tokenizer, prompt_ids

Progress = Callable[[str], None]


def exports_dir() -> Path:
    return home() / "exports"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def heldout_examples(tokenizer, data: PreparedData, rows: int) -> list[dict[str, list[int]]]:
    _, _, validation = load_prepared(data.artifact_path)
    if not validation:
        raise TuneryError(f"{data.artifact_path}: the validation split is empty; nothing to check the export on")
    return [scored_tokens(tokenizer, row) for row in validation[:rows]]


def _free_tag(name: str, number: int, quant: str) -> str:
    """`vN-QUANT` for a version's first export at QUANT, `vN-QUANT-2`, `-3`, ... for the next: no folder or row
    of that name exists yet."""
    taken = {e.export_id for e in export_store.list_exports(f"{name}:{number}")}  # tags carry the version
    tag, n = f"v{number}-{quant}", 1
    while f"{name}/{tag}" in taken or (exports_dir() / name / tag).exists():
        n += 1
        tag = f"v{number}-{quant}-{n}"
    return tag


@dataclass(frozen=True)
class Recipe:
    """What an export of a version will write, settled before any file is: the model folder, its tokenizer, the
    chat template's frames, the Go TEMPLATE, the stop strings and the Modelfile's parameters."""

    folder: Path
    tokenizer: Any
    frames: Any
    template: str
    stops: list[str]
    parameters: dict[str, Any]


def recipe(version: registry.Version, cfg: ExportConfig) -> Recipe:
    folder = Path(model_folder(version))
    tokenizer = load_tokenizer(str(folder))
    try:
        frames, frames_error = chat_frames(tokenizer), ""
    except TuneryError as e:
        frames, frames_error = None, str(e)
    template = cfg.template or (go_template(frames) if frames else None)
    if template is None:
        raise TuneryError(f"{version.version}: cannot derive an Ollama TEMPLATE ({frames_error}); set "
                          "export.template")
    return Recipe(folder, tokenizer, frames, template, stop_tokens(tokenizer, frames, folder),
                  {**({"num_ctx": cfg.num_ctx} if cfg.num_ctx else {}), **cfg.parameters})


def write_files(r: Recipe, cfg: ExportConfig, tmp: Path, version: registry.Version,
                progress: Progress) -> tuple[Path, Path, str, dict[str, Any]]:
    """Write the full-precision GGUF (llama.cpp's converter), the quantized one (unless they are the same) and the
    Modelfile into `tmp`; return (full-precision file, exported file, Modelfile text, what the conversion found)."""

    stem = f"{version.name}-v{version.number}"
    full = "f32" if cfg.quant == "f32" else "f16"
    full_path = tmp / f"{stem}-{full}.gguf"
    progress(f"writing {full_path.name}")
    converted = convert(r.folder, full_path, full, name=version.version)
    gguf = full_path
    if cfg.quant != full:
        progress(f"quantizing to {cfg.quant} with llama.cpp")
        gguf = verify.quantize(full_path, tmp / f"{stem}-{cfg.quant}.gguf", cfg.quant, cfg.threads)
    modelfile = render_modelfile(gguf.name, r.template, r.stops, cfg.system, r.parameters)
    (tmp / "Modelfile").write_text(modelfile)
    return full_path, gguf, modelfile, {k: v for k, v in converted.items() if k != "path"}


def run_checks(r: Recipe, cfg: ExportConfig, full_path: Path, gguf: Path, modelfile: str, prompts: list[str],
               examples: list[dict[str, list[int]]], progress: Progress
               ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Every check of an export, each row naming the file it ran on: the Modelfile read back, the template
    rendered both ways, the file loads with the exact vocabulary, tokenization, answers that stop and a num_ctx that
    holds the prompts (on the exported file), greedy tokens against HF (on the full-precision file), perplexity and
    KL. Returns (checks, answers)."""

    checks: list[dict[str, Any]] = []

    def add(file: Path, *found: dict[str, Any]) -> None:
        checks.extend({**c, "file": file.name} for c in found)

    expected = [("from", f"./{gguf.name}"), ("template", r.template), *(("parameter stop", s) for s in r.stops),
                *((f"parameter {k}", str(v)) for k, v in r.parameters.items()),
                *([("system", cfg.system)] if cfg.system else [])]
    got = parse_modelfile(modelfile)
    add(gguf, verify.check("modelfile", got == expected, len(got),
                           f"{len(got)} directives read back as written" if got == expected else
                           f"read back {[c for c, _ in got]}, wrote {[c for c, _ in expected]}"))
    add(gguf, verify.check_template(r.template, r.tokenizer, r.frames))
    progress("checking the export with llama.cpp")
    llm, loads = verify.check_loads(gguf, r.tokenizer)
    add(gguf, loads)
    if llm is None:
        raise TuneryError(f"{gguf.name}: {loads['detail']}")
    try:
        rendered = [hf_render(r.tokenizer, c, r.frames) for c in SAMPLE_CONVERSATIONS] if r.frames else []
        add(gguf, verify.check_tokenization(llm, r.tokenizer, rendered))
        answered, speed, samples = verify.check_answers(llm, r.template, r.stops, prompts, cfg.system,
                                                        cfg.answer_tokens, r.parameters)
        add(gguf, answered, speed,
            verify.check_context(llm, r.template, prompts, cfg.system, r.parameters, cfg.answer_tokens))
    finally:
        llm.close()
    model = load_model(str(r.folder))
    ids = [prompt_ids(r.tokenizer, for_template(conversation(cfg.system, p), r.frames)) for p in prompts]
    stop_ids = set(r.tokenizer.convert_tokens_to_ids(r.stops))
    full_llm = verify.open_gguf(full_path, threads=cfg.threads)
    try:
        progress(f"greedy tokens of {full_path.name} vs HF")
        add(full_path, verify.check_greedy(full_llm, model, r.tokenizer, ids, cfg.max_new_tokens, stop_ids,
                                           "f32" if cfg.quant == "f32" else "f16"))
    finally:
        full_llm.close()
    progress("perplexity and KL against the fp32 model")
    add(gguf, *distribution.distribution_checks(gguf, model, examples, cfg.window, cfg.threads))
    return checks, samples


def answer_checks(r: Recipe, cfg: ExportConfig, gguf: Path, data: PreparedData, version: registry.Version,
                  evals: EvalConfig, progress: Progress) -> tuple[list[dict[str, Any]], dict[str, float], list[dict]]:
    """What the exported file answers, scored as transformers' answers are: greedy answers to the held-out prompts
    (the Modelfile's template, stops and parameters, up to `evals.answer_tokens`) against the reference answers,
    and the general multiple-choice suite (the forgetting check) with its drop from the first parent's accuracy.
    Returns (measurement rows for the checks, `gguf_*` metrics, the answers)."""

    rows: list[dict[str, Any]] = []
    metrics: dict[str, float] = {}
    _, _, validation = load_prepared(data.artifact_path)
    targets = answer_targets(validation, evals.generation_rows)[:cfg.answer_rows]
    answers: list[dict[str, Any]] = []
    llm = verify.open_gguf(gguf, threads=cfg.threads)
    try:
        if targets:
            progress(f"answering {len(targets)} held-out prompts with llama.cpp")
            _, _, said = verify.check_answers(llm, r.template, r.stops, [t["prompt"] for t in targets], cfg.system,
                                              evals.answer_tokens, r.parameters)
            answers = [{"prompt": t["prompt"], "answer": s["answer"], "reference": t["reference"],
                        "category": t["category"]} for t, s in zip(targets, said)]
            metrics.update(answer_scores(answers, prefix="gguf_answer"))
            rows.append(verify.check("heldout_answers", None, metrics["gguf_answer_f1"],
                                     f"{len(answers)} held-out answers: token F1 {metrics['gguf_answer_f1']:.3f}, "
                                     f"ROUGE-L {metrics['gguf_answer_rougeL']:.3f}, chrF "
                                     f"{metrics['gguf_answer_chrf']:.1f}, exact {metrics['gguf_answer_exact']:.3f}"))
    finally:
        llm.close()
    if evals.general:
        progress("general multiple-choice suite with llama.cpp (forgetting check)")
        items = general.load_suite(evals.general)
        found = general.accuracy(items, general.gguf_logliks(gguf, r.tokenizer, items, cfg.threads), "gguf_general")
        metrics.update(found)
        detail = f"{found['gguf_general_accuracy']:.3f} on {len(items)} items"
        rows.append(verify.check("general", None, found["gguf_general_accuracy"], detail))
        lost = forgetting(version, found["gguf_general_accuracy"], data.data_hash)
        if lost:
            metrics["gguf_general_drop_pct"] = lost["general_drop_pct"]
            rows.append(verify.check("general_drop_pct", None, lost["general_drop_pct"],
                                     f"{found['gguf_general_accuracy']:.3f} against {version.parents[0]}'s "
                                     f"{lost['general_accuracy_parent']:.3f} (transformers): "
                                     f"{lost['general_drop_pct']:+.1f} points lost"))
    return rows, metrics, answers


def export_version(ref: str, data: PreparedData, cfg: ExportConfig, prompts: list[str],
                   progress: Progress = print, evals: EvalConfig | None = None) -> dict[str, Any]:
    """Write exports/NAME/vN-QUANT (GGUF + Modelfile), run every check on it, record export and checks, and record
    what the file answers (`answer_checks`) as the version's `gguf_*` metrics on the data's hash. `evals` (default:
    EvalConfig()) says how held-out answers are made and which general suite is scored."""
    evals = evals or EvalConfig()
    version = registry.get_version(ref)
    if version.status != "ready":
        raise TuneryError(f"{version.version} is {version.status}; only ready versions can be exported")
    r = recipe(version, cfg)
    examples = heldout_examples(r.tokenizer, data, cfg.heldout_rows)
    tag = _free_tag(version.name, version.number, cfg.quant)
    final = exports_dir() / version.name / tag
    with atomic_dir(final) as tmp:
        full_path, gguf, modelfile, converted = write_files(r, cfg, tmp, version, progress)
        checks, samples = run_checks(r, cfg, full_path, gguf, modelfile, prompts, examples, progress)
        measured, gguf_metrics, answers = answer_checks(r, cfg, gguf, data, version, evals, progress)
        checks += [{**c, "file": gguf.name} for c in measured]
        if gguf != full_path and not cfg.keep_full_precision:
            full_path.unlink()
        write_json(tmp / "checks.json", {"version": version.version, "checks": checks, "answers": samples})
        sha, size = _sha256(gguf), gguf.stat().st_size
    info = {"config": cfg.model_dump(), "stops": r.stops, "template_source": "config" if cfg.template else "derived",
            "answers": samples, "model_folder": str(r.folder), "eval_data_hash": data.data_hash,
            "conversion": converted}
    export = Export(export_id=f"{version.name}/{tag}", version=version.version, quant=cfg.quant, path=str(final),
                    gguf_file=gguf.name, size_bytes=size, sha256=sha, modelfile=modelfile,
                    passed=all(c["passed"] is not False for c in checks), info=info,
                    checks=tuple(Check(**c) for c in checks))
    export_store.record_export(export)
    registry.record_metrics(version.version, gguf_metrics, eval_data_hash=data.data_hash)
    registry.record_answers(version.version, export.export_id, answers, eval_data_hash=data.data_hash)
    return export_store.get_export(export.export_id)
