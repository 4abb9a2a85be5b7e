"""The dashboard (issue 6): each page under Streamlit's AppTest against a registry written by the real registry code;
the served app in a real headless Chromium; a registry written while the dashboard is open; SQL metacharacters."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import REPO, free_port

import registry

PAGES = REPO / "dashboard" / "views"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(autouse=True)
def fresh_cache():
    """Cached query results belong to one test's registry."""
    import streamlit as st

    st.cache_data.clear()
    yield
    st.cache_data.clear()


@pytest.fixture
def filled(tiny_model_dir):
    """A base, a fine-tune with curves and samples, a merge with two parents, and a failed run."""
    base = registry.create_version("tiny", "base", base_model="tiny")
    registry.finish_version(base, str(tiny_model_dir))
    registry.record_metrics(base, {"perplexity": 30.0, "tokens_per_s": 12.0, "ttft_ms": 90.0, "peak_rss_mb": 900.0})
    sft = registry.create_version("fern", "sft", base_model="tiny", parents=[base], data_hash="d" * 64,
                                  hyperparameters={"sft": {"learning_rate": 0.001, "epochs": 3}, "seed": 42})
    registry.record_history(sft, [{"step": s, "epoch": s / 10, "loss": 3.0 - 0.1 * s, "learning_rate": 1e-3,
                                   "grad_norm": 0.5} for s in range(1, 11)])
    registry.finish_version(sft, str(tiny_model_dir), info={"health": {"loss": {
        "ok": True, "verdict": "falling", "detail": "3.0 -> 2.0"}}})
    registry.record_metrics(sft, {"perplexity": 12.0, "tokens_per_s": 17.0, "ttft_ms": 80.0, "peak_rss_mb": 950.0})
    registry.record_samples(sft, [{"prompt": "Water basil?", "answer": "Once a week. Happy growing!"}])
    merged = registry.create_version("fern", "merge", base_model="tiny", parents=[sft, base],
                                     hyperparameters={"merge": {"method": "slerp", "t": 0.5}, "seed": 42})
    registry.finish_version(merged, str(tiny_model_dir))
    registry.record_metrics(merged, {"perplexity": 11.0, "tokens_per_s": 10.0, "ttft_ms": 85.0,
                                     "peak_rss_mb": 960.0})
    registry.record_samples(merged, [{"prompt": "Water basil?", "answer": "Weekly, deeply."}])
    failed = registry.create_version("fern", "dpo", base_model="tiny", parents=[merged])
    registry.fail_version(failed, "loss became NaN at step 3")
    return {"base": base, "sft": sft, "merged": merged, "failed": failed}


def _app(page: str, **query: str):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(PAGES / page), default_timeout=60)
    for key, value in query.items():
        at.query_params[key] = value
    return at.run()


def _cells(at) -> list[str]:
    return at.dataframe[0].value["link"].tolist()


def test_versions_page_lists_every_version_and_filters(filled):
    at = _app("versions.py")
    assert not at.exception
    table = at.dataframe[0].value
    assert set(table["link"]) == {f"/version?v={v}" for v in filled.values()}
    assert table.set_index("link").loc[f"/version?v={filled['failed']}", "status"] == "failed"
    assert "1 failed" in at.caption[0].value
    at.multiselect(key="stages").set_value(["sft", "merge"]).run()
    assert sorted(_cells(at)) == [f"/version?v={filled['sft']}", f"/version?v={filled['merged']}"]
    at.multiselect(key="stages").set_value([]).run()
    at.text_input(key="search").input("NaN").run()
    assert _cells(at) == [f"/version?v={filled['failed']}"]


@pytest.mark.parametrize("text", ["' OR '1'='1", "%", "_", "fern:1'; DROP TABLE versions; --", "\\", '")--'])
def test_sql_metacharacters_in_filters_match_nothing_and_break_nothing(filled, text):
    at = _app("versions.py")
    at.text_input(key="search").input(text).run()
    assert not at.exception
    assert _cells(at) == []
    assert registry.version_table(names=[text]) == [] and registry.version_table(alias=text) == []
    assert len(registry.version_table()) == 4  # nothing dropped


def test_version_page_shows_record_lineage_curves_and_samples(filled):
    at = _app("version.py", v=filled["sft"])
    assert not at.exception
    assert at.title[0].value == filled["sft"]
    text = " ".join(m.value for m in at.markdown)
    assert f"[{filled['base']}]" in text and f"[{filled['merged']}]" in text  # parent and child links
    assert any("falling" in s.value for s in at.success)
    assert len(at.get("vega_lite_chart")) >= 3  # loss, learning rate, grad norm
    samples = at.dataframe[1].value
    assert samples.iloc[0]["answer"] == "Once a week. Happy growing!"
    failed = _app("version.py", v=filled["failed"])
    assert failed.error[0].value == "loss became NaN at step 3"


