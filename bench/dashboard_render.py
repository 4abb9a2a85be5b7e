"""Benchmark: the dashboard's first render with 10,000 registered versions, against the same with 100, in one run.

Two measurements per registry size, each on a cold cache: the Versions page script run under Streamlit's AppTest
(server-side: the registry query and the table), and, with --browser, the time from opening the served app in
headless Chromium until the versions table shows its first rows. Run it with
`.venv/bin/python bench/dashboard_render.py [--versions 10000] [--baseline 100] [--repeats 3] [--browser]`.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def fill(home: Path, count: int) -> None:
    """`count` versions in families of 20 (a base, fine-tunes, a merge now and then, some failed)."""
    os.environ["TUNERY_HOME"] = str(home)
    import registry

    rng = random.Random(0)
    batch, made = [], 0
    while made < count:
        family = f"model-{made // 20}"
        parents: list[str] = []
        for i in range(min(20, count - made)):
            stage = "base" if i == 0 else rng.choice(["sft", "sft", "dpo", "cpt", "merge"])
            failed = i > 0 and rng.random() < 0.05
            batch.append({"name": family, "stage": stage, "status": "failed" if failed else "ready",
                          "base_model": "SmolLM2-135M-Instruct", "parents": parents[-2:] if stage == "merge" else
                          parents[-1:], "error": "loss became NaN" if failed else None,
                          "metrics": {} if failed else {"perplexity": rng.uniform(8, 40),
                                                        "tokens_per_s": rng.uniform(10, 140),
                                                        "ttft_ms": rng.uniform(50, 400),
                                                        "peak_rss_mb": rng.uniform(400, 9000)}})
            parents.append(f"{family}:{i + 1}")
            made += 1
        if len(batch) >= 1000 or made >= count:
            registry.import_versions(batch)
            batch = []


def apptest_render(home: Path) -> float:
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    os.environ["TUNERY_HOME"] = str(home)
    st.cache_data.clear()
    began = time.perf_counter()
    at = AppTest.from_file(str(REPO / "dashboard" / "views" / "versions.py"), default_timeout=300).run()
    elapsed = time.perf_counter() - began
    assert not at.exception, at.exception
    return elapsed


def browser_render(home: Path, expected_first: str) -> float:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "tunery"), "dashboard", "--port", str(port)],
                              env={**os.environ, "TUNERY_HOME": str(home)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{url}/_stcore/health", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    options = webdriver.ChromeOptions()
    with tempfile.TemporaryDirectory() as profile:
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                     "--disable-background-networking", "--window-size=1400,1000", f"--user-data-dir={profile}"):
            options.add_argument(flag)
        options.binary_location = "/usr/bin/chromium"
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        try:
            began = time.perf_counter()
            driver.get(url)
            WebDriverWait(driver, 300, poll_frequency=0.1).until(lambda d: any(
                e.get_attribute("textContent") == expected_first
                for e in d.find_elements(By.CSS_SELECTOR, "[role=gridcell]")))
            return time.perf_counter() - began
        finally:
            driver.quit()
            server.terminate()
            server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=int, default=10_000)
    parser.add_argument("--baseline", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--browser", action="store_true", help="also time the served app in headless Chromium")
    args = parser.parse_args()
    report: dict = {"repeats": args.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        for label, count in (("baseline", args.baseline), ("large", args.versions)):
            home = Path(tmp) / label
            began = time.perf_counter()
            fill(home, count)
            import registry

            newest = registry.version_table()[0]["version"]
            apptest_render(home)  # warm-up: imports and Streamlit's first-run costs are not the registry's
            entry = {"versions": count, "fill_s": time.perf_counter() - began,
                     "apptest_first_render_s": statistics.median(apptest_render(home) for _ in range(args.repeats))}
            if args.browser:
                entry["browser_first_rows_s"] = statistics.median(
                    browser_render(home, f"/version?v={newest}") for _ in range(args.repeats))
            report[label] = entry
    for key in ("apptest_first_render_s", "browser_first_rows_s"):
        if key in report["large"]:
            report[f"{key}_ratio"] = report["large"][key] / report["baseline"][key]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
