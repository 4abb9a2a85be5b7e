"""The DuckDB registry: numbering, lineage, failure records, reopening, bound parameters, lock handling."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

import registry
from core.errors import TuneryError
from core.home import registry_path
from registry.db import connect
from registry.schema import migrations
from registry.records import Check, Export


@pytest.fixture(autouse=True)
def on_both_backends(backend):
    """Every test of this module runs on DuckDB and on PostgreSQL; DuckDB-only ones skip the other."""
    return backend


def duckdb_only(backend):
    if backend != "duckdb":
        pytest.skip("about the DuckDB file itself")


def test_versions_count_up_per_name_and_carry_lineage():
    base = registry.create_version("smol", "base")
    registry.finish_version(base, "/models/smol")
    a = registry.create_version("fern", "sft", parents=[base], hyperparameters={"sft": {"r": 16}}, data_hash="abc")
    b = registry.create_version("fern", "sft", parents=[base])
    assert (base, a, b) == ("smol:1", "fern:1", "fern:2")
    v = registry.get_version("fern:1")
    assert v.parents == ["smol:1"] and v.hyperparameters == {"sft": {"r": 16}} and v.status == "running"
    for key in ("version", "name", "stage", "status", "parents", "base_model", "hyperparameters", "data_hash",
                "metrics", "artifact_path", "created_at"):
        assert key in v.json()


def test_numbers_are_never_reused_even_after_a_failure():
    first = registry.create_version("fern", "sft")
    registry.fail_version(first, "loss was NaN")
    assert registry.create_version("fern", "sft") == "fern:2"
    failed = registry.get_version("fern:1")
    assert failed.status == "failed" and failed.error == "loss was NaN"


def test_metrics_newest_value_wins_and_history_round_trips():
    v = registry.create_version("fern", "sft")
    registry.record_metrics(v, {"perplexity": 20.0, "tokens_per_s": 15.0}, eval_data_hash="d1")
    registry.record_metrics(v, {"perplexity": 12.5}, eval_data_hash="d1")
    registry.record_history(v, [{"step": 1, "epoch": 0.5, "loss": 3.0, "learning_rate": 1e-3},
                                {"step": 2, "epoch": 1.0, "loss": 2.0, "learning_rate": 5e-4}])
    assert registry.get_version(v).metrics == {"perplexity": 12.5, "tokens_per_s": 15.0}
    assert [h["loss"] for h in registry.get_history(v)] == [3.0, 2.0]


def test_registry_survives_reopening_in_another_process():
    v = registry.create_version("fern", "sft")
    registry.record_metrics(v, {"perplexity": 9.0})
    registry.finish_version(v, "/a")
    code = ("import registry, json; v = registry.get_version('fern'); "
            "print(json.dumps([v.version, v.status, v.metrics['perplexity']]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == '["fern:1", "ready", 9.0]'
    with connect(read_only=True) as con:
        applied = con.execute("SELECT id FROM _migrations ORDER BY id").fetchall()
    assert [a[0] for a in applied] == [m[0] for m in migrations()]  # applied once, not again on reopen


def test_unknown_versions_and_parents_are_named():
    with pytest.raises(TuneryError, match="unknown version 'fern:7'"):
        registry.get_version("fern:7")
    with pytest.raises(TuneryError, match="unknown version 'nothing'"):
        registry.get_version("nothing")
    with pytest.raises(TuneryError, match="parent version 'ghost:1' is not registered"):
        registry.create_version("fern", "sft", parents=["ghost:1"])
    assert registry.list_versions() == []  # the refused version left no row


@pytest.mark.parametrize("hostile", ["x' OR '1'='1", "fern'; DROP TABLE versions; --", "%", "fern:1' --"])
def test_hostile_text_is_bound_not_executed(hostile):
    v = registry.create_version("fern", "sft")
    assert registry.list_versions(name=hostile) == []
    with pytest.raises(TuneryError):
        registry.get_version(hostile)
    with pytest.raises(TuneryError, match="invalid model name"):
        registry.create_version(hostile, "sft")
    assert [x.version for x in registry.list_versions()] == [v]


def test_a_reader_waits_for_a_writer_then_succeeds(backend):
    """A process outside tunery's turn-taking (a user's own duckdb session) holds the file: tunery waits."""
    duckdb_only(backend)
    registry.create_version("fern", "sft")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import duckdb, sys, time; con = duckdb.connect(sys.argv[1]); print('locked', flush=True); time.sleep(1.5)"
    ), str(registry_path())], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    start = time.perf_counter()
    assert [v.version for v in registry.list_versions()] == ["fern:1"]
    assert time.perf_counter() - start > 0.5  # it had to wait for the lock, and got through
    holder.wait()


def test_a_failed_write_leaves_no_partial_rows():
    with pytest.raises(Exception, match="no_such_table"):
        with connect() as con:
            con.execute("INSERT INTO model_names VALUES ('half', 1)")
            con.execute("INSERT INTO no_such_table VALUES (1)")
    with connect(read_only=True) as con:
        assert con.execute("SELECT count(*) FROM model_names").fetchone()[0] == 0


def test_compare_signs_follow_better_and_worse():
    a = registry.create_version("fern", "sft", hyperparameters={"sft": {"lr": 0.001, "r": 8, "method": "lora"}})
    b = registry.create_version("fern", "sft", hyperparameters={"sft": {"lr": 0.002, "r": 8, "method": "full"}})
    registry.record_metrics(a, {"perplexity": 20.0, "tokens_per_s": 10.0, "peak_rss_mb": 100.0,
                                "perplexity/support": 30.0, "cost_per_mtok_usd": 2.0, "preference_accuracy": 0.5})
    registry.record_metrics(b, {"perplexity": 10.0, "tokens_per_s": 12.0, "peak_rss_mb": 150.0,
                                "perplexity/support": 33.0, "cost_per_mtok_usd": 1.5, "preference_accuracy": 0.9})
    result = registry.compare_versions(a, b)
    rows = {r["metric"]: r for r in result["metrics"]}
    assert rows["perplexity"]["change"] == -10.0 and rows["perplexity"]["relative_change"] == -0.5
    assert rows["perplexity"]["better"] is True and rows["tokens_per_s"]["better"] is True
    assert rows["peak_rss_mb"]["better"] is False and rows["perplexity/support"]["better"] is False
    assert rows["cost_per_mtok_usd"]["better"] is True and rows["preference_accuracy"]["better"] is True
    hp = {r["hyperparameter"]: r for r in result["hyperparameters"]}
    assert hp["sft.lr"]["change"] == 0.001 and hp["sft.lr"]["relative_change"] == pytest.approx(1.0)
    assert hp["sft.r"]["change"] == 0 and not hp["sft.r"]["changed"]
    assert hp["sft.method"] == {"hyperparameter": "sft.method", "a": "lora", "b": "full", "change": None,
                                "relative_change": None, "changed": True}


def test_lineage_follows_every_parent_to_the_root():
    base = registry.create_version("base", "base")
    registry.finish_version(base, "/b")
    chain = [base]
    for stage in ("cpt", "sft", "dpo"):
        v = registry.create_version("fern", stage, parents=[chain[-1]])
        registry.finish_version(v, f"/{stage}")
        chain.append(v)
    merged = registry.create_version("fern", "merge", parents=[chain[2], chain[3]])
    registry.record_metrics(chain[3], {"perplexity": 9.5})
    tree = registry.lineage(merged)
    assert tree["version"] == "fern:4" and tree["status"] == "running"
    assert [p["version"] for p in tree["parents"]] == ["fern:2", "fern:3"]
    dpo = tree["parents"][1]
    assert dpo["stage"] == "dpo" and dpo["metrics"] == {"perplexity": 9.5}
    path = []
    node = dpo
    while node["parents"]:
        node = node["parents"][0]
        path.append(node["version"])
    assert path == ["fern:2", "fern:1", "base:1"]
    assert registry.children("fern:2") == ["fern:3", "fern:4"]
    assert registry.lineage("base:1")["parents"] == []
    # Walked once: fern:2, reached along two paths, is one node; the edges are parent -> child, in parent order.
    assert sorted(n["version"] for n in tree["nodes"]) == ["base:1", "fern:1", "fern:2", "fern:3", "fern:4"]
    assert tree["edges"] == [["base:1", "fern:1"], ["fern:1", "fern:2"], ["fern:2", "fern:3"], ["fern:2", "fern:4"],
                             ["fern:3", "fern:4"]]
    other = registry.create_version("fern", "sft", parents=[chain[1]])
    graph = registry.lineage_graph([merged, other])  # two versions' ancestries, shared ancestors once
    assert sorted(graph["nodes"]) == ["base:1", "fern:1", "fern:2", "fern:3", "fern:4", "fern:5"]
    assert ("fern:1", "fern:5") in graph["edges"] and len(graph["edges"]) == len(set(graph["edges"])) == 6


def test_a_version_whose_process_was_killed_is_settled_as_failed_interrupted(tunery_home):
    """SIGKILL leaves a version `running` and its temporary folder behind; the next process that opens the
    registry (here `tunery models`) marks it failed (interrupted) and removes the folder. A version whose process
    is alive, or that runs on another host, is left running."""
    import json
    import signal
    import subprocess
    import sys

    from conftest import REPO

    from core.home import artifacts_dir

    script = ("import os, time, registry; from core.home import artifacts_dir; "
              "v = registry.create_version('doomed', 'sft'); "
              "(artifacts_dir() / 'doomed' / f'.1.tmp-{os.getpid()}').mkdir(parents=True); "
              "print(v, flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "TUNERY_HOME": str(tunery_home)})
    assert proc.stdout.readline().strip() == "doomed:1"
    alive = registry.create_version("alive", "sft")  # this process: still running
    elsewhere = registry.create_version("remote", "sft")
    with registry.store.connect() as con:
        con.execute("UPDATE versions SET owner_json = ? WHERE version = ?",
                    [json.dumps({"host": "another-host", "pid": 1, "started": 0.0}), elsewhere])
    tmp = artifacts_dir() / "doomed" / f".1.tmp-{proc.pid}"
    assert registry.settle_interrupted() == [] and tmp.is_dir()  # its process is still alive
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    shown = subprocess.run([sys.executable, "-m", "flows.cli", "models", "--json"], cwd=REPO, capture_output=True,
                           text=True, env={**os.environ, "TUNERY_HOME": str(tunery_home)}, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "doomed:1: its process ended before it finished" in shown.stderr
    rows = {r["version"]: r for r in json.loads(shown.stdout)}
    assert rows["doomed:1"]["status"] == "failed"
    assert registry.get_version("doomed:1").error.startswith("interrupted")
    assert not tmp.exists()
    assert registry.get_version(alive).status == "running" and registry.get_version(elsewhere).status == \
        "running"


def test_metrics_belong_to_the_data_they_were_measured_on():
    """An evaluation on other data (`tunery eval X --config other.yaml`) is listed apart: it does not replace the
    perplexity that show, compare, the best-version choice and the dashboard's table use."""
    from flows.promotion import best_version

    v1, v2, v3 = (registry.create_version("fern", "sft") for _ in range(3))
    for v in (v1, v2, v3):
        registry.finish_version(v, "/models/x")
    registry.record_metrics(v1, {"train_loss": 1.5})
    registry.record_metrics(v1, {"perplexity": 20.0}, eval_data_hash="d1")
    registry.record_metrics(v2, {"perplexity": 15.0}, eval_data_hash="d1")
    registry.record_metrics(v1, {"perplexity": 5.0}, eval_data_hash="d2")  # newer, on other data
    registry.record_metrics(v3, {"perplexity": 9.0}, eval_data_hash="d3")

    shown = registry.get_version(v1)
    assert shown.eval_data_hash == "d1"
    assert shown.metrics == {"train_loss": 1.5, "perplexity": 20.0}
    assert shown.metrics_on_other_data == {"d2": {"perplexity": 5.0}}
    assert registry.get_version(v1, "d2").metrics == {"train_loss": 1.5, "perplexity": 5.0}
    assert best_version([v1, v2], "d1").version == v2
    assert best_version([v1, v2], "d2").version == v1
    with pytest.raises(TuneryError, match="no version evaluated on data d9"):
        best_version([v1, v2], "d9")
    table = {r["version"]: r for r in registry.version_table()}
    assert table[v1]["perplexity"] == 20.0

    same = registry.compare_versions(v1, v2)
    row = {r["metric"]: r for r in same["metrics"]}["perplexity"]
    assert (row["a"], row["b"], row["better"], same["eval_data"]["same"]) == (20.0, 15.0, True, True)
    apart = registry.compare_versions(v2, v3)  # never measured on the same data: values, but no verdict
    row = {r["metric"]: r for r in apart["metrics"]}["perplexity"]
    assert (row["a"], row["b"], row["better"], apart["eval_data"]["same"]) == (15.0, 9.0, None, False)
    registry.record_metrics(v3, {"perplexity": 14.0}, eval_data_hash="d1")
    both = registry.compare_versions(v2, v3)  # now they share d1 (v2's data): compared there
    row = {r["metric"]: r for r in both["metrics"]}["perplexity"]
    assert (row["a"], row["b"], row["better"]) == (15.0, 14.0, True)