def test_version_page_shows_what_a_distilled_student_kept(filled, tiny_model_dir):
    student = registry.create_version("fern", "distill-prompt", base_model="tiny", parents=[filled["base"]])
    registry.finish_version(student, str(tiny_model_dir), info={"teacher": filled["base"], "teacher_backend": "hf"})
    registry.record_metrics(student, {
        "distill_heldout_answers": 15.0, "distill_prompt_tokens_teacher": 465.0, "distill_prompt_tokens_student": 38.0,
        "distill_prompt_tokens_saved": 427.0, "distill_ttft_ms_teacher": 840.0, "distill_ttft_ms_student": 120.0,
        "distill_ttft_reduction": 1 - 120 / 840, "distill_perplexity_teacher": 3.0, "distill_perplexity_start": 4.5,
        "distill_perplexity_student": 2.8, "distill_perplexity_reduction": 1 - 2.8 / 4.5,
        "distill_gap_closed": 1.7 / 1.5})
    at = _app("version.py", v=student)
    assert not at.exception
    assert "Distillation" in [h.value for h in at.subheader]
    table = next(d.value for d in at.dataframe if "measure" in d.value).set_index("measure")
    assert table.loc["prompt tokens per request", "change"] == "-427"
    assert table.loc["time to first token (ms)", "change"] == "-86%"
    assert table.loc["perplexity of held-out teacher answers", "start"] == 4.5
    assert "Distillation" not in [h.value for h in _app("version.py", v=filled["sft"]).subheader]


def test_compare_page_colours_deltas_and_diffs_hyperparameters(filled):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(PAGES / "compare.py"), default_timeout=60)
    at.query_params["v"] = [filled["base"], filled["sft"], filled["merged"]]
    at.run()
    assert not at.exception
    metrics = at.dataframe[0].value
    row = metrics.set_index("metric").loc["perplexity"]
    assert row[f"Δ {filled['sft']}"] == pytest.approx(-18.0) and row[f"Δ% {filled['merged']}"] == pytest.approx(
        -19 / 30)
    styles = at.dataframe[0].proto.arrow_data.styler.styles
    assert "rgba(0, 160, 0" in styles and "rgba(220, 0, 0" in styles  # lower perplexity green, slower decode red
    hp = at.dataframe[1].value
    assert "sft.learning_rate" in set(hp["hyperparameter"]) and "merge.method" in set(hp["hyperparameter"])
    answers = at.dataframe[2].value
    assert answers.iloc[0][filled["merged"]] == "Weekly, deeply."


def test_compare_page_puts_held_out_answers_beside_the_judges_verdicts(filled):
    base, sft = filled["base"], filled["sft"]
    held = [{"prompt": "Water basil?", "reference": "Weekly.", "category": "care"},
            {"prompt": "Sow peas?", "reference": "In March.", "category": "timing"}]
    registry.record_answers(base, "hf", [{**h, "answer": a} for h, a in zip(held, ["Daily.", "Never."])])
    registry.record_answers(sft, "hf", [{**h, "answer": a} for h, a in zip(held, ["Weekly, deeply.", "In May."])])
    registry.record_judgements(sft, base, "judge:1", [
        {"prompt": "Water basil?", "first": "version", "second": "version", "outcome": "win"},
        {"prompt": "Sow peas?", "first": "version", "second": "against", "outcome": "tie"}])
    at = _app("compare.py", v=[base, sft])
    assert not at.exception
    table = next(d.value for d in at.dataframe if "reference" in d.value).set_index("prompt")
    assert table.loc["Water basil?", sft] == "Weekly, deeply." and table.loc["Water basil?", base] == "Daily."
    assert table.loc["Water basil?", "reference"] == "Weekly."
    assert table.loc["Water basil?", f"judge: {sft} vs {base}"] == "win (version / version)"
    assert table.loc["Sow peas?", f"judge: {sft} vs {base}"] == "tie (version / against)"
    summary = " ".join(m.value for m in at.markdown)
    assert f"**{sft}** against **{base}**, judged by `judge:1`: win rate **0.75**" in summary
    assert "the two orders agreed on 50%" in summary


def test_version_page_marks_the_early_stopping_step(filled, tiny_model_dir):
    stopped = registry.create_version("fern", "sft", base_model="tiny", parents=[filled["base"]])
    registry.record_history(stopped, [{"step": s, "epoch": s / 10, "loss": 3.0 - 0.1 * s, "eval_loss": 2 + abs(s - 4)}
                                      for s in range(1, 7)])
    registry.finish_version(stopped, str(tiny_model_dir))
    registry.record_metrics(stopped, {"best_step": 4.0, "best_eval_loss": 2.0, "stopped_early": 1.0,
                                      "train_steps": 6.0})
    at = _app("version.py", v=stopped)
    assert not at.exception
    assert any("the version is step 4's weights" in c.value and "stopped early at step 6" in c.value
               for c in at.caption)
    charts = [c for c in at.get("vega_lite_chart") if '"rule"' in c.proto.spec]
    assert len(charts) == 2  # the loss and the validation loss mark the best step


