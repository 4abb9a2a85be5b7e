"""Parity gate for a training default that changes the numbers: the sft stage with and without the change, over
several seeds, on the demo data and SmolLM2-135M-Instruct.

    .venv/bin/python bench/parity.py --change lora.dropout=0 [--baseline lora.dropout=0.05] [--steps 60]
                                     [--seeds 0 1 2] [--batch-size 4] [--json]

A change passes when, averaged over the seeds, the mean of the last 5 training losses and the held-out perplexity
(adapter on the fp32 base, tunery's perplexity on the held-out split) are both within 2% of the baseline's. Only
then may it be a default; the report says which it is, with the numbers and the seconds each arm took.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
TOLERANCE_PCT = 2.0


def overrides(pairs: list[str]) -> dict:
    """`a.b=v` pairs as a nested dict of YAML-parsed values."""
    out: dict = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return out


def merged(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merged(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def run(settings: dict, model_dir: str, data: str, seed: int, out: Path) -> dict:
    from bench.train_speed import held_out_quality
    from tasks.stages.sft import SftConfig, train_sft

    began = time.perf_counter()
    result = train_sft(SftConfig(**settings), model_dir, data, out, "cpu", seed)
    losses = [h["loss"] for h in result.history if "loss" in h]
    return {"final_loss": statistics.fmean(losses[-5:]), "train_s": result.metrics["train_runtime_s"],
            "stage_s": time.perf_counter() - began,
            **held_out_quality("sft", model_dir, out, data, "cpu")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--change", action="append", required=True, help="KEY=VALUE of the candidate default")
    parser.add_argument("--baseline", action="append", default=[], help="KEY=VALUE the baseline pins")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from bench.train_speed import prepare_data
    from tasks.models import ensure_default_base_model

    model_dir = str(ensure_default_base_model())
    common = {"max_steps": args.steps, "batch_size": args.batch_size, "max_length": 256, "learning_rate": 1e-3,
              "lr_scheduler": "cosine", "warmup_ratio": 0.1, "logging_steps": 1}
    arms = {"baseline": merged(common, overrides(args.baseline)),
            "candidate": merged(merged(common, overrides(args.baseline)), overrides(args.change))}
    results: dict[str, list[dict]] = {"baseline": [], "candidate": []}
    with tempfile.TemporaryDirectory(prefix="tunery-parity-") as tmp:
        os.environ["TUNERY_HOME"] = str(Path(tmp) / "home")
        data = prepare_data(Path(model_dir))["sft"]
        for seed in args.seeds:
            for name, settings in arms.items():  # interleaved, so machine noise hits both arms alike
                with contextlib.redirect_stdout(sys.stderr):  # the trainer prints its logs; stdout is the report
                    record = run(settings, model_dir, data, seed, Path(tmp) / f"{name}-{seed}")
                results[name].append(record)
                print(f"seed {seed} {name}: {record}", file=sys.stderr)
    mean = {name: {k: statistics.fmean(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()}
    delta = {k: 100 * (mean["candidate"][k] / mean["baseline"][k] - 1) for k in ("final_loss", "perplexity")}
    report = {"change": args.change, "baseline": args.baseline, "steps": args.steps, "seeds": args.seeds,
              "batch_size": args.batch_size, "mean": mean, "delta_pct": delta,
              "speedup": mean["baseline"]["train_s"] / mean["candidate"]["train_s"],
              "passes": all(abs(v) <= TOLERANCE_PCT for v in delta.values()),
              "per_seed": results}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{' '.join(args.change)}: final loss {delta['final_loss']:+.2f}%, held-out perplexity "
              f"{delta['perplexity']:+.2f}%, training x{report['speedup']:.2f} -> "
              f"{'PASSES' if report['passes'] else 'FAILS'} the {TOLERANCE_PCT}% gate")


if __name__ == "__main__":
    main()