def test_migration_006_moves_the_keys_the_pipeline_decides_with_into_typed_columns(backend):
    """A registry written before migration 006 kept fingerprint, adapter, quantization, teacher and preference pairs
    inside info_json; after it they are typed fields of the Version (columns), gone from `info`, and `--json` still
    prints them inside `info` as before."""
    import json

    from registry.schema import migrate

    duckdb_only(backend)  # a PostgreSQL registry starts after migration 006

    registry_path().parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(registry_path()))
    con.execute("CREATE TABLE _migrations (id INTEGER PRIMARY KEY, name VARCHAR, applied_utc TIMESTAMP)")
    for number, name, sql in migrations():
        if number < 6:
            con.execute(sql)
            con.execute("INSERT INTO _migrations VALUES (?, ?, now())", [number, name])
    old = {"fingerprint": "f" * 64, "adapter": True, "quantization_config": {"mode": "nf4", "double_quant": True},
           "teacher": "smol:1", "preference_pairs": "/data/pairs", "method": "qlora"}
    for version, info in (("fern:1", old), ("smol:1", {"source": "x"})):
        con.execute("INSERT INTO versions (version, name, number, stage, status, info_json, created_utc) "
                    "VALUES (?, ?, ?, 'sft', 'ready', ?, now())", [version, *version.split(":"), json.dumps(info)])
    assert migrate(con) == [n for n, _, _ in migrations() if n >= 6]
    con.close()

    v, base = registry.get_version("fern:1"), registry.get_version("smol:1")
    assert (v.fingerprint, v.adapter, v.quantization, v.teacher, v.preference_pairs) == (
        "f" * 64, True, {"mode": "nf4", "double_quant": True}, "smol:1", "/data/pairs")
    assert v.info == {"method": "qlora"}  # nothing decides by reading info
    assert (base.fingerprint, base.adapter, base.quantization, base.teacher) == (None, False, None, None)
    assert v.json()["info"] == old and base.json()["info"] == {"source": "x", "adapter": False}
    assert registry.find_fingerprint("fern", "f" * 64) == "fern:1"