def test_quality_page_marks_the_pareto_frontier(filled):
    from dashboard.data import pareto, version_table

    at = _app("quality.py")
    assert not at.exception
    front = at.dataframe[0].value
    assert set(front["version"]) == {filled["sft"], filled["merged"]}  # the base is beaten on both axes
    table = version_table(statuses=["ready"])
    assert pareto(table).tolist() == [v in (filled["sft"], filled["merged"]) for v in table["version"]]
    spec = at.get("vega_lite_chart")[0].proto.spec
    assert "href" in spec and "/version?v=" in str(at.get("vega_lite_chart")[0].proto.datasets)


def test_sweeps_page_plots_each_swept_value_and_the_trials_frontier(tiny_model_dir):
    """A 3-trial sweep over learning rate and rank, one trial failed: the page names the best trial, draws the
    metric against each swept key (the learning rates on a log axis) and the frontier of the finished trials."""
    from registry import sweeps

    lr, rank = "stages[0].learning_rate", "stages[0].lora.r"
    sweeps.create_sweep("abc123", "fern", "/configs/demo.yaml", "grid", "perplexity", "minimize",
                        {lr: [1e-4, 1e-3, 1e-2], rank: [8]})
    speeds = {0: (14.0, 15.0), 1: (11.0, 16.0)}  # trial: (perplexity, tokens/s); trial 1 beats trial 0 on both
    for trial, value in enumerate([1e-4, 1e-3, 1e-2]):
        sweeps.start_trial("abc123", trial, {lr: value, rank: 8})
        if trial in speeds:
            v = registry.create_version("fern", "sft", parents=[])
            registry.finish_version(v, str(tiny_model_dir))
            registry.record_metrics(v, {"perplexity": speeds[trial][0], "tokens_per_s": speeds[trial][1]})
            sweeps.finish_trial("abc123", trial, version=v, value=speeds[trial][0], seconds=30.0 + trial)
        else:
            sweeps.finish_trial("abc123", trial, version=None, value=None, seconds=2.0, error="loss became NaN")
    sweeps.finish_sweep("abc123", 1)
    at = _app("sweeps.py", s="abc123")
    assert not at.exception
    assert "Best: trial 1" in at.success[0].value and "fern:2" in at.success[0].value
    assert "3 trials, 1 failed" in at.caption[0].value
    charts = at.get("vega_lite_chart")
    assert len(charts) == 3  # one per swept key, and the frontier
    assert '"type":"log"' in charts[0].proto.spec.replace(" ", "")
    # Vega-Lite reads "." and "[" in a field name as a path into nested data, which would leave a chart empty
    import json

    def fields(node) -> list[str]:
        if isinstance(node, dict):
            own = [node["field"]] if isinstance(node.get("field"), str) else []
            return own + [f for v in node.values() for f in fields(v)]
        return [f for v in node for f in fields(v)] if isinstance(node, list) else []

    used = [f for c in charts for f in fields(json.loads(c.proto.spec))]
    assert used and not [f for f in used if "[" in f or "." in f], used
    assert "1 of 2 trials are on the frontier" in " ".join(c.value for c in at.caption)
    table = at.dataframe[0].value
    assert table["status"].tolist() == ["ready", "ready", "failed"] and table["error"].iloc[2] == "loss became NaN"


def test_lineage_page_draws_merges_with_every_parent(filled):
    at = _app("lineage.py", name="fern")
    assert not at.exception
    dot = at.get("graphviz_chart")[0].proto.spec
    for parent in (filled["sft"], filled["base"]):
        assert f'"{parent}" -> "{filled["merged"]}"' in dot
    assert f'"{filled["merged"]}" -> "{filled["failed"]}"' in dot and "#f8d0d0" in dot  # the failed run in red


