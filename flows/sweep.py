"""`tunery sweep`: a hyperparameter sweep, each trial a run of the config with some settings changed.

Two ways to say what to try:
- `--set stages[0].learning_rate=1e-4,3e-4,1e-3 --set stages[0].lora.r=8,16`: every combination (a grid);
- the config's `sweep:` section (flows.config.SweepConfig): ranges and choices, and a trial budget that Optuna's
  sampler (TPE by default) spends, asking for `parallel` trials at a time and learning from each result.

Each trial is a Prefect task run tagged with the accelerator tag, so trials queue on the accelerator concurrency
limit (one per GPU: `prefect concurrency-limit create accelerator N`). With `--pool POOL` each trial is a flow run
of the `tunery-trial` deployment on that work pool, so trials spread over its workers. A trial runs the config's
stages with reuse (a trial that repeats another's settings finds its versions), evaluates the last version on the
held-out split, and records its row in the registry (`sweep_trials`): the values, the version, the metric, or the
error of a failed trial, which never stops the sweep. The version carries the sweep id and values in `info.sweeps`.
The best trial by the metric is reported; the dashboard's Sweeps page plots the metric against each swept value and
the quality-vs-speed frontier of the trials.
"""
from __future__ import annotations

import copy
import itertools
import math
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

import registry
from core import metrics as metric_catalogue
from core.errors import TuneryError
from flows.config import BASE_REF, SweepConfig, SweepRange, read_raw, validate_config
from flows.evaluate import run_eval
from flows.inputs import run_base, run_prep
from flows.pipeline import ACCELERATOR_TAG, ensure_accelerator_limit
from flows.plan import plan_stage
from flows.run import run_planned
from registry import sweeps as sweep_store
from registry.records import Trial

REPO = Path(__file__).resolve().parent.parent
TRIAL_FLOW = "tunery-trial"
KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\[\d+\])*(\.[A-Za-z_][A-Za-z0-9_]*(\[\d+\])*)*$")


def parse_key(key: str) -> list[str | int]:
    """`stages[0].lora.r` -> ['stages', 0, 'lora', 'r']."""
    if not KEY_RE.match(key):
        raise TuneryError(f"{key!r}: not a settings key (write it as in the config, e.g. stages[0].learning_rate)")
    parts: list[str | int] = []
    for name in key.split("."):
        base, *indexes = name.split("[")
        parts.append(base)
        parts += [int(i.rstrip("]")) for i in indexes]
    return parts


def parse_value(text: str) -> Any:
    """A value as a user types it: 3e-4 and 8 are numbers (YAML would read 3e-4 as text), true/false booleans."""
    import yaml

    text = text.strip()
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def parse_sets(sets: list[str]) -> dict[str, list[Any]]:
    """`KEY=V1,V2,...` options -> {key: [values]}."""
    space: dict[str, list[Any]] = {}
    for item in sets:
        key, sep, values = item.partition("=")
        if not sep or not values.strip():
            raise TuneryError(f"--set {item!r}: expected KEY=V1,V2,... (e.g. stages[0].learning_rate=1e-4,3e-4)")
        parse_key(key.strip())
        space[key.strip()] = [parse_value(v) for v in values.split(",")]
    return space