def test_finished_versions_carry_their_typed_fields():
    v = registry.create_version("fern", "distill-model", teacher="smol:1")
    registry.finish_version(v, "/a", {"method": "lora"}, fingerprint="abc", adapter=True,
                            quantization={"mode": "nf4"}, preference_pairs="/p")
    got = registry.get_version(v)
    assert (got.teacher, got.fingerprint, got.adapter, got.quantization, got.preference_pairs) == (
        "smol:1", "abc", True, {"mode": "nf4"}, "/p")
    assert registry.find_fingerprint("fern", "abc") == v and registry.find_fingerprint("fern", "abd") is None


def test_many_writers_at_once_lose_nothing_and_number_consecutively(backend):
    """The registry under load: 4 writer processes (DuckDB) or 16 (PostgreSQL) register versions on two shared
    names (create, metrics, finish) while a reader runs the dashboard's queries: every registration lands, ready
    with its metrics, each name's numbers are 1..N, and no process sees an error. Speed is the benchmark's
    (bench/registry_concurrency.py) to report, not this test's."""
    import json

    writers, each = (4, 25) if backend == "duckdb" else (16, 50)
    url = os.environ.get("TUNERY_REGISTRY_URL")
    proc = subprocess.run([sys.executable, "bench/registry_concurrency.py", "--writers", str(writers),
                           "--registrations", str(each), *(["--url", url] if url else [])],
                          cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=600)
    assert proc.stdout, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["error_count"] == 0, result["errors"]
    assert result["registered"] == result["complete"] == writers * each
    assert result["numbers_consecutive"] and result["reads"] > 0
    assert proc.returncode == 0