def test_promote_and_rollback_from_the_version_page(tiny_model_dir, tmp_path, garden_rows):
    """The page's buttons run the CLI's code: a promotion with its gate verdicts, then a rollback that is refused."""
    from conftest import write_jsonl

    from flows.inputs import load_with_data

    write_jsonl(tmp_path / "garden.jsonl", garden_rows)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tiny", "base_model": str(tiny_model_dir), "base_name": "tiny",
        "data": {"train": "garden.jsonl", "val_fraction": 0.15},
        "eval": {"prompts": ["Water basil?"]},
        "export": {"quant": "f32", "heldout_rows": 4, "max_new_tokens": 8, "answer_tokens": 8},
        "promote": {"require_checks": ["modelfile", "loads", "tokenization", "template", "greedy"],
                    "min_decode_tokens_per_s": 0.0},
    }))
    _, _, base, _ = load_with_data(config)
    at = _app("version.py", v=base.version)
    at.text_input[0].set_value("staging")
    at.text_input[1].set_value(str(config))
    next(b for b in at.button if b.label.startswith("Export, check and promote")).click().run()
    assert not at.exception
    assert registry.exports.get_alias("tiny", "staging").version == base.version
    assert any("PROMOTED" in c.value for c in at.code)
    verdicts = at.dataframe[-1].value
    assert set(verdicts["name"]) >= {"check template", "mean_kl", "perplexity_vs_holder"} and verdicts["passed"].all()
    assert set(verdicts["threshold"]) >= {"passed", "0.1"}  # mixed-type columns reach Arrow as text
    at = _app("version.py", v=base.version)
    next(b for b in at.button if b.label.startswith("Roll back")).click().run()
    assert "has no earlier holder" in at.error[0].value


def _start_dashboard(tunery_home, tmp_path) -> tuple[str, subprocess.Popen]:
    """`tunery dashboard` as a user starts it, on a free port of 127.0.0.1, once it answers."""
    port = free_port()
    env = {**os.environ, "TUNERY_HOME": str(tunery_home), "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    log = (tmp_path / "dashboard.log").open("w")
    proc = subprocess.Popen([str(Path(os.sys.executable).parent / "tunery"), "dashboard", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/_stcore/health", timeout=2)
            return url, proc
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"dashboard did not start: {(tmp_path / 'dashboard.log').read_text()[-2000:]}")
            time.sleep(0.5)


def _listening(port: int) -> set[str]:
    import psutil

    return {c.laddr.ip for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


@pytest.fixture
def served(filled, tunery_home, tmp_path):
    url, proc = _start_dashboard(tunery_home, tmp_path)
    yield url
    proc.terminate()
    proc.wait(timeout=20)


def test_stopping_the_dashboard_stops_its_server(filled, tunery_home, tmp_path):
    """SIGTERM to `tunery dashboard` leaves no Streamlit server behind holding the port."""
    import psutil

    url, proc = _start_dashboard(tunery_home, tmp_path)
    port = int(url.rsplit(":", 1)[1])
    started = psutil.Process(proc.pid).children(recursive=True)
    proc.terminate()
    proc.wait(timeout=20)
    deadline = time.time() + 20
    while _listening(port) and time.time() < deadline:
        time.sleep(0.5)
    assert not _listening(port) and not [p for p in started if p.is_running()]


def test_the_dashboard_listens_on_127_0_0_1_only(served):
    """Connecting to 127.0.0.1 also works when a server listens on every interface: look at the listening socket."""
    assert _listening(int(served.rsplit(":", 1)[1])) == {"127.0.0.1"}


@pytest.fixture
def browser(tmp_path):
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail("Debian chromium and chromium-driver are missing: `make setup` installs them")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _grid_text(driver) -> set[str]:
    from selenium.webdriver.common.by import By

    return {e.get_attribute("textContent") for e in driver.find_elements(By.CSS_SELECTOR, "[role=gridcell]")}


def _wait_for(driver, predicate, timeout: float = 45):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.5).until(lambda d: predicate(_grid_text(d)))


def _wait_idle(driver, timeout: float = 30) -> None:
    """Until the app's script run is over (Streamlit shows a status widget while it runs)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    time.sleep(1)
    WebDriverWait(driver, timeout, poll_frequency=0.25).until(
        lambda d: not d.find_elements(By.CSS_SELECTOR, "[data-testid=stStatusWidget]"))


def test_chromium_shows_the_versions_and_a_version_registered_while_open(served, browser, filled, tmp_path,
                                                                        tiny_model_dir):
    from selenium.webdriver.common.by import By

    browser.get(served)
    _wait_for(browser, lambda cells: {f"/version?v={v}" for v in filled.values()} <= cells)
    browser.save_screenshot(str(tmp_path / "versions.png"))
    assert (tmp_path / "versions.png").stat().st_size > 10_000
    assert "1 failed" in browser.find_element(By.TAG_NAME, "body").text
    # A flow registers versions while the page is open and the server keeps reading the same file.
    for _ in range(3):
        new = registry.create_version("fern", "sft", base_model="tiny", parents=[filled["sft"]])
        registry.finish_version(new, str(tiny_model_dir))
        registry.record_metrics(new, {"perplexity": 10.5})
    _wait_idle(browser)
    browser.find_element(By.XPATH, "//button[.//p[text()='Refresh']]").click()
    _wait_for(browser, lambda cells: f"/version?v={new}" in cells)
    browser.save_screenshot(str(tmp_path / "after_new_version.png"))
