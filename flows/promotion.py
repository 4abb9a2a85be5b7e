"""Export a version to GGUF + Modelfile with its llama.cpp checks; promote it behind a gate; roll an alias back.

Layout under TUNERY_HOME/exports/NAME/: one folder per export, `vN-QUANT/` (the GGUF, the Modelfile, checks.json,
llama.cpp.log), and one symlink per alias, `ALIAS -> vN-QUANT`, switched atomically. Exports are immutable: exporting
the same version and quantization again writes `vN-QUANT-2/` (then `-3`, ...) with its own registry rows, and never
touches an earlier export's files or rows. Ollama reads
`exports/NAME/ALIAS/Modelfile`; where an `ollama` executable is on PATH, promotion and rollback run
`ollama create NAME:ALIAS` from it before the alias moves.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import registry
from core import metrics as metric_catalogue
from core.errors import TuneryError, check_name
from core.files import write_json
from core.home import atomic_dir, home
from flows.evaluate import forgetting
from flows.inputs import model_folder
from registry import exports as export_store
from registry.records import Check, Export
from tasks.convert import convert
from tasks.evaluation import EvalConfig
from tasks.export import ExportConfig, GateConfig
from tasks.modelfile import (SAMPLE_CONVERSATIONS, chat_frames, for_template, go_template, hf_render, parse_modelfile,
                             render_modelfile, stop_tokens)
from tasks.prep import PreparedData, load_prepared

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
    from tasks.evaluation import scored_tokens

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
    from tasks.models import load_tokenizer

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
    from tasks import verify

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
    holds the prompts (on the exported file), greedy tokens against HF (on the full-precision file), perplexity and KL. Returns (checks, answers)."""
    from tasks import verify
    from tasks.models import conversation, load_model, prompt_ids

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
    add(gguf, *verify.distribution_checks(gguf, model, examples, cfg.window, cfg.threads))
    return checks, samples


def answer_checks(r: Recipe, cfg: ExportConfig, gguf: Path, data: PreparedData, version: registry.Version,
                  evals: EvalConfig, progress: Progress) -> tuple[list[dict[str, Any]], dict[str, float], list[dict]]:
    """What the exported file answers, scored as transformers' answers are: greedy answers to the held-out prompts
    (the Modelfile's template, stops and parameters, up to `evals.answer_tokens`) against the reference answers,
    and the general multiple-choice suite (the forgetting check) with its drop from the first parent's accuracy.
    Returns (measurement rows for the checks, `gguf_*` metrics, the answers)."""
    from tasks import general, verify
    from tasks.evaluation import answer_targets
    from tasks.scores import answer_scores

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


def _value(export: Export, name: str) -> float | None:
    found = export.check(name)
    return found.value if found else None


def gate(candidate: Export, holder: Export | None, data: PreparedData, cfg: GateConfig,
         threads: int | None = None) -> list[dict[str, Any]]:
    """The gate's verdicts: {name, passed, value, threshold, detail}, one per threshold."""
    from tasks import verify
    from tasks.models import load_tokenizer

    verdicts = []
    measured_on = candidate.info.get("eval_data_hash")
    if measured_on is not None and measured_on != data.data_hash:
        verdicts.append({"name": "eval data", "passed": False, "value": measured_on[:12],
                         "threshold": data.data_hash[:12],
                         "detail": "the export's held-out checks were measured on other data than the config's"})
    for name in cfg.require_checks:
        c = candidate.check(name)
        verdicts.append({"name": f"check {name}", "passed": bool(c and c.passed), "value": c.value if c else None,
                         "threshold": "passed", "detail": c.detail if c else "not run"})
    kl = _value(candidate, "mean_kl")
    verdicts.append({"name": "mean_kl", "passed": kl is not None and kl <= cfg.max_mean_kl, "value": kl,
                     "threshold": cfg.max_mean_kl, "detail": "KL(fp32 || export) per held-out token"})
    speed = _value(candidate, "decode_tokens_per_s")
    verdicts.append({"name": "decode_tokens_per_s", "passed": speed is not None and
                     speed >= cfg.min_decode_tokens_per_s, "value": speed,
                     "threshold": cfg.min_decode_tokens_per_s, "detail": "llama.cpp greedy decode"})
    verdicts += answer_verdicts(candidate, cfg)
    if holder is None or holder.version == candidate.version:
        verdicts.append({"name": "perplexity_vs_holder", "passed": True, "value": _value(candidate, "perplexity"),
                         "threshold": None, "detail": "no other version holds the alias"})
        return verdicts
    ours_base, theirs_base = (registry.get_version(e.version).base_model for e in (candidate, holder))
    if ours_base != theirs_base:
        verdicts.append({"name": "perplexity_vs_holder", "passed": False, "value": None, "threshold": None,
                         "detail": f"{holder.version} was trained from {theirs_base}, this version from "
                                   f"{ours_base}: perplexities over different tokenizers are not comparable; "
                                   "promote to another alias"})
        return verdicts
    # The holder's GGUF is measured now on the tokens the candidate's `perplexity` check used: the same held-out
    # rows and window, through the candidate's tokenizer (the family shares it).
    tokenizer = load_tokenizer(candidate.info["model_folder"])
    examples = heldout_examples(tokenizer, data, candidate.info["config"]["heldout_rows"])
    ours = _value(candidate, "perplexity")
    theirs = verify.gguf_perplexity(holder.gguf, examples, candidate.info["config"]["window"], threads)
    limit = theirs * (1 + cfg.max_perplexity_increase_pct / 100)
    verdicts.append({"name": "perplexity_vs_holder", "passed": ours <= limit, "value": ours, "threshold": limit,
                     "detail": f"{ours:.3f} vs {holder.version}'s {theirs:.3f} "
                               f"(+{cfg.max_perplexity_increase_pct:g}% allowed)"})
    return verdicts


