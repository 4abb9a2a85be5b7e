"""Benchmark: decode speed of a model exported to GGUF and run by llama.cpp, against HF `generate` of the same
weights, at batch 1 with greedy decoding, as a ratio measured in one run.

Both decode exactly --tokens tokens (no early stop) after the same chat prompts, with the same number of CPU
threads; HF runs the fp32 safetensors model, llama.cpp each exported file (F16 and the given quantizations). Run
it with `make bench` or `.venv/bin/python bench/export_speed.py [--model FOLDER] [--quants f16,q8_0,q4_k_m]
[--tokens N] [--repeats R]`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROMPTS = ["How do I keep my basil from wilting?", "When should I plant tulip bulbs?",
           "Explain in two sentences what a language model is."]


def main() -> None:
    import torch

    from tasks.evaluate.evaluation import latency
    from tasks.export.convert import write_gguf
    from tasks.export import verify
    from tasks.models import ensure_default_base_model, load_model, load_tokenizer, prompt_ids

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the packaged SmolLM2-135M-Instruct)")
    parser.add_argument("--quants", default="f16,q8_0,q4_k_m")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    threads = torch.get_num_threads()
    model_dir = args.model or str(ensure_default_base_model())
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    hf = latency(model, tok, PROMPTS, max_new_tokens=args.tokens, repeats=args.repeats, warmup=1)
    report = {"model": Path(model_dir).name, "threads": threads, "tokens": args.tokens, "prompts": len(PROMPTS),
              "hf_fp32_tokens_per_s": hf["tokens_per_s"], "hf_fp32_ttft_ms": hf["ttft_ms"], "llama_cpp": {}}
    with tempfile.TemporaryDirectory() as tmp:
        f16 = write_gguf(model_dir, Path(tmp) / "model-f16.gguf", "f16")
        for quant in args.quants.split(","):
            path = f16 if quant == "f16" else verify.quantize(f16, Path(tmp) / f"model-{quant}.gguf", quant, threads)
            llm = verify.open_gguf(path, threads=threads)
            speeds, ttfts = [], []
            for prompt in PROMPTS:
                ids = prompt_ids(tok, [{"role": "user", "content": prompt}])
                verify.greedy_ids(llm, ids, args.tokens, set())  # warm-up
                for _ in range(args.repeats):
                    _, first, speed = verify.greedy_ids(llm, ids, args.tokens, set())
                    speeds.append(speed)
                    ttfts.append(first)
            llm.close()
            tps = statistics.median(speeds)
            report["llama_cpp"][quant] = {
                "size_mb": os.path.getsize(path) / 2**20, "tokens_per_s": tps,
                "prefill_ms": 1000 * statistics.median(ttfts), "speedup_vs_hf": tps / hf["tokens_per_s"]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
