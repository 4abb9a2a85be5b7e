"""Benchmark: tunery's perplexity (batched, length-sorted windows) against a naive one-text-at-a-time loop.

Both score the assistant answers of the same chat examples with the same model; the script checks that they agree
and reports each one's scored tokens per second and the ratio. Run it with `make bench` or
`.venv/bin/python bench/perplexity_speed.py [--model FOLDER] [--rows N] [--batch-size B] [--repeats R]`.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def naive(model, encoded) -> tuple[float, int]:
    """What a notebook does: one example per forward pass, transformers' own loss over the answer tokens."""
    import torch

    nll, count = 0.0, 0
    for e in encoded:
        ids = torch.tensor([e["input_ids"]])
        labels = ids.clone()
        labels[0, torch.tensor(e["score_mask"]) == 0] = -100
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss
        n = int((labels[0, 1:] != -100).sum())
        nll, count = nll + float(loss) * n, count + n
    return nll, count


def main() -> None:
    import torch

    from tasks.evaluate.evaluation import answer_nll, scored_tokens
    from tasks.models import ensure_default_base_model, load_model, load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the packaged SmolLM2-135M-Instruct)")
    parser.add_argument("--rows", type=int, default=64, help="demo chat examples to score")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    model_dir = args.model or str(ensure_default_base_model())
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    lines = (REPO / "data/demo/garden_chat.jsonl").read_text().splitlines()[:args.rows]
    encoded = [scored_tokens(tok, json.loads(line)) for line in lines]

    def timed(fn):
        runs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = fn()
            runs.append(time.perf_counter() - start)
        return result, statistics.median(runs)

    (naive_nll, naive_n), naive_s = timed(lambda: naive(model, encoded))
    scores, ours_s = timed(lambda: answer_nll(model, tok, encoded, window=2048, batch_size=args.batch_size))
    ours_nll, ours_n = sum(s[0] for s in scores), sum(s[1] for s in scores)
    assert ours_n == naive_n, (ours_n, naive_n)
    report = {
        "model": Path(model_dir).name, "examples": len(encoded), "scored_tokens": ours_n,
        "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "naive_tokens_per_s": naive_n / naive_s, "tunery_tokens_per_s": ours_n / ours_s,
        "speedup": naive_s / ours_s,
        "perplexity_naive": math.exp(naive_nll / naive_n), "perplexity_tunery": math.exp(ours_nll / ours_n),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
