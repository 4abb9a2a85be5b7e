"""Benchmark: one evaluation stage and the teacher's answers, this code against an earlier revision, in one run.

    .venv/bin/python bench/stage_speed.py [--baseline REV] [--prompts N] [--rounds R] [--json]

The earlier revision (default: 6f9c712, the code before issue 14) is unpacked with `git archive` into a temporary
folder and run with the same virtual environment, the same prepared demo data, SmolLM2-135M-Instruct and the demo
config's settings; each measurement runs in a fresh process, interleaved (baseline, current, baseline, ...).

- eval: `tasks.evaluate.evaluation.evaluate` of the base model with configs/demo.yaml's `eval:` section (held-out perplexity
  per category, generated lengths, latency, sample answers), wall time of the whole stage including its child
  process. The perplexities must agree to 1e-4.
- teacher: the demo's distill-prompt teacher (Fern's persona prompt and three example exchanges) answering the first
  N demo questions greedily (batch 16, 128 new tokens, no repeated 4-grams), as `tasks.stages.distill.teacher_answers`
  does in each revision. The answers must be identical.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

EVAL = """
import json, sys, time
from tasks.evaluate.evaluation import EvalConfig, evaluate
spec = json.loads(sys.argv[1])
began = time.perf_counter()
result = evaluate(spec["model"], spec["data"], EvalConfig(**spec["eval"]))
print(json.dumps({"seconds": time.perf_counter() - began, "metrics": result.metrics,
                  "samples": result.samples if hasattr(result, "samples") else result.info["samples"]}))
"""

TEACHER = """
import json, sys, time
from tasks.stages.distill.settings import DistillPromptConfig, teacher_contexts
from tasks.stages.distill.teacher import teacher_answers
from tasks.models import conversation, load_model, load_tokenizer
spec = json.loads(sys.argv[1])
config = DistillPromptConfig(**spec["stage"])
model, tok = load_model(spec["model"]), load_tokenizer(spec["model"])
contexts = teacher_contexts(config, [conversation(None, q) for q in spec["questions"]])
began = time.perf_counter()
answers = teacher_answers(model, tok, contexts, config.max_new_tokens, config.generation_batch_size,
                          config.no_repeat_ngram)
print(json.dumps({"seconds": time.perf_counter() - began, "answers": [list(a) for a in answers]}))
"""


def run(tree: Path, script: str, spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(spec)], cwd=tree, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: failed\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="6f9c712", help="git revision to compare against")
    parser.add_argument("--prompts", type=int, default=32, help="demo questions the teacher answers")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--only", choices=["eval", "teacher"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from tasks.data.prep import PrepConfig, prepare
    from tasks.models import ensure_default_base_model

    model = str(ensure_default_base_model())
    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    stage = {k: v for k, v in demo["stages"][0].items() if k != "stage"}
    questions = [json.loads(line)["messages"][0]["content"]
                 for line in (REPO / "data/demo/garden_chat.jsonl").read_text().splitlines()][:args.prompts]
    with tempfile.TemporaryDirectory(prefix="tunery-stage-bench-") as tmp:
        tmp = Path(tmp)
        baseline = tmp / "baseline"
        baseline.mkdir()
        archive = subprocess.run(["git", "archive", args.baseline], cwd=REPO, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive.stdout, check=True)
        os.environ["TUNERY_HOME"] = str(tmp / "home")
        data = prepare(PrepConfig(train=["garden_chat.jsonl"], val_fraction=0.15), REPO / "data" / "demo",
                       model).artifact_path
        trees = {"baseline": baseline, "current": REPO}
        runs: dict[str, dict[str, list[dict]]] = {"eval": {}, "teacher": {}}
        for rnd in range(args.rounds):
            for what, script, spec in (("eval", EVAL, {"model": model, "data": data, "eval": demo["eval"]}),
                                       ("teacher", TEACHER, {"model": model, "stage": stage,
                                                             "questions": questions})):
                if args.only and what != args.only:
                    continue
                for name, tree in trees.items():
                    began = time.perf_counter()
                    record = run(tree, script, spec)
                    runs[what].setdefault(name, []).append(record)
                    print(f"round {rnd + 1}: {what} {name}: {record['seconds']:.1f} s "
                          f"({time.perf_counter() - began:.1f} s with start-up)", file=sys.stderr)
    report: dict = {"baseline": args.baseline, "model": Path(model).name, "rounds": args.rounds}
    if runs["eval"]:
        old, new = runs["eval"]["baseline"], runs["eval"]["current"]
        report["eval"] = {
            "baseline_s": statistics.median(r["seconds"] for r in old),
            "current_s": statistics.median(r["seconds"] for r in new),
            "perplexity_baseline": old[0]["metrics"]["perplexity"], "perplexity_current": new[0]["metrics"]["perplexity"],
            "same_perplexity": abs(old[0]["metrics"]["perplexity"] / new[0]["metrics"]["perplexity"] - 1) < 1e-4,
            "same_samples": old[0]["samples"] == new[0]["samples"],
        }
        report["eval"]["wall_time_ratio"] = report["eval"]["current_s"] / report["eval"]["baseline_s"]
    if runs["teacher"]:
        old, new = runs["teacher"]["baseline"], runs["teacher"]["current"]
        report["teacher"] = {
            "prompts": len(questions),
            "baseline_s": statistics.median(r["seconds"] for r in old),
            "current_s": statistics.median(r["seconds"] for r in new),
            "identical_answers": old[0]["answers"] == new[0]["answers"],
            "answers_differing": sum(a != b for a, b in zip(old[0]["answers"], new[0]["answers"])),
        }
        report["teacher"]["speedup"] = report["teacher"]["baseline_s"] / report["teacher"]["current_s"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
