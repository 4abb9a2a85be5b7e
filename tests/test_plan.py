"""Plan, then run (issue 16): a stage is planned once, with no side effects, and its fingerprint changes with each
thing that changes its result (and with nothing else); the flow re-runs a stage and its evaluation when one does,
and finds its cached results again from another Prefect server."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import chat, write_jsonl

import registry
from flows import plan as planning
from flows.config import BASE_REF, load_config
from flows.inputs import run_base, run_prep


def _config(tmp_path: Path, tiny_model_dir, garden_rows, stages: list[dict], **top) -> Path:
    write_jsonl(tmp_path / "garden.jsonl", garden_rows)
    write_jsonl(tmp_path / "own.jsonl", garden_rows[:6] + [chat("Mulch?", "Yes, in May.")])
    doc = {"name": "tiny-fern", "base_model": str(tiny_model_dir), "base_name": "tiny-base", "device": "cpu",
           "seed": 1, "data": {"train": "garden.jsonl", "val_fraction": 0.2}, "stages": stages, **top}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(doc))
    return tmp_path / "pipeline.yaml"


SFT = {"stage": "sft", "max_steps": 2, "batch_size": 4, "max_length": 128}


def _plan(config: Path, index: int = 0, done_extra: dict | None = None):
    cfg, config_dir = load_config(config)
    base = run_base(cfg, config_dir)
    data = run_prep(cfg, config_dir, base.artifact_path)
    done = {BASE_REF: base, **(done_extra or {})}
    return planning.plan_stage(cfg, index, done, base, data, config_dir)


def _snapshot(home: Path) -> tuple:
    with registry.db.connect(read_only=True) as con:
        rows = tuple(con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                     for t in ("versions", "metrics", "datasets", "version_parents"))
    registry.db.release()  # checkpointed and closed, so the file holds every row written so far
    files = sorted((str(p.relative_to(home)), p.stat().st_size, p.stat().st_mtime_ns) for p in home.rglob("*")
                   if p.is_file() and not p.name.startswith("registry.duckdb."))  # its WAL and turn-taking locks
    return files, rows


def test_planning_twice_gives_one_fingerprint_and_writes_nothing(tmp_path, tiny_model_dir, garden_rows,
                                                                tunery_home):
    """A stage with its own data (read and hashed, not prepared) and a teacher given as a local folder (named, not
    registered): planning leaves TUNERY_HOME's files and the registry's rows as they were."""
    shutil.copytree(tiny_model_dir, tmp_path / "teacher")
    stages = [{**SFT, "data": {"train": "own.jsonl", "val_fraction": 0.3}},
              {"stage": "distill-model", "teacher": "./teacher", "max_steps": 2, "batch_size": 4,
               "max_length": 128}]
    config = _config(tmp_path, tiny_model_dir, garden_rows, stages)
    cfg, config_dir = load_config(config)
    base = run_base(cfg, config_dir)
    data = run_prep(cfg, config_dir, base.artifact_path)
    before = _snapshot(tunery_home)
    plans = [planning.plan_stage(cfg, i, {BASE_REF: base}, base, data, config_dir) for i in (0, 1, 0, 1)]
    assert _snapshot(tunery_home) == before
    assert plans[0] == plans[2] and plans[1] == plans[3] and plans[0].fingerprint != plans[1].fingerprint
    own, distill = plans[0], plans[1]
    assert own.data_from == "stage" and not Path(own.data).exists() and own.data_hash != data.info["data_hash"]
    assert distill.refs["teacher"] == (f"folder:{(tmp_path / 'teacher').resolve()}",) and distill.data_from == "config"
    assert own.to_json()["fingerprint"] == own.fingerprint and own.device == "cpu"


@pytest.mark.parametrize("component, change", [
    ("settings", lambda doc, tmp: doc["stages"][0].update(learning_rate=1e-3)),
    ("seed", lambda doc, tmp: doc.update(seed=2)),
    ("data", lambda doc, tmp: write_jsonl(tmp / "garden.jsonl", [*map(dict, doc["_rows"]),
                                                                  chat("What is compost?", "Rotted plants.")])),
    ("start", lambda doc, tmp: doc["stages"][0].update({"from": "tiny-base:2"})),
    ("name", lambda doc, tmp: doc.update(name="tiny-other")),
])
def test_each_component_alone_changes_the_fingerprint(component, change, tmp_path, tiny_model_dir, garden_rows):
    config = _config(tmp_path, tiny_model_dir, garden_rows, [dict(SFT)])
    first = _plan(config)
    assert _plan(config).fingerprint == first.fingerprint
    other = registry.create_version("tiny-base", "base")  # tiny-base:2, another start
    registry.finish_version(other, str(tiny_model_dir))
    doc = yaml.safe_load(config.read_text())
    doc["_rows"] = garden_rows
    change(doc, tmp_path)
    doc.pop("_rows")
    config.write_text(yaml.safe_dump(doc))
    second = _plan(config)
    assert second.fingerprint != first.fingerprint, component
    unchanged = {k for k, v in first.to_json().items() if v == second.to_json()[k]}
    assert {"kind", "stage_id", "device"} <= unchanged


def test_the_resolved_device_not_the_configured_word_is_in_the_fingerprint(tmp_path, tiny_model_dir, garden_rows,
                                                                          monkeypatch):
    config = _config(tmp_path, tiny_model_dir, garden_rows, [dict(SFT)])
    on_cpu = _plan(config)
    doc = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**doc, "device": "auto"}))
    assert _plan(config).fingerprint == on_cpu.fingerprint  # auto resolves to cpu here: the same result
    monkeypatch.setattr(planning, "resolve_device", lambda device: "cuda")
    on_cuda = _plan(config)
    assert on_cuda.device == "cuda" and on_cuda.fingerprint != on_cpu.fingerprint


def test_merge_sources_and_teacher_are_in_the_fingerprint(tmp_path, tiny_model_dir, garden_rows):
    _plan(_config(tmp_path, tiny_model_dir, garden_rows, [dict(SFT)]))  # registers the base, tiny-base:1
    extra = [registry.create_version("tiny-base", "base") for _ in range(2)]
    for v in extra:
        registry.finish_version(v, str(tiny_model_dir))
    merge = {"stage": "merge", "method": "linear", "sources": ["tiny-base:2", "tiny-base:3"]}
    config = _config(tmp_path, tiny_model_dir, garden_rows, [merge])
    first = _plan(config)
    assert first.refs["sources"] == ("tiny-base:2", "tiny-base:3")
    config = _config(tmp_path, tiny_model_dir, garden_rows, [{**merge, "sources": ["tiny-base:2", "tiny-base:1"]}])
    assert _plan(config).fingerprint != first.fingerprint
    teach = {"stage": "distill-model", "max_steps": 2}
    by_two = _plan(_config(tmp_path, tiny_model_dir, garden_rows, [{**teach, "teacher": "tiny-base:2"}]))
    by_three = _plan(_config(tmp_path, tiny_model_dir, garden_rows, [{**teach, "teacher": "tiny-base:3"}]))
    assert by_two.refs["teacher"] == ("tiny-base:2",) and by_two.fingerprint != by_three.fingerprint


def test_code_and_library_versions_are_in_the_digest(tmp_path, monkeypatch):
    """The source of tasks/ and metrics/ and each library version change the code digest the fingerprint holds."""
    import importlib.metadata

    for folder, name in (("tasks", "train.py"), ("metrics/perplexity", "perplexity.py")):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / name).write_text("x = 1\n")
    digest = planning.source_digest(tmp_path)
    assert planning.source_digest(tmp_path) == digest
    for folder, name in (("tasks", "train.py"), ("metrics/perplexity", "perplexity.py")):
        (tmp_path / folder / name).write_text("x = 2\n")
        assert planning.source_digest(tmp_path) != digest, folder
        digest = planning.source_digest(tmp_path)
    real = importlib.metadata.version
    for library in planning.RESULT_LIBRARIES:
        monkeypatch.setattr(importlib.metadata, "version",
                            lambda n, lib=library: "0.0.0-other" if n == lib else real(n))
        assert planning.source_digest(tmp_path) != digest, library
    monkeypatch.setattr(importlib.metadata, "version", real)
    assert planning.source_digest(tmp_path) == digest
    assert {"torch", "transformers", "peft", "trl", "mergekit", "llama_cpp_python"} <= set(planning.RESULT_LIBRARIES)


def test_measuring_code_is_left_out_of_the_training_digest(tmp_path):
    """What a stage trains and what it measures have separate keys: a change to measuring code (metrics/, the
    evaluation, the answer scores, a kind's own measurements) changes the digest of all code, which keys the
    evaluation, and leaves the training digest, which keys the stage, as it was."""
    files = ["tasks/train/training.py", "tasks/evaluate/evaluation.py", "tasks/evaluate/scores.py",
             "tasks/stages/distill/measure.py", "tasks/stages/distill/teacher.py", "metrics/perplexity/perplexity.py"]
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    for name in files:
        training = planning.source_digest(tmp_path, exclude=planning.MEASURING)
        everything = planning.source_digest(tmp_path)
        (tmp_path / name).write_text("x = 2\n")
        assert planning.source_digest(tmp_path) != everything, name
        measuring_only = name.startswith(planning.MEASURING)
        assert (planning.source_digest(tmp_path, exclude=planning.MEASURING) == training) == measuring_only, name


def test_changed_code_reruns_the_stage_and_its_evaluation_and_another_server_finds_the_cache(
        tmp_path, tiny_model_dir, garden_rows, tunery_home, monkeypatch):
    from prefect.testing.utilities import prefect_test_harness
    from test_flow import _task_states

    from flows import pipeline as flow_module

    config = str(_config(tmp_path, tiny_model_dir, garden_rows, [dict(SFT)],
                         eval={"prompts": ["How deep?"], "max_new_tokens": 4, "repeats": 1, "warmup": 0}))
    # Two servers, one after the other: this test starts them itself (conftest's prefect_server is one per module).
    with prefect_test_harness(server_startup_timeout=120):
        assert flow_module.pipeline(config)["tuned"] == "tiny-fern:1"
    # Another Prefect server (a new database): the results kept under TUNERY_HOME still serve the unchanged run.
    with prefect_test_harness(server_startup_timeout=120):
        state = flow_module.pipeline(config, return_state=True)
        states = _task_states(str(state.state_details.flow_run_id))
        assert states["sft tiny-fern from tiny-base:1"] == "Cached", states
        assert states["eval tiny-fern:1"] == "Cached" and states["eval tiny-base:1"] == "Cached", states
        def rerun(tuned: str) -> dict[str, str]:
            state = flow_module.pipeline(config, return_state=True)
            assert state.result()["tuned"] == tuned
            return _task_states(str(state.state_details.flow_run_id))

        # Changed measuring code only (a line under metrics/): the version is measured again, not trained again.
        monkeypatch.setattr(flow_module, "code_version", lambda: "changed-measuring-code")
        states = rerun("tiny-fern:1")
        assert states["sft tiny-fern from tiny-base:1"] == "Cached", states
        assert states["eval tiny-fern:1"] == "Completed" and states["eval tiny-base:1"] == "Completed", states
        # Changed code (as a new tasks/ or metrics/ source or library version makes it): the stage trains again
        # and both evaluations run again.
        monkeypatch.setattr(planning, "code_version", lambda: "changed-code")
        monkeypatch.setattr(planning, "training_code_version", lambda: "changed-code")
        monkeypatch.setattr(flow_module, "code_version", lambda: "changed-code")
        states = rerun("tiny-fern:2")
        assert states["sft tiny-fern from tiny-base:1"] == "Completed", states
        assert states["eval tiny-fern:2"] == "Completed" and states["eval tiny-base:1"] == "Completed", states
    assert os.path.isdir(tunery_home / "prefect" / "results")


SNAPSHOT_KIND = '''"""A `snapshot` stage: the start model copied as a new version, with the number of rows it was given."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from tasks.common import StageResult
from tasks.data.prep import load_prepared
from tasks.stages.stage import StageFields, StageInputs


class SnapshotStage(StageFields):
    """A `snapshot` stage of a pipeline config."""

    kind: ClassVar[str] = "snapshot"
    data_kind: ClassVar[str | None] = "chat"
    summary: ClassVar[str] = "Copy the start model as a new version."
    stage: Literal["snapshot"] = "snapshot"
    note: str = Field("", description="Recorded with the version.")

    def run(self, inputs: StageInputs, out_dir: Path) -> StageResult:
        for f in Path(inputs.start).iterdir():
            shutil.copy2(f, out_dir / f.name)
        _, train, _ = load_prepared(inputs.data)
        return StageResult(stage="snapshot", artifact_path=str(out_dir), metrics={"rows_seen": float(len(train))},
                           info={"note": self.note})
'''

def test_a_new_stage_kind_is_one_module_and_one_catalogue_entry(tmp_path, tiny_model_dir, garden_rows, tunery_home):
    """What docs/layout.md promises (adding a stage kind): a copy of tasks/ with tasks/stages/snapshot.py and its
    entry in tasks/stages/catalogue.py, and nothing else changed, gives a config key, a CLI command that runs it, the
    data-kind check and a registered version."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    shutil.copytree(REPO / "tasks", tmp_path / "code" / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "data" / "general", tmp_path / "code" / "data" / "general")  # the suite beside tasks/
    (tmp_path / "code" / "tasks" / "stages" / "snapshot.py").write_text(SNAPSHOT_KIND)
    catalogue = tmp_path / "code" / "tasks" / "stages" / "catalogue.py"
    text = catalogue.read_text()
    text = text.replace("from tasks.stages.sft import SftStage\n", "from tasks.stages.sft import SftStage\n"
                                                                  "from tasks.stages.snapshot import SnapshotStage\n")
    text = text.replace("DistillModelStage)}", "DistillModelStage, SnapshotStage)}")
    catalogue.write_text(text)
    config = _config(tmp_path, tiny_model_dir, garden_rows, [{"stage": "snapshot", "note": "kept"}])
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "code"), "TUNERY_HOME": str(tunery_home)}

    def tunery(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)

    assert "Copy the start model as a new version." in tunery("snapshot", "--help").stdout
    ran = tunery("snapshot", str(config), "--json")
    assert ran.returncode == 0, ran.stderr[-3000:]
    version = json.loads(ran.stdout)
    assert version["stage"] == "snapshot" and version["parents"] == ["tiny-base:1"]
    assert version["hyperparameters"]["snapshot"] == {"note": "kept"} and version["info"]["note"] == "kept"
    assert version["metrics"]["rows_seen"] > 0 and (Path(version["artifact_path"]) / "model.safetensors").exists()
    # The data-kind check comes from the class too: preference data is refused, and nothing is registered.
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Q{i}?", "chosen": "Yes.", "rejected": "No."}
                                           for i in range(12)])
    doc = yaml.safe_load(config.read_text())
    doc["data"] = {"train": "pairs.jsonl", "val_fraction": 0.2}
    config.write_text(yaml.safe_dump(doc))
    refused = tunery("snapshot", str(config))
    assert refused.returncode == 1 and "needs chat data, but its data holds preference examples" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert [v.version for v in registry.list_versions(name="tiny-fern")] == ["tiny-fern:1"]


GRAFT_KIND = '''"""A `graft` stage: the start model averaged with a donor version (its own input, like a teacher)."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field
from safetensors.torch import load_file, save_file

from tasks.common import StageResult
from tasks.stages.stage import StageFields, StageInputs, StagePlan


class GraftStage(StageFields):
    """A `graft` stage of a pipeline config."""

    kind: ClassVar[str] = "graft"
    summary: ClassVar[str] = "Average the start model with a donor version."
    stage: Literal["graft"] = "graft"
    donor: str = Field(description="An earlier stage's id or NAME:N whose weights are averaged in.")
    weight: float = Field(0.5, ge=0, le=1, description="The donor's share.")

    def references(self) -> list[str]:
        return super().references() + [self.donor]

    def plan(self, planner) -> StagePlan:
        return StagePlan(refs={"donor": (planner.resolve(self.donor).version,)}, data_from="none")

    def prepare(self, plan, data, ctx, teacher=None):
        job = super().prepare(plan, data, ctx)
        donor = ctx.version(plan.refs["donor"][0])
        inputs = dataclasses.replace(job.inputs, sources={donor.version: ctx.folder(donor)})
        return dataclasses.replace(job, parents=job.parents + [donor], inputs=inputs)

    def run(self, inputs: StageInputs, out_dir: Path) -> StageResult:
        (donor,) = inputs.sources.values()
        for f in Path(inputs.start).iterdir():
            if f.is_file() and f.name != "model.safetensors":
                shutil.copy2(f, out_dir / f.name)
        mine, theirs = load_file(Path(inputs.start) / "model.safetensors"), load_file(Path(donor) / "model.safetensors")
        save_file({k: (1 - self.weight) * v + self.weight * theirs[k] for k, v in mine.items()},
                  out_dir / "model.safetensors")
        return StageResult(stage="graft", artifact_path=str(out_dir))
'''


def test_a_new_stage_kind_with_its_own_input_is_one_module_and_one_catalogue_entry(tmp_path, tiny_model_dir,
                                                                                   garden_rows, tunery_home):
    """Like the snapshot kind, for a kind that reads a version beyond its start (a donor, as a teacher or merge
    sources are read): its plan hook names it, so it is resolved, checked, fingerprinted and made a parent without
    a line of the flow changed."""
    import json
    import subprocess
    import sys

    import torch
    from conftest import REPO
    from safetensors.torch import load_file, save_file

    shutil.copytree(REPO / "tasks", tmp_path / "code" / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "data" / "general", tmp_path / "code" / "data" / "general")
    (tmp_path / "code" / "tasks" / "stages" / "graft.py").write_text(GRAFT_KIND)
    catalogue = tmp_path / "code" / "tasks" / "stages" / "catalogue.py"
    text = catalogue.read_text().replace(
        "from tasks.stages.sft import SftStage\n",
        "from tasks.stages.sft import SftStage\nfrom tasks.stages.graft import GraftStage\n")
    catalogue.write_text(text.replace("DistillModelStage)}", "DistillModelStage, GraftStage)}"))
    # The donor: a registered copy of the tiny model with every weight doubled.
    donor_dir = tmp_path / "donor"
    shutil.copytree(tiny_model_dir, donor_dir)
    weights = load_file(donor_dir / "model.safetensors")
    save_file({k: 2 * v for k, v in weights.items()}, donor_dir / "model.safetensors")
    _plan(_config(tmp_path, tiny_model_dir, garden_rows, [dict(SFT)]))  # registers the base, tiny-base:1
    donor = registry.create_version("tiny-base", "base")
    registry.finish_version(donor, str(donor_dir))
    registry.db.release()
    config = _config(tmp_path, tiny_model_dir, garden_rows, [{"stage": "graft", "donor": donor, "weight": 0.25}])
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "code"), "TUNERY_HOME": str(tunery_home)}

    def tunery(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)

    ran = tunery("graft", str(config), "--json")
    assert ran.returncode == 0, ran.stderr[-3000:]
    version = json.loads(ran.stdout)
    assert version["parents"] == ["tiny-base:1", donor]
    assert version["hyperparameters"]["graft"] == {"donor": donor, "weight": 0.25}
    grafted = load_file(Path(version["artifact_path"]) / "model.safetensors")
    assert all(torch.allclose(grafted[k], 1.25 * w) for k, w in weights.items())
    # An unknown donor is named before anything is registered.
    config = _config(tmp_path, tiny_model_dir, garden_rows, [{"stage": "graft", "donor": "tiny-base:9"}])
    refused = tunery("graft", str(config))
    assert refused.returncode == 1 and "tiny-base:9" in refused.stderr and "Traceback" not in refused.stderr
    assert [v.version for v in registry.list_versions(name="tiny-fern")] == [version["version"]]
