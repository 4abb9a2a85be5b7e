"""The Prefect flow behind `tunery run`: one task per stage, one artifact per stage. Wiring only."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from flows import steps
from flows.config import load_config

SUMMARY_METRICS = ("perplexity", "tokens_per_s", "ttft_ms", "peak_rss_mb")


def _key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


@task(task_run_name="prep {cfg.name}")
def prep_task(cfg, config_dir: Path, base: dict[str, Any]):
    result = steps.run_prep(cfg, config_dir, base["artifact_path"])
    info = result.info
    create_markdown_artifact(
        key=_key(cfg.name, "prep"),
        markdown=f"### Data for {cfg.name}\n\n| | |\n|---|---|\n| hash | `{info['data_hash'][:16]}` |\n"
                 f"| kind | {info['kind']} |\n| rows read | {info['rows_read']} |\n"
                 f"| duplicates removed | {info['duplicates_removed']} |\n| train / validation | "
                 f"{info['train_rows']} / {info['validation_rows']} |\n| tokens | {info.get('tokens', '-')} |\n",
        description="prepared dataset",
    )
    return result


@task(task_run_name="base {cfg.base_model}")
def base_task(cfg, config_dir: Path) -> dict[str, Any]:
    return steps.run_base(cfg, config_dir)


@task(task_run_name="sft {cfg.name} on {base[version]}")
def sft_task(cfg, base: dict[str, Any], data) -> dict[str, Any]:
    version = steps.run_sft(cfg, base, data, flow_run_id=str(flow_run.get_id() or ""))
    m = version["metrics"]
    create_markdown_artifact(
        key=_key(cfg.name, "sft"),
        markdown=f"### {version['version']} (sft, {version['info']['method']})\n\n"
                 f"loss {m['train_loss_first']:.3f} -> {m['train_loss']:.3f} in {m['train_steps']:.0f} steps, "
                 f"{m['train_runtime_s']:.0f} s, {m['train_tokens_per_s']:.0f} tokens/s, "
                 f"peak RSS {m['train_peak_rss_mb']:.0f} MB\n",
        description="fine-tuning run",
    )
    return version


@task(task_run_name="eval {version[version]}")
def eval_task(version: dict[str, Any], data, eval_cfg) -> dict[str, float]:
    metrics = steps.run_eval(version, data, eval_cfg)
    create_markdown_artifact(
        key=_key(version["name"], "eval"),
        markdown=f"### {version['version']}\n\n" + "\n".join(
            f"- {k}: {metrics[k]:.3f}" for k in SUMMARY_METRICS if k in metrics),
        description="evaluation on the held-out split",
    )
    return metrics


@flow(name="tunery-pipeline")
def pipeline(config_path: str) -> dict[str, Any]:
    """prep -> base -> eval(base) -> sft -> eval(sft); returns the versions and their metrics."""
    cfg, config_dir = load_config(config_path)
    base = base_task(cfg, config_dir)
    data = prep_task(cfg, config_dir, base)
    base_metrics = eval_task(base, data, cfg.eval_config())
    tuned = sft_task(cfg, base, data)
    tuned_metrics = eval_task(tuned, data, cfg.eval_config())
    rows = [{"version": v["version"], "stage": v["stage"], **{k: round(m.get(k, float("nan")), 3)
                                                              for k in SUMMARY_METRICS}}
            for v, m in ((base, base_metrics), (tuned, tuned_metrics))]
    create_table_artifact(key=_key(cfg.name, "summary"), table=rows, description="base vs fine-tuned")
    return {"data_hash": data.info["data_hash"], "base": base["version"], "tuned": tuned["version"], "rows": rows}