def _fill_every_table() -> None:
    """A registry with a row in every table: lineage, metrics on two data, history, samples, answers, verdicts, a
    dataset, an export with checks, promotions (one rolled back), an alias and a sweep with a trial."""
    from registry import exports

    base = registry.create_version("smol", "base")
    registry.finish_version(base, "/models/smol")
    a = registry.create_version("fern", "sft", parents=[base], hyperparameters={"lr": 1e-3})
    registry.record_metrics(a, {"train_loss": 1.5})
    registry.record_metrics(a, {"perplexity": 9.5}, eval_data_hash="h1")
    registry.record_history(a, [{"step": 1, "epoch": 0.5, "loss": 2.0}, {"step": 2, "epoch": 1.0, "loss": 1.5}])
    registry.record_samples(a, [{"prompt": "p", "answer": "x"}], eval_data_hash="h1")
    registry.record_answers(a, "hf", [{"prompt": "p", "reference": "r", "answer": "x"}], eval_data_hash="h1")
    registry.finish_version(a, str(registry_path().parent / "artifacts" / "fern" / "1"), {"method": "lora"},
                            fingerprint="f1", adapter=True)
    b = registry.create_version("fern", "sft", parents=[a])
    registry.finish_version(b, None)
    registry.record_judgements(b, a, "smol:1", [{"prompt": "p", "first": "version", "second": "tie",
                                                 "outcome": "tie"}], eval_data_hash="h1")
    registry.record_dataset({"data_hash": "h1", "kind": "chat", "train_rows": 3, "validation_rows": 1}, "/d/h1")
    for version, tag in ((a, "v1-q8_0"), (b, "v2-q8_0")):
        exports.record_export(Export(
            export_id=f"fern/{tag}", version=version, quant="q8_0", path="/e", gguf_file="m.gguf", size_bytes=10,
            sha256="0" * 64, modelfile="FROM m", passed=True, info={},
            checks=(Check("loads", "m.gguf", True, None, ""), Check("mean_kl", "m.gguf", None, 0.07, "x"))))
        exports.record_promotion("fern", "production", "promote", version, f"fern/{tag}", {"ok": True})
    exports.record_promotion("fern", "production", "rollback", a, "fern/v1-q8_0", {})
    from registry import sweeps

    sweeps.create_sweep("s1", "fern", "/c.yaml", "grid", "perplexity", "minimize", {"lr": [1, 2]})
    sweeps.start_trial("s1", 0, {"lr": 1})
    sweeps.finish_trial("s1", 0, version=b, value=9.0, seconds=1.5)
    sweeps.finish_sweep("s1", 0)


