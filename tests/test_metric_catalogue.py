"""The metric catalogue (core/metrics.py): each metric declared once, and everything that ranks, colours or tables
metrics reads it. The architecture promise: a new metric is its computation plus one catalogue entry, and it then
shows in `tunery compare --json`, `tunery show`, the dashboard's table and the sweep and run rankings, with its
direction respected."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

import registry
from core import metrics as catalogue
from core.errors import TuneryError
from registry.records import Trial

# The new metric of the promise: how long an answer is against its reference. Lower is better here, the opposite of
# every other answer score, so a ranking that ignored the catalogue's direction would pick the wrong version.
LINE = ('  answer_length_ratio: {better: lower, fmt: ".2f", unit: "x", label: "length ratio", '
        'meaning: "answer length over the reference\'s length"}\n')


def with_line(text: str) -> str:
    """The catalogue file with the new metric's line at the end of the headline group."""
    return text.replace("quality:\n", LINE + "quality:\n", 1)


def length_ratio(answer: str, reference: str) -> float:
    return len(answer.split()) / max(len(reference.split()), 1)


def test_names_inherit_their_family_and_the_exported_form():
    assert catalogue.lookup("perplexity/support").name == "perplexity"
    assert catalogue.lookup("gguf_answer_f1").name == "answer_f1"
    assert catalogue.is_better("gguf_general_drop_pct", -2.0) is True
    assert catalogue.is_better("tokens_per_s", -2.0) is False
    assert catalogue.is_better("train_steps", 5.0) is None  # a count has no direction
    assert catalogue.lookup("never_declared") is None
    with pytest.raises(ValueError, match="declared twice"):
        catalogue.register(catalogue.Metric("perplexity", "higher", "", ".3f", "headline", "twice"))
    assert catalogue.headline() == ("perplexity", "answer_f1", "general_accuracy", "tokens_per_s", "ttft_ms",
                                    "peak_rss_mb")
    with pytest.raises(ValueError, match="has no better direction"):
        catalogue.check_rankable("train_steps", "metric")


def test_every_score_and_every_evaluation_metric_is_declared(tiny_model_dir, prepared):
    """What the evaluation of a tiny model records, and every answer scorer, has a catalogue entry."""
    from tasks.evaluate.evaluation import EvalConfig, measure
    from tasks.evaluate.scores import SCORERS

    assert all(catalogue.lookup(f"answer_{name}") for name in SCORERS)
    metrics, _, _ = measure(str(tiny_model_dir), prepared.artifact_path,
                            EvalConfig(prompts=["Hi"], max_new_tokens=4, repeats=1, warmup=0, answer_tokens=4),
                            progress=False)
    assert "answer_f1" in metrics and "tokens_per_s" in metrics
    assert [k for k in metrics if catalogue.lookup(k) is None] == []


@pytest.fixture
def with_new_metric(monkeypatch, tmp_path):
    """The new metric's two pieces: its line in a copy of core/metrics.yaml, and its computation (an answer
    scorer). Returns a copy of core/ holding that catalogue, for processes of their own."""
    from tasks.evaluate import scores

    code = tmp_path / "code"
    shutil.copytree(REPO / "core", code / "core", ignore=shutil.ignore_patterns("__pycache__"))
    catalogue_file = code / "core" / "metrics.yaml"
    catalogue_file.write_text(with_line(catalogue_file.read_text()))
    loaded = {m.name: m for m in catalogue.load(catalogue_file)}
    monkeypatch.setattr(catalogue, "CATALOGUE", loaded)
    monkeypatch.setitem(scores.SCORERS, "length_ratio", length_ratio)
    return code


def _registered(tiny_model_dir) -> tuple[str, str, str]:
    """A base and two fine-tunes whose held-out answers were scored by every scorer (the new one included)."""
    from tasks.evaluate.scores import answer_scores

    base = registry.create_version("tiny", "base", base_model="tiny")
    registry.finish_version(base, str(tiny_model_dir))
    made = []
    for answer, perplexity in (("Water it weekly, deeply, in the morning.", 10.0), ("Weekly.", 12.0)):
        v = registry.create_version("fern", "sft", base_model="tiny", parents=[base])
        registry.finish_version(v, str(tiny_model_dir))
        measured = answer_scores([{"answer": answer, "reference": "Water it weekly."}])
        registry.record_metrics(v, {**measured, "perplexity": perplexity}, eval_data_hash="d" * 64)
        made.append(v)
    return base, made[0], made[1]


def test_a_new_metric_is_one_entry_plus_its_computation(with_new_metric, tiny_model_dir, tunery_home):
    from flows.config import validate_config
    from flows.promotion import best_version
    from flows.sweep import best_trial, direction_of

    _, wordy, brief = _registered(tiny_model_dir)
    assert registry.get_version(brief).metrics["answer_length_ratio"] == pytest.approx(1 / 3)
    assert registry.get_version(wordy).metrics["answer_length_ratio"] == pytest.approx(7 / 3)

    # The CLI in its own process, on the copy of core/ whose catalogue has the one new line.
    def tunery(*args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "TUNERY_HOME": str(tunery_home), "PYTHONPATH": str(with_new_metric)}
        return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=with_new_metric.parent, env=env,
                              capture_output=True, text=True, timeout=300, check=True)

    rows = {r["metric"]: r for r in json.loads(tunery("compare", wordy, brief, "--json").stdout)["metrics"]}
    assert rows["answer_length_ratio"]["better"] is True  # lower, as its entry says
    assert rows["answer_f1"]["better"] is False  # the shorter answer recalled less of the reference
    listed = tunery("models").stdout
    assert "length ratio" in listed and "0.33" in listed  # a headline column, in its format
    assert "answer_length_ratio" in tunery("show", brief).stdout

    # The registry's version table (every dashboard table reads it) and the dashboard's Versions page.
    table = {r["version"]: r for r in registry.version_table()}
    assert table[brief]["answer_length_ratio"] == pytest.approx(1 / 3)
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(REPO / "dashboard" / "views" / "versions.py"), default_timeout=60).run()
    assert not at.exception
    shown = at.dataframe[0].value.set_index("link")
    assert shown.loc[f"/version?v={brief}", "answer_length_ratio"] == pytest.approx(1 / 3)

    # The rankings: a sweep's direction and best trial, and the best version a run promotes (`metric:` config key).
    assert direction_of("answer_length_ratio", None) == "minimize"
    trials = [Trial(n, {}, "ready", None, value, 1.0, None, None, None) for n, value in enumerate((7 / 3, 1 / 3))]
    assert best_trial(trials, direction_of("answer_length_ratio", None)).trial == 1
    assert best_version([wordy, brief], "d" * 64, "answer_length_ratio").version == brief
    assert best_version([wordy, brief], "d" * 64, "answer_f1").version == wordy
    assert best_version([wordy, brief], "d" * 64).version == wordy  # the default: perplexity
    cfg, _ = validate_config({"name": "fern", "data": {"train": "x.jsonl"}, "metric": "answer_length_ratio"},
                             REPO / "x.yaml")
    assert cfg.metric == "answer_length_ratio"


def test_a_config_metric_without_a_direction_is_refused_by_its_key():
    from flows.config import validate_config

    with pytest.raises(TuneryError, match=r"metric.*'train_steps' has no better direction"):
        validate_config({"name": "fern", "data": {"train": "x.jsonl"}, "metric": "train_steps"}, REPO / "x.yaml")