def answer_verdicts(candidate: Export, cfg: GateConfig) -> list[dict[str, Any]]:
    """The gate's verdicts on what the export answers, for the thresholds the config sets: general-suite points
    lost against the first parent (forgetting) and the held-out answers' token F1 (`answer_checks`' rows)."""
    verdicts = []
    if cfg.max_general_drop_pct is not None:
        drop = _value(candidate, "general_drop_pct")
        verdicts.append({"name": "general_drop_pct", "passed": drop is not None and drop <= cfg.max_general_drop_pct,
                         "value": drop, "threshold": cfg.max_general_drop_pct,
                         "detail": "points of general multiple-choice accuracy lost against the first parent" if
                         drop is not None else "not measured: the export or its parent has no general accuracy"})
    if cfg.min_answer_f1 is not None:
        f1 = _value(candidate, "heldout_answers")
        verdicts.append({"name": "answer_f1", "passed": f1 is not None and f1 >= cfg.min_answer_f1, "value": f1,
                         "threshold": cfg.min_answer_f1,
                         "detail": "token F1 of the export's held-out answers" if f1 is not None else
                         "not measured: no held-out answers (export.answer_rows 0 or no chat data)"})
    return verdicts


def _point_alias(name: str, alias: str, export: Export) -> Path:
    """Switch exports/NAME/ALIAS to the export's folder in one rename."""
    link = exports_dir() / name / alias
    if link.exists() and not link.is_symlink():
        raise TuneryError(f"{link} exists and is not an alias link; move it away first")
    tmp = link.with_name(f".{alias}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(Path(export.path).name)
    os.replace(tmp, link)
    return link


def _ollama_create(name: str, alias: str, export: Export) -> str:
    """`ollama create NAME:ALIAS` from the export's Modelfile where ollama is on PATH; what happened, in words."""
    exe = shutil.which("ollama")
    if exe is None:
        return "not run: no ollama executable on PATH"
    modelfile = Path(export.path) / "Modelfile"
    for delay in (2, 5, None):  # the ollama server may still be starting: retry briefly
        proc = subprocess.run([exe, "create", f"{name}:{alias}", "-f", str(modelfile)], capture_output=True,
                              text=True, timeout=1800)
        if proc.returncode == 0:
            return f"ollama create {name}:{alias}: ok"
        if delay is None:
            raise TuneryError(f"ollama create {name}:{alias} failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
        time.sleep(delay)
    raise AssertionError("unreachable")


def promote(ref: str, data: PreparedData, export_cfg: ExportConfig, gate_cfg: GateConfig, prompts: list[str],
            progress: Progress = print, evals: EvalConfig | None = None) -> dict[str, Any]:
    """Export `ref`, gate it against the alias's holder, and move the alias on a pass. Either way, a row."""
    version = registry.get_version(ref)
    name, alias = version.name, gate_cfg.alias  # GateConfig validated the alias
    candidate = export_version(version.version, data, export_cfg, prompts, progress, evals)
    current = export_store.get_alias(name, alias)
    holder = export_store.get_export(current.export_id) if current else None
    progress(f"gate for {name}@{alias}" + (f" (held by {holder.version})" if holder else ""))
    verdicts = gate(candidate, holder, data, gate_cfg, export_cfg.threads)
    record = {"thresholds": gate_cfg.model_dump(), "verdicts": verdicts}
    if not all(v["passed"] for v in verdicts):
        export_store.record_promotion(name, alias, "refused", version.version, candidate.export_id, record)
        return {"promoted": False, "alias": f"{name}@{alias}", "version": version.version, "export": candidate,
                "previous": current and current.version, "gate": verdicts}
    ollama = _ollama_create(name, alias, candidate)
    _point_alias(name, alias, candidate)
    export_store.record_promotion(name, alias, "promote", version.version, candidate.export_id, record, ollama)
    return {"promoted": True, "alias": f"{name}@{alias}", "version": version.version, "export": candidate,
            "previous": current and current.version, "gate": verdicts, "ollama": ollama,
            "path": str(exports_dir() / name / alias)}


def rollback(target: str) -> dict[str, Any]:
    """Move NAME@ALIAS (and its export link, and Ollama's model) back to the holder before the current one."""
    if target.count("@") != 1:
        raise TuneryError(f"expected NAME@ALIAS, got {target!r}")
    name, alias = target.split("@")
    check_name(name, "model name")
    check_name(alias, "alias")
    current = export_store.get_alias(name, alias)
    version, export_id = export_store.rollback_target(name, alias)
    export = export_store.get_export(export_id)
    if not export.gguf.exists():
        raise TuneryError(f"{export.gguf} is gone; cannot roll {target} back to it")
    ollama = _ollama_create(name, alias, export)
    _point_alias(name, alias, export)
    export_store.record_promotion(name, alias, "rollback", version, export_id,
                                  {"rolled_back_from": current.version if current else None}, ollama)
    return {"alias": target, "version": version, "export": export_id, "previous": current and current.version,
            "ollama": ollama, "path": str(exports_dir() / name / alias)}


def best_version(refs: list[str], eval_data: str, metric: str = "perplexity") -> registry.Version:
    """The ready version with the best `metric` (by its catalogue direction) on the data hashed `eval_data`: what
    `tunery run` promotes. A value measured on other data does not count."""
    versions = [registry.get_version(ref, eval_data) for ref in refs]
    found = metric_catalogue.best([v for v in versions if v.status == "ready"], metric)
    if found is None:
        raise TuneryError(f"no version evaluated on data {eval_data[:12]} has a {metric} to rank by; nothing to "
                          "promote")
    return found


def override(settings, option: str, **changes: Any):
    """A copy of a config section with a value from the command line or the dashboard, validated like the YAML."""
    from pydantic import ValidationError

    try:
        return type(settings).model_validate({**settings.model_dump(), **changes})
    except ValidationError as e:
        raise TuneryError(f"{option}: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None


def _setup(ref: str, config: str | Path | None, quant: str | None, alias: str | None):
    """Check the version and the options first, then load the config and prepare its held-out data."""
    from flows.config import DEMO_CONFIG, load_config
    from flows.inputs import load_with_data

    registry.get_version(ref)
    cfg, _ = load_config(config or DEMO_CONFIG)  # reading the YAML is cheap; registering and preparing is not
    export_cfg = override(cfg.export, "--quant", quant=quant) if quant else cfg.export
    gate_cfg = cfg.promote or GateConfig()
    gate_cfg = override(gate_cfg, "--alias", alias=alias) if alias else gate_cfg
    _, _, _, data = load_with_data(config or DEMO_CONFIG)
    return cfg, data, export_cfg, gate_cfg


def export_from_config(ref: str, config: str | Path | None = None, quant: str | None = None,
                       progress: Progress = print) -> dict[str, Any]:
    """`tunery export`: the config's held-out data, eval prompts and export settings (the demo's by default)."""
    cfg, data, export_cfg, _ = _setup(ref, config, quant, None)
    return export_version(ref, data, export_cfg, cfg.eval_config().prompts, progress, cfg.eval_config())


def promote_from_config(ref: str, config: str | Path | None = None, alias: str | None = None,
                        quant: str | None = None, progress: Progress = print) -> dict[str, Any]:
    """`tunery promote` and the dashboard's Promote button: export, check and gate as the config says."""
    cfg, data, export_cfg, gate_cfg = _setup(ref, config, quant, alias)
    return promote(ref, data, export_cfg, gate_cfg, cfg.eval_config().prompts, progress, cfg.eval_config())


def refused_message(result: dict[str, Any]) -> str:
    failed = [f"{v['name']} ({v['detail']})" for v in result["gate"] if not v["passed"]]
    return (f"gate refused {result['version']} for {result['alias']}: " + "; ".join(failed)
            + (f"; the alias stays on {result['previous']}" if result["previous"] else "; the alias was not created"))