def test_registry_copy_round_trips_between_backends_with_ids_and_numbers_kept(backend, postgres_server, tmp_path,
                                                                                monkeypatch):
    """`tunery registry copy --to URL` from this backend to the other one and back: every table's rows arrive as
    they were (ids, numbers, timestamps), versions read back equal, and the copies go on counting where the source
    stopped (version numbers, promotion ids). A target that holds anything is refused by name, through the CLI."""
    from core.home import home_relative
    from registry import exports
    from registry.transfer import copy_registry

    def versions() -> list[dict]:  # paths as stored: relative to whichever TUNERY_HOME reads them
        return [{**v.json(), "artifact_path": home_relative(v.artifact_path)} for v in registry.list_versions()]

    _fill_every_table()
    before = versions()
    history = exports.promotion_history()
    source_id = registry.instance_id()
    copy_home = tmp_path / "copy"
    other = postgres_server.new_database() if backend == "duckdb" else f"duckdb://{copy_home / 'registry.duckdb'}"
    report = copy_registry(other)
    assert report["versions"] == 3 and report["tables"]["export_checks"] == 4 and report["tables"]["promotions"] == 3
    assert all(n > 0 for n in report["tables"].values()), report["tables"]

    # read the copy through the ordinary functions
    if other.startswith("postgresql"):
        monkeypatch.setenv("TUNERY_REGISTRY_URL", other)
    else:
        monkeypatch.delenv("TUNERY_REGISTRY_URL")
        monkeypatch.setenv("TUNERY_HOME", str(copy_home))
    assert versions() == before
    assert exports.promotion_history() == history and registry.instance_id() == source_id
    assert exports.get_export("fern/v2-q8_0").checks[1].value == 0.07
    assert registry.create_version("fern", "sft") == "fern:3"
    row = exports.record_promotion("fern", "production", "promote", "fern:2", "fern/v2-q8_0", {})
    assert row["id"] == history[-1].id + 1 and row["previous_version"] == "fern:1"

    # and back into a fresh registry of the first kind
    back = f"duckdb://{tmp_path / 'back.duckdb'}" if backend == "duckdb" else postgres_server.new_database()
    assert copy_registry(back)["versions"] == 4

    # into a registry that holds something: refused, nothing written
    proc = subprocess.run([str(Path(sys.executable).parent / "tunery"), "registry", "copy", "--to", back],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "is not empty (model_names (2 rows)" in proc.stderr and "nothing recorded there is replaced" in proc.stderr


def test_a_bad_or_unreachable_registry_url_is_one_line_without_the_password(backend, tmp_path):
    """TUNERY_REGISTRY_URL that is not PostgreSQL's, or names a server that is not there: every command says so in
    one line, exit status 1, no traceback, and the password never appears."""
    duckdb_only(backend)  # (the URL under test replaces the backend)
    tunery = str(Path(sys.executable).parent / "tunery")
    for url, message in (("mysql://u:secret@db/x", "TUNERY_REGISTRY_URL must be a postgresql:// URL"),
                         ("postgresql://u:secret@127.0.0.1:1/x", "cannot reach the registry at "
                                                                 "postgresql://u:***@127.0.0.1:1/x")):
        proc = subprocess.run([tunery, "models"], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "TUNERY_REGISTRY_URL": url, "TUNERY_HOME": str(tmp_path)})
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert "secret" not in proc.stderr + proc.stdout