def with_values(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of the config's settings with `values` ({dotted key: value}) set; a missing mapping on the way is
    made, a missing list item is an error."""
    out = copy.deepcopy(raw)
    for key, value in values.items():
        parts = parse_key(key)
        node: Any = out
        for i, part in enumerate(parts):
            if isinstance(part, int) and not (isinstance(node, list) and part < len(node)):
                raise TuneryError(f"{key}: the config has no {'.'.join(map(str, parts[:i]))}[{part}]")
            if isinstance(part, str) and not isinstance(node, dict):
                raise TuneryError(f"{key}: {part!r} is not inside a mapping")
            if i == len(parts) - 1:
                node[part] = value
            elif isinstance(part, int):
                node = node[part]
            else:
                node = node.setdefault(part, [] if isinstance(parts[i + 1], int) else {})
    return out


def direction_of(metric: str, given: str | None) -> str:
    """Optuna's direction for a sweep metric: as given, else the metric's in the catalogue."""
    if given:
        return given
    way = metric_catalogue.better(metric)
    if way is None:
        raise TuneryError(f"sweep.metric {metric!r}: its better direction is unknown (not in core/metrics.yaml); "
                          "set sweep.direction")
    return "minimize" if way == "lower" else "maximize"


class Plan:
    """What a sweep will try, checked before any trial runs: every trial's config validates."""

    def __init__(self, config_path: str, sets: list[str] | None):
        self.path = Path(config_path).resolve()
        self.raw = read_raw(self.path)
        self.cfg, _ = validate_config(self.raw, self.path)
        section: SweepConfig | None = self.cfg.sweep
        self.grid: list[dict[str, Any]] | None = None
        if sets:
            space = parse_sets(sets)
            keys = list(space)
            self.grid = [dict(zip(keys, combo)) for combo in itertools.product(*space.values())]
            self.space: dict[str, Any] = space
            self.method = "grid"
            self.metric = (section.metric if section else None) or self.cfg.metric
            self.direction = direction_of(self.metric, section.direction if section else None)
            self.trials, self.parallel, self.seed = len(self.grid), len(self.grid), 0
        elif section is not None:
            self.space = {k: (v.model_dump() if isinstance(v, SweepRange) else v)
                          for k, v in section.parameters.items()}
            self.method, self.metric = section.sampler, section.metric or self.cfg.metric
            self.direction = direction_of(self.metric, section.direction)
            self.trials, self.parallel, self.seed = section.trials, section.parallel, section.seed
        else:
            raise TuneryError(f"{self.path}: nothing to sweep; give --set KEY=V1,V2 or a `sweep:` section")
        if self.grid is None:
            try:
                self.distributions()
            except ValueError as e:
                raise TuneryError(f"{self.path}: sweep.parameters: {e}") from None
        for values in self.grid or self._corners():
            self.trial_config(values)  # a bad key or value is named now, before anything trains

    def _example(self) -> dict[str, Any]:
        return {k: (v["low"] if isinstance(v, dict) else v[0]) for k, v in self.space.items()}

    def _corners(self) -> list[dict[str, Any]]:
        """Settings that try every choice and both ends of every range, one key at a time."""
        out = []
        for key, spec in self.space.items():
            for value in ([spec["low"], spec["high"]] if isinstance(spec, dict) else spec):
                out.append({**self._example(), key: value})
        return out

    def trial_config(self, values: dict[str, Any]):
        return trial_config(self.path, self.raw, values)

    def distributions(self) -> dict[str, Any]:
        """Optuna's distributions of the swept keys; a choice that is not a plain value (a list of modules) is
        searched by its index (see values)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        out = {}
        for key, spec in self.space.items():
            if isinstance(spec, list):
                out[key] = CategoricalDistribution(spec if _plain(spec) else list(range(len(spec))))
            elif all(isinstance(spec[k], int) for k in ("low", "high")) and isinstance(spec.get("step") or 1, int):
                out[key] = IntDistribution(spec["low"], spec["high"], log=spec["log"], step=spec.get("step") or 1)
            else:
                out[key] = FloatDistribution(spec["low"], spec["high"], log=spec["log"], step=spec.get("step"))
        return out

    def values(self, params: dict[str, Any]) -> dict[str, Any]:
        """The settings an Optuna trial's params stand for."""
        return {key: value if not isinstance(self.space[key], list) or _plain(self.space[key])
                else self.space[key][value] for key, value in params.items()}


def _plain(choices: list[Any]) -> bool:
    """Choices Optuna takes as they are (None, bool, int, float, str)."""
    return all(v is None or isinstance(v, (bool, int, float, str)) for v in choices)


def trial_config(path: Path, raw: dict[str, Any], values: dict[str, Any]):
    """The validated config of a trial: the file's settings with `values` set (and no `sweep:` section)."""
    changed = with_values(raw, values)
    changed.pop("sweep", None)
    try:
        return validate_config(changed, Path(path))
    except TuneryError as e:
        raise TuneryError(f"trial {values}: {e}") from None


def run_trial(config_path: str, sweep_id: str, trial: int, values: dict[str, Any]) -> Trial:
    """One trial: the config's stages with `values` set (reusing unchanged versions), then the held-out evaluation
    of the last version. Recorded in the registry whatever happens; returns the trial's row."""

    began = time.perf_counter()
    run_id = str(flow_run.get_id() or "")
    version = value = error = None

    def failed(why: str) -> Trial:  # a trial the registry could not record
        return Trial(trial=trial, values=values, status="failed", version=version, value=value,
                     seconds=time.perf_counter() - began, error=why, host=None, flow_run_id=run_id or None)

    try:
        sweep_store.start_trial(sweep_id, trial, values, run_id or None)
    except Exception as e:  # the registry could not record it (busy, unreachable): a failed trial, not a failed sweep
        return failed(f"could not record the trial: {e}")
    try:
        cfg, config_dir = trial_config(Path(config_path), read_raw(config_path), values)
        sweep = sweep_store.get_sweep(sweep_id)
        base = run_base(cfg, config_dir)
        data = run_prep(cfg, config_dir, base.artifact_path)
        done, previous = {BASE_REF: base}, base
        for index in range(len(cfg.stages)):
            planned = plan_stage(cfg, index, done, previous, data, config_dir)
            previous = run_planned(cfg, planned, data, config_dir, flow_run_id=run_id, reuse=True)
            done[cfg.stage_id(index)] = previous
        version = previous.version
        measured = registry.get_version(version, data.data_hash).metrics
        if not (previous.reused and sweep.metric in measured):  # a reused version keeps its evaluation
            measured = {**measured, **run_eval(previous, data, cfg.eval_config())}
        value = measured.get(sweep.metric)  # an evaluation metric, or one its stage measured
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise TuneryError(f"the evaluation measured no {sweep.metric!r}")
    except Exception as e:  # a failed trial is recorded, never fatal to the sweep
        error = f"{type(e).__name__}: {e}" if not isinstance(e, TuneryError) else str(e)
    try:
        sweep_store.finish_trial(sweep_id, trial, version=version, value=value,
                                 seconds=time.perf_counter() - began, error=error)
        return sweep_store.get_trial(sweep_id, trial)
    except Exception as e:
        return failed(f"could not record the result: {e}; {error or ''}".rstrip("; "))


@task(task_run_name="trial {trial} of sweep {sweep_id}", tags=[ACCELERATOR_TAG])
def trial_task(config_path: str, sweep_id: str, trial: int, values: dict[str, Any]) -> Trial:
    return run_trial(config_path, sweep_id, trial, values)


@flow(name=TRIAL_FLOW, flow_run_name="trial {trial} of sweep {sweep_id}")
def trial_flow(config_path: str, sweep_id: str, trial: int, values: dict[str, Any]) -> Trial:
    """One trial of a sweep as a flow run, for a worker of the sweep's work pool to pick up."""
    ensure_accelerator_limit()
    row = trial_task(config_path, sweep_id, trial, values)
    if row.status == "failed":
        get_run_logger().warning(f"trial {trial} failed: {row.error}")
    return row


def deploy_trials(pool: str) -> str:
    """The `tunery-trial` deployment on `pool` (made or updated), running this checkout's code (its workers need
    the repository at the same path, like the deployments of deployments/prefect.yaml); returns its name."""
    name = f"{TRIAL_FLOW}/{pool}"
    source = trial_flow.from_source(source=str(REPO), entrypoint="flows/sweep.py:trial_flow")
    source.deploy(name=pool, work_pool_name=pool, print_next_steps=False)
    return name


def _run_batch(config_path: str, sweep_id: str, batch: list[tuple[int, dict[str, Any]]],
               deployment: str | None) -> list[dict[str, Any]]:
    if deployment is None:  # in this process; the accelerator limit queues the trial tasks
        futures = [trial_task.submit(config_path, sweep_id, n, values) for n, values in batch]
        return [f.result() for f in futures]
    from prefect.deployments import run_deployment

    def one(item: tuple[int, dict[str, Any]]) -> Trial:
        n, values = item
        run = run_deployment(deployment, parameters={"config_path": config_path, "sweep_id": sweep_id, "trial": n,
                                                     "values": values}, timeout=None)
        row = sweep_store.get_trial(sweep_id, n)
        if row is None or row.status == "running":  # the flow run ended before the trial settled
            if row is None:
                sweep_store.start_trial(sweep_id, n, values, str(run.id))
            sweep_store.finish_trial(sweep_id, n, version=None, value=None, seconds=0.0,
                                     error=f"its flow run {run.id} ended {run.state.name if run.state else 'unknown'}")
            row = sweep_store.get_trial(sweep_id, n)
        return row

    with ThreadPoolExecutor(max_workers=len(batch)) as pool:
        return list(pool.map(one, batch))


def best_trial(trials: list[Trial], direction: str) -> Trial | None:
    done = [t for t in trials if t.status == "ready" and t.value is not None]
    if not done:
        return None
    return (min if direction == "minimize" else max)(done, key=lambda t: t.value)


@flow(name="tunery-sweep", flow_run_name="sweep {config_path}")
def sweep_flow(config_path: str, sets: list[str] | None = None, pool: str | None = None,
               parallel: int | None = None) -> dict[str, Any]:
    """Run a sweep (see the module's docstring); returns the sweep with its trials and the best one."""
    logger = get_run_logger()
    plan = Plan(config_path, sets)
    ensure_accelerator_limit()
    sweep_id = uuid.uuid4().hex[:12]
    sweep_store.create_sweep(sweep_id, plan.cfg.name, str(plan.path), plan.method, plan.metric, plan.direction,
                             plan.space)
    logger.info(f"sweep {sweep_id}: {plan.trials} trials ({plan.method}) of {plan.path.name}, "
                f"{plan.direction} {plan.metric}")

    try:
        # the base and the data once, before trials start side by side
        cfg, config_dir = plan.trial_config(plan.grid[0] if plan.grid else plan._example())
        base = run_base(cfg, config_dir)
        run_prep(cfg, config_dir, base.artifact_path)
        deployment = deploy_trials(pool) if pool else None
        width = parallel or plan.parallel
        config_path = str(plan.path)
        if plan.grid is not None:
            items = list(enumerate(plan.grid))
            for start in range(0, len(items), width):
                _run_batch(config_path, sweep_id, items[start:start + width], deployment)
        else:
            import optuna
            from optuna.trial import TrialState

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            sampler = (optuna.samplers.TPESampler(seed=plan.seed) if plan.method == "tpe"
                       else optuna.samplers.RandomSampler(seed=plan.seed))
            study = optuna.create_study(direction=plan.direction, sampler=sampler)
            dists, asked = plan.distributions(), 0
            while asked < plan.trials:
                batch = [study.ask(dists) for _ in range(min(width, plan.trials - asked))]
                rows = _run_batch(config_path, sweep_id,
                                  [(asked + i, plan.values(t.params)) for i, t in enumerate(batch)], deployment)
                for t, row in zip(batch, rows):
                    if row.status == "ready":
                        study.tell(t, row.value)
                    else:
                        study.tell(t, state=TrialState.FAIL)
                asked += len(batch)
    except BaseException:
        sweep_store.finish_sweep(sweep_id, None)  # the sweep stopped: recorded as failed, its trials kept
        raise
    result = sweep_store.get_sweep(sweep_id)
    best = best_trial(result.trials, plan.direction)
    sweep_store.finish_sweep(sweep_id, best.trial if best else None)
    for t in result.trials:
        if t.status == "failed":
            logger.warning(f"trial {t.trial} {t.values} failed: {t.error}")
    if best:
        logger.info(f"best: trial {best.trial} {best.values} -> {best.version} ({plan.metric} {best.value:.4g})")
    return {**sweep_store.get_sweep(sweep_id).json(), "best": best.json() if best else None}
