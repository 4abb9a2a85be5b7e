"""Promote a version behind a gate and roll an alias back; the export itself is flows.exporting's.

Layout under TUNERY_HOME/exports/NAME/: one folder per export, `vN-QUANT/` (flows.exporting), and one symlink per
alias, `ALIAS -> vN-QUANT`, switched atomically. Ollama reads `exports/NAME/ALIAS/Modelfile`; where an `ollama`
executable is on PATH, promotion and rollback run `ollama create NAME:ALIAS` from it before the alias moves.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import registry
from core import metrics as metric_catalogue
from core.errors import TuneryError, check_name
from flows.config import DEMO_CONFIG, load_config
from flows.exporting import Progress, export_version, exports_dir, heldout_examples
from flows.inputs import load_with_data
from registry import exports as export_store
from registry.records import Export
from tasks.data.prep import PreparedData
from tasks.evaluate.evaluation import EvalConfig
from tasks.export import distribution
from tasks.export.settings import ExportConfig, GateConfig
from tasks.models import load_tokenizer


def _value(export: Export, name: str) -> float | None:
    found = export.check(name)
    return found.value if found else None


def gate(candidate: Export, holder: Export | None, data: PreparedData, cfg: GateConfig,
         threads: int | None = None) -> list[dict[str, Any]]:
    """The gate's verdicts: {name, passed, value, threshold, detail}, one per threshold."""

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
    theirs = distribution.gguf_perplexity(holder.gguf, examples, candidate.info["config"]["window"], threads)
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