def test_paths_inside_tunery_home_are_stored_relative_and_others_as_given(tunery_home):
    """An artifact inside TUNERY_HOME is stored as `$TUNERY_HOME/...` and read back under whichever home reads it; a
    hub id or a folder elsewhere comes back exactly as given."""
    inside = registry.create_version("fern", "sft")
    registry.finish_version(inside, str(tunery_home / "artifacts" / "fern" / "1"))
    for given in ("HuggingFaceTB/SmolLM2-135M", "/models/elsewhere"):
        v = registry.create_version("hub", "base")
        registry.finish_version(v, given)
        assert registry.get_version(v).artifact_path == given
    with connect(read_only=True) as con:
        assert con.execute("SELECT artifact_path FROM versions WHERE version = ?", [inside]).fetchone()[0] == \
            "$TUNERY_HOME/artifacts/fern/1"
    assert registry.get_version(inside).artifact_path == str(tunery_home / "artifacts" / "fern" / "1")


def test_a_connection_the_postgresql_server_dropped_is_replaced(backend):
    """The server ended this process's session (a restart, an idle timeout): the next operation reconnects."""
    if backend != "postgresql":
        pytest.skip("about PostgreSQL sessions")
    import psycopg

    registry.create_version("fern", "sft")
    pid = registry.db._handle().con.info.backend_pid
    with psycopg.connect(os.environ["TUNERY_REGISTRY_URL"], autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [pid])
    assert [v.version for v in registry.list_versions()] == ["fern:1"]
    assert registry.db._handle().con.info.backend_pid != pid


def test_a_new_version_column_is_its_record_field_plus_a_migration(tmp_path, tunery_home):
    """The architecture promise for the registry: a copy of registry/ with one field added to the Version record
    and one numbered migration, and nothing else changed, stores, reads and prints the new column."""
    import subprocess
    import sys

    from conftest import REPO

    code = tmp_path / "code"
    shutil.copytree(REPO / "registry", code / "registry", ignore=shutil.ignore_patterns("__pycache__"))
    records = code / "registry" / "records.py"
    text = records.read_text()
    anchor = "    host: str | None = field(default=None, metadata=column())"
    assert anchor in text
    records.write_text(text.replace(anchor, anchor + "\n    licence: str | None = field(default=None, "
                                                     "metadata=column())  # the weights' licence"))
    migrations = sorted((code / "registry" / "migrations").glob("[0-9]*.sql"))
    number = int(migrations[-1].name[:3]) + 1
    (code / "registry" / "migrations" / f"{number:03d}_licence.sql").write_text(
        "-- why: a version records the licence of its weights\nALTER TABLE versions ADD COLUMN licence VARCHAR;\n")
    script = ("import json, registry; v = registry.create_version('fern', 'base'); "
              "registry.finish_version(v, '/m', licence='apache-2.0'); "
              "print(json.dumps(registry.get_version(v).json()))")
    env = {**os.environ, "PYTHONPATH": str(code), "TUNERY_HOME": str(tunery_home)}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["licence"] == "apache-2.0"
    shown = subprocess.run([sys.executable, "-m", "flows.cli", "show", "fern:1", "--json"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert json.loads(shown.stdout)["licence"] == "apache-2.0"
    shown = subprocess.run([sys.executable, "-m", "flows.cli", "show", "fern:1"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert "licence" in shown.stdout and "apache-2.0" in shown.stdout
