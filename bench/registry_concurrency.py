"""Benchmark and check: many processes registering versions at once while the dashboard's queries run.

Each writer process makes `--registrations` versions the way a pipeline stage does (create_version, then
record_metrics, then finish_version: three transactions), on two shared model names, so writers race for the
same version numbers. Meanwhile one reader process runs the dashboard's table queries (settle_interrupted,
version_table, facets) in a loop and times each read. Afterwards the registry is checked: every registration
landed, each name's numbers are 1..N with no gap or repeat, every version is ready with its metrics, and no
process saw an error.

    .venv/bin/python bench/registry_concurrency.py --writers 4 --registrations 25            # DuckDB in a temp home
    .venv/bin/python bench/registry_concurrency.py --writers 16 --registrations 50 --url postgresql://...

The registry at --url must be empty (a fresh database); without --url, a fresh DuckDB file in a temp
TUNERY_HOME is used. Prints one JSON object; exits 1 when the check fails.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

NAMES = ("alpha", "beta")


def writer(index: int, count: int, start, errors) -> None:
    import registry

    registry.list_versions(name="-")  # connected before the clock starts, as a running pipeline is
    start.wait()
    for i in range(count):
        try:
            name = NAMES[(index + i) % len(NAMES)]
            version = registry.create_version(name, "sft", base_model="tiny", parents=[],
                                              hyperparameters={"writer": index, "i": i})
            registry.record_metrics(version, {"perplexity": 10.0 + i, "tokens_per_s": 100.0 + index})
            registry.finish_version(version, None, {"writer": index, "i": i})
        except Exception:
            errors.put(f"writer {index}, registration {i}: {traceback.format_exc(limit=3)}")


def reader(start, stop, reads, errors, every: float) -> None:
    import registry

    registry.version_table()  # the dashboard is open before the writers start
    start.wait()
    times = []
    while not stop.is_set():
        began = time.perf_counter()
        try:
            registry.settle_interrupted()
            registry.version_table()
            registry.facets()
        except Exception:
            errors.put(f"reader: {traceback.format_exc(limit=3)}")
        times.append(time.perf_counter() - began)
        time.sleep(every)
    reads.put(times)


def run(writers: int, registrations: int, read_every: float = 0.1) -> dict:
    import registry

    registry.list_versions()  # create (and migrate) the registry before the race starts
    ctx = mp.get_context("spawn")
    start, stop = ctx.Event(), ctx.Event()
    errors, reads = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=writer, args=(k, registrations, start, errors)) for k in range(writers)]
    read_proc = ctx.Process(target=reader, args=(start, stop, reads, errors, read_every))
    for p in (*procs, read_proc):
        p.start()
    time.sleep(2.0)  # let every process import before the clock starts
    began = time.perf_counter()
    start.set()
    for p in procs:
        p.join()
    seconds = time.perf_counter() - began
    stop.set()
    read_times = reads.get(timeout=120)
    read_proc.join()
    problems = []
    while not errors.empty():
        problems.append(errors.get())

    versions = registry.list_versions()
    expected = writers * registrations
    numbers = {name: sorted(v.number for v in versions if v.name == name) for name in NAMES}
    consecutive = all(nums == list(range(1, len(nums) + 1)) for nums in numbers.values())
    complete = [v.version for v in versions if v.status == "ready" and "perplexity" in v.metrics]
    ok = not problems and len(versions) == expected and consecutive and len(complete) == expected
    return {"backend": registry.db.backend_name(),
            "writers": writers, "read_every_s": read_every, "registrations_each": registrations, "expected": expected,
            "registered": len(versions), "complete": len(complete), "numbers_consecutive": consecutive,
            "errors": problems[:5], "error_count": len(problems), "seconds": round(seconds, 2),
            "registrations_per_s": round(expected / seconds, 1), "reads": len(read_times),
            "worst_read_s": round(max(read_times), 3) if read_times else None,
            "median_read_s": round(statistics.median(read_times), 3) if read_times else None, "ok": ok}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--registrations", type=int, default=25)
    parser.add_argument("--read-every", type=float, default=0.1,
                        help="seconds between the reader's dashboard reads (default 0.1: ten a second)")
    parser.add_argument("--url", help="TUNERY_REGISTRY_URL of an empty registry (default: DuckDB in a temp home)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TUNERY_HOME"] = tmp
        if args.url:
            os.environ["TUNERY_REGISTRY_URL"] = args.url
        else:
            os.environ.pop("TUNERY_REGISTRY_URL", None)
        result = run(args.writers, args.registrations, args.read_every)
    print(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
