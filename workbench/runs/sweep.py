"""Sweeps: a base run config and a grid (or an Optuna search) of overrides, run by one or many workers.

    base: run.yaml                  # a run file (relative to this file) or an inline mapping
    grid:                           # dotted keys -> lists; the cartesian product, in file order
      scoring: [taylor, layerwise, blockwise]      # a string for `scoring` names a preset (PRESETS)
      calibration.num_samples: [32, 64]
    objective: ppl                  # a column of the consolidated table (ppl, ppl_finetuned, acc_mean, ...)
    direction: minimize
    # or, instead of grid:
    search: {trials: 20, sampler: tpe, seed: 0,
             params: {selection.ratio: {low: 0.1, high: 0.3}, scoring.normalization: {choices: [none, log]}}}

Layout: `<sweep_dir>/sweep.yaml` (the file as read), `runs/<key>/` one experiment per run (key = hash of the
resolved run config; the resolved `run.yaml` and `status.json` inside), `optuna.journal` (the work queue), or
`queue.json` naming the queue's study in a database (`workbench.runs.queue`).

Who runs what is Optuna's storage, not a home-made queue: `prepare` enqueues every grid run that is not
complete on disk, and each worker pops waiting trials (`study.ask`), which the storage hands to exactly one
worker. A run is written into a staging folder and moved under its key only when it is complete; a run that
raises is recorded as failed with its traceback, and the sweep goes on. A killed sweep loses only the runs in
progress: the next `workbench sweep` marks running trials whose worker is gone (its process on this host no
longer exists) failed and enqueues their runs again; a live worker's trial is left to it, and its run is not
enqueued twice. A complete run's record is never overwritten. Workers on other machines that share the folder (and a
database URL, whose heartbeats tell a dead worker on another machine) join with `join=True`; a worker with
nothing left to take stays while others hold runs it could take over if their worker died.
"""
from __future__ import annotations

import copy
import itertools
import json
import multiprocessing as mp
import os
import platform
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workbench.core.experiments import Experiment
from workbench.core.paths import clean_staging, write_atomic
from workbench.core.registry import Registry, check_choice, choice_error
from workbench.plans.normalize import PRESETS
from workbench.runs.config import (
    ConfigError,
    RunConfig,
    config_hash,
    dump_yaml,
    from_dict,
    read_yaml,
    save_config,
    to_dict,
    with_overrides,
)
from workbench.runs.pipeline import run_pruning
from workbench.runs.queue import (
    JOURNAL,
    has_heartbeat,
    heartbeat,
    masked,
    open_study,
    reclaim,
    recoverable,
    storage_url,
    take,
)
from workbench.surgery.checkpoints import load_model

STATUS = "status.json"
RUN_FILE = "run.yaml"
SAMPLERS = ("tpe", "random")
DIRECTIONS = ("minimize", "maximize")


RANGE_KEYS, CHOICE_KEYS = {"low", "high", "log", "step"}, {"choices"}


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf")


def _check_param(key: str, spec) -> None:
    """One search parameter: {low, high[, log, step]} with low <= high (log: low > 0, no step), or a non-empty
    {choices: [...]}. Anything else is refused before a trial is queued."""
    shape = f"params[{key!r}]={spec!r}"
    if not isinstance(spec, dict) or not (spec.keys() <= RANGE_KEYS and {"low", "high"} <= spec.keys()
                                          or spec.keys() == CHOICE_KEYS):
        raise ValueError(f"{shape} must be {{low, high[, log, step]}} or {{choices: [...]}}")
    if "choices" in spec:
        if not isinstance(spec["choices"], list) or not spec["choices"]:
            raise ValueError(f"{shape}: choices must be a non-empty list")
        return
    low, high = spec["low"], spec["high"]
    if not (_number(low) and _number(high)):
        raise ValueError(f"{shape}: low and high must be finite numbers")
    if low > high:
        raise ValueError(f"{shape}: low={low} is above high={high}")
    if not isinstance(spec.get("log", False), bool):
        raise ValueError(f"{shape}: log must be true or false")
    if spec.get("log") and ("step" in spec or low <= 0):
        raise ValueError(f"{shape}: a log range needs low > 0 and no step (Optuna cannot step a log scale)")
    if "step" in spec and not (_number(spec["step"]) and spec["step"] > 0):
        raise ValueError(f"{shape}: step={spec['step']!r} must be a positive number")


def search_corners(search: "SearchConfig") -> list[dict]:
    """Every value each parameter can reach at its ends (low, high, every choice), the others at their first:
    the points `load_sweep` checks as whole run configs before anything is queued."""
    first = {k: (v["choices"][0] if "choices" in v else v["low"]) for k, v in search.params.items()}
    points = []
    for key, spec in search.params.items():
        for value in (spec["choices"] if "choices" in spec else (spec["low"], spec["high"])):
            points.append(dict(first, **{key: value}))
    return points


@dataclass(frozen=True)
class SearchConfig:
    """An Optuna search over run settings.

    Args:
        params: dotted key -> {low, high[, log, step]} (a number) or {choices: [...]}.
        trials: completed + failed trials to stop at, over all workers.
        sampler: "tpe" or "random".
        seed: the sampler's seed.
    """

    params: dict = field(default_factory=dict)
    trials: int = 20
    sampler: str = "tpe"
    seed: int = 0

    def __post_init__(self):
        if not self.params:
            raise ValueError("params is empty; name at least one dotted key with a range or choices")
        for key, spec in self.params.items():
            _check_param(key, spec)
        if self.trials < 1:
            raise ValueError(f"trials={self.trials} must be a positive integer")
        check_choice("sampler", self.sampler, SAMPLERS)


@dataclass(frozen=True)
class SweepConfig:
    """A sweep file.

    Args:
        base: the run every point starts from (a run-file mapping).
        grid: dotted key -> list of values; the runs are their cartesian product.
        search: an Optuna search instead of the grid.
        objective: the consolidated column a search optimizes and `best` ranks by.
        direction: "minimize" or "maximize".
        heartbeat_s: on a database queue, how often a worker records that it is alive (seconds).
        stale_after_s: on a database queue, a running trial whose last heartbeat is older than this is taken
            for dead: failed, and its run queued again (at least twice `heartbeat_s`; a run outlives a short
            database outage, since only the time since the last recorded beat counts).
        poll_s: how often a worker with nothing left to take looks again while others still hold runs.
    """

    base: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    search: SearchConfig | None = None
    objective: str = "ppl"
    direction: str = "minimize"
    heartbeat_s: int = 30
    stale_after_s: int = 300
    poll_s: float = 5.0

    def __post_init__(self):
        check_choice("direction", self.direction, DIRECTIONS)
        for name in ("heartbeat_s", "stale_after_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive whole number of seconds")
        if self.stale_after_s < 2 * self.heartbeat_s:
            raise ValueError(f"stale_after_s={self.stale_after_s} must be at least twice heartbeat_s={self.heartbeat_s}, "
                             "or one late beat would make a live worker's run look dead")
        if not _number(self.poll_s) or self.poll_s <= 0:
            raise ValueError(f"poll_s={self.poll_s!r} must be a positive number of seconds")
        if self.search is not None and self.grid:
            raise ValueError("a sweep has either a grid or a search, not both (put one of them in a second sweep)")
        if self.search is None:
            if not self.grid:
                raise ValueError("the grid is empty: give at least one dotted key with a list of values, or a search")
            for key, values in self.grid.items():
                if not isinstance(values, list) or not values:
                    raise ValueError(f"grid[{key!r}]={values!r} must be a non-empty list of values")


# ----------------------------------------------------------------------------------------------
# Reading sweep files and expanding them


def load_sweep(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> SweepConfig:
    """A sweep file; `base` given as a path is read relative to the sweep file. Every run is checked up front."""
    path = Path(path)
    data = read_yaml(path)
    base = data.get("base") or {}
    if isinstance(base, str):
        base = read_yaml(path.parent / base)
    data["base"] = with_overrides(base, overrides, f"{path}: base")
    sweep = from_dict(SweepConfig, data)
    if sweep.search is None:
        configs = expand(sweep)  # every grid point checked
    else:
        configs = []
        for point in search_corners(sweep.search):
            try:
                configs.append(from_dict(RunConfig, _apply(sweep.base, point.items())))
            except ConfigError as e:
                raise ConfigError(f"search point {point}: {e}") from None
    for cfg in configs:
        if sweep.objective not in objectives(cfg):
            raise ConfigError(f"objective {sweep.objective!r} is not produced by the run {_short(cfg)}; its runs "
                              f"produce {sorted(objectives(cfg))} (acc_mean needs zero_shot, ppl_finetuned finetune)")
    return sweep


# objective -> (the run-config section that must be on for a run to record it, where the run's record holds it)
OBJECTIVES: Registry[tuple[str | None, tuple[str, str]]] = Registry("objective", {
    "ppl": (None, ("pruned", "ppl")),
    "ppl_dense": (None, ("dense", "ppl")),
    "ppl_finetuned": ("finetune", ("finetuned", "ppl")),
    "acc_mean": ("zero_shot", ("zero_shot", "mean_acc")),
})


def objectives(cfg: RunConfig) -> set[str]:
    """The objective values a run of this config records (`status.json`'s objective_values)."""
    return {name for name, (section, _) in OBJECTIVES.items() if section is None or getattr(cfg, section) is not None}


def _short(cfg: RunConfig) -> str:
    return f"{config_hash(cfg)} (finetune={'on' if cfg.finetune else 'off'}, zero_shot={'on' if cfg.zero_shot else 'off'})"


def _apply(base: dict, assignments) -> dict:
    """A copy of `base` with dotted keys set (a string for `scoring` names a preset). A section is set before
    the keys inside it, whatever their order: `scoring: blockwise` with `scoring.clip_high: 99` is the preset
    with that change, never the preset alone."""
    out = copy.deepcopy(base)
    for key, value in sorted(assignments, key=lambda kv: kv[0].count(".")):
        if key == "scoring" and isinstance(value, str):
            if value not in PRESETS:
                raise choice_error("scoring", value, PRESETS, ConfigError, verb="one of the presets")
            value = to_dict(PRESETS[value])
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part!r} is not a section")
        node[parts[-1]] = copy.deepcopy(value)
    return out


def expand(sweep: SweepConfig) -> list[RunConfig]:
    """The grid's runs in file order (the last key varies fastest); duplicates once."""
    keys = list(sweep.grid)
    runs, seen = [], set()
    for values in itertools.product(*(sweep.grid[k] for k in keys)):
        data = _apply(sweep.base, zip(keys, values))
        try:
            cfg = from_dict(RunConfig, data)
        except ConfigError as e:
            raise ConfigError(f"grid point {dict(zip(keys, values))}: {e}") from None
        if (k := config_hash(cfg)) not in seen:
            seen.add(k)
            runs.append(cfg)
    return runs


# ----------------------------------------------------------------------------------------------
# One run


def run_status(run_dir: str | os.PathLike) -> dict | None:
    """The status record of a run directory, or None when there is none (never started, or in progress)."""
    path = Path(run_dir) / STATUS
    return json.loads(path.read_text()) if path.is_file() else None


def _versions() -> dict:
    import transformers  # deferred: transformers loads in seconds

    return dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__)


class ModelPool:
    """The last loaded dense model of a worker, copied for each run (runs prune their model in place)."""

    def __init__(self):
        self._key, self._model, self._tok = None, None, None

    def get(self, cfg: RunConfig):
        key = (cfg.model.name, cfg.model.dtype, cfg.model.device)
        if key != self._key:
            self._model = self._tok = None
            self._model, self._tok = load_model(cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device)
            self._key = key
        return copy.deepcopy(self._model), self._tok


def run_one(cfg: RunConfig, runs_dir: str | os.PathLike, *, pool: ModelPool | None = None, log=print,
            progress: bool = False) -> dict:
    """Run one config into `<runs_dir>/<key>/` unless it is complete there; returns its status record.

    Complete runs are skipped; a failed record is replaced by the new attempt. A run that raises leaves a
    record `status: failed` with its traceback (and its resolved config) instead of its results.
    """
    runs_dir = Path(runs_dir)
    key = config_hash(cfg)
    final = runs_dir / key
    status = run_status(final)
    if status is not None and status["status"] == "complete":
        return status
    pool = pool or ModelPool()
    t0 = time.time()
    base = dict(key=key, started=time.strftime("%Y-%m-%dT%H:%M:%S"), host=platform.node(), pid=os.getpid(),
                versions=_versions())
    try:
        with Experiment.staged(key, base=runs_dir, overwrite=final.exists(), project_figures=False) as exp:
            save_config(cfg, exp.root / RUN_FILE)
            model, tok = pool.get(cfg)
            record = run_pruning(model, tok, cfg, exp, log=log, progress=progress)
            status = dict(base, status="complete", seconds=round(time.time() - t0, 2),
                          objective_values=_objective_values(record))
            write_atomic(exp.root / STATUS, json.dumps(status, indent=2))
        return status
    except Exception as e:  # recorded; the sweep goes on
        done = run_status(final)
        if done is not None and done["status"] == "complete":  # completed meanwhile by another worker: kept
            log(f"run {key}: finished elsewhere meanwhile; its record is kept ({type(e).__name__}: {e})")
            return done
        status = dict(base, status="failed", seconds=round(time.time() - t0, 2), error=f"{type(e).__name__}: {e}",
                      traceback=traceback.format_exc())
        exp = Experiment.create(key, base=runs_dir, exist_ok=True)
        save_config(cfg, exp.root / RUN_FILE)
        write_atomic(exp.root / STATUS, json.dumps(status, indent=2))
        log(f"run {key} failed: {status['error']}")
        return status


def _objective_values(record: dict) -> dict:
    return {name: record[part][key] for name, (_, (part, key)) in OBJECTIVES.items() if part in record}


# ----------------------------------------------------------------------------------------------
# The queue (Optuna storage, workbench.runs.queue) and the workers


def _open(sweep: SweepConfig, sweep_dir: Path, storage: str | None, *, create: bool):
    import optuna  # deferred: only sweeps need it

    sampler = None
    if sweep.search is not None:
        sampler = (optuna.samplers.TPESampler(seed=sweep.search.seed) if sweep.search.sampler == "tpe"
                   else optuna.samplers.RandomSampler(seed=sweep.search.seed))
    return open_study(sweep_dir, storage, create=create, direction=sweep.direction, sampler=sampler,
                      heartbeat_s=sweep.heartbeat_s, stale_after_s=sweep.stale_after_s)


def prepare(sweep: SweepConfig, sweep_dir: str | os.PathLike, *, storage: str | None = None) -> dict:
    """Make the sweep folder and the queue: running trials whose worker is gone are failed and their runs queued
    again, and every grid run that is neither complete on disk, nor waiting, nor running in a live worker is
    enqueued. `storage`: a database URL, or None for the folder's journal. Returns counts."""
    import optuna  # deferred: only sweeps need it

    sweep_dir = Path(sweep_dir)
    study = _open(sweep, sweep_dir, storage, create=True)  # a bad storage stops here, before anything is written
    (sweep_dir / "runs").mkdir(parents=True, exist_ok=True)
    clean_staging(sweep_dir / "runs")  # staging folders of runs whose worker was killed (whole checkpoints)
    write_atomic(sweep_dir / "sweep.yaml", dump_yaml(to_dict(sweep)))
    stale = reclaim(study, requeue=False)  # their runs are queued with the missing ones below
    running = {t.user_attrs.get("run") for t in study.get_trials(deepcopy=False,
                                                                 states=(optuna.trial.TrialState.RUNNING,))}
    live = len(running)
    if sweep.search is not None:
        return dict(stale=stale, live=live, enqueued=0, complete=0)
    waiting = {t.user_attrs.get("run") for t in study.get_trials(deepcopy=False,
                                                                 states=(optuna.trial.TrialState.WAITING,))}
    enqueued = complete = 0
    for cfg in expand(sweep):
        key = config_hash(cfg)
        status = run_status(sweep_dir / "runs" / key)
        if status is not None and status["status"] == "complete":
            complete += 1
        elif key not in waiting and key not in running:
            study.enqueue_trial({}, user_attrs=dict(run=key))
            enqueued += 1
    return dict(stale=stale, live=live, enqueued=enqueued, complete=complete)


def _others_running(study) -> bool:
    """Whether another worker holds a trial that this one would take over if that worker died (see `recoverable`)."""
    import optuna  # deferred: only sweeps need it

    beats = has_heartbeat(study)
    return any(recoverable(t, beats) for t in study.get_trials(deepcopy=False,
                                                               states=(optuna.trial.TrialState.RUNNING,)))


def work(sweep: SweepConfig, sweep_dir: str | os.PathLike, *, storage: str | None = None, log=print,
         max_runs: int | None = None) -> int:
    """One worker: pop waiting grid runs (or ask the search for trials) until none is left; returns runs done.

    Before each run the worker reclaims the trials of dead workers (their runs go back in the queue). With
    nothing waiting, it stays while another worker holds a run it could take over (one on this host, or any on
    a database, whose heartbeats tell), polling every `poll_s`; so a killed worker's run is still done by the
    workers that remain."""
    import optuna  # deferred: only sweeps need it

    sweep_dir = Path(sweep_dir)
    study = _open(sweep, sweep_dir, storage, create=False)
    runs_dir = sweep_dir / "runs"
    pool = ModelPool()
    done = 0
    if sweep.search is not None:
        return _search(sweep, study, runs_dir, pool, log, max_runs)
    by_key = {config_hash(c): c for c in expand(sweep)}
    while max_runs is None or done < max_runs:
        if reclaim(study):
            log("runs of a stopped worker are back in the queue")
        if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
            if not _others_running(study):
                break
            time.sleep(sweep.poll_s)
            continue
        trial = take(study)
        key = trial.user_attrs.get("run")
        if key not in by_key:  # another worker took the last waiting run meanwhile
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        with heartbeat(study, trial):
            status = run_one(by_key[key], runs_dir, pool=pool, log=log)
        _tell(study, trial, status, sweep.objective)
        done += 1
        if (status.get("host"), status.get("pid")) == (platform.node(), os.getpid()):
            log(f"run {key}: {status['status']} ({done} by this worker)")
        else:  # a run another worker finished before its trial was told: found on disk, not run again
            log(f"run {key}: found {status['status']} on disk (run by {status.get('host')} pid {status.get('pid')})")
    return done


def _tell(study, trial, status: dict, objective: str) -> None:
    import optuna  # deferred: only sweeps need it

    value = status.get("objective_values", {}).get(objective)
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if not any(t.number == trial.number for t in running):  # reclaimed by an invocation that took us for dead
        return
    if status["status"] != "complete" or value is None or value != value:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    else:
        study.tell(trial, value)


def _search(sweep: SweepConfig, study, runs_dir: Path, pool: ModelPool, log, max_runs: int | None) -> int:
    import optuna  # deferred: only sweeps need it

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
    assert sweep.search is not None  # _search runs only for sweeps with a search section
    done = 0
    while max_runs is None or done < max_runs:
        if len(study.get_trials(deepcopy=False, states=states)) >= sweep.search.trials:
            break
        trial = take(study)
        values = {}
        for key, spec in sweep.search.params.items():
            if "choices" in spec:
                values[key] = trial.suggest_categorical(key, list(spec["choices"]))
            elif isinstance(spec["low"], int) and isinstance(spec["high"], int) and not spec.get("log"):
                values[key] = trial.suggest_int(key, spec["low"], spec["high"], step=spec.get("step", 1))
            else:
                values[key] = trial.suggest_float(key, spec["low"], spec["high"], log=bool(spec.get("log")),
                                                  step=spec.get("step"))
        try:
            cfg = from_dict(RunConfig, _apply(sweep.base, values.items()))
        except ConfigError as e:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            log(f"trial {trial.number}: {e}")
            continue
        trial.set_user_attr("run", config_hash(cfg))
        with heartbeat(study, trial):
            status = run_one(cfg, runs_dir, pool=pool, log=log)
        _tell(study, trial, status, sweep.objective)
        done += 1
    return done


def _worker_main(sweep_path: str, overrides: list[str], sweep_dir: str, storage: str | None, threads: int) -> None:
    torch.set_num_threads(threads)
    work(load_sweep(sweep_path, overrides), sweep_dir, storage=storage, log=lambda *_: None)


def run_sweep(sweep_path: str | os.PathLike, sweep_dir: str | os.PathLike, *, overrides: list[str] | tuple = (),
              workers: int = 1, storage: str | None = None, join: bool = False, log=print) -> dict:
    """`workbench sweep`: prepare the queue (unless joining a running sweep), then run `workers` local workers.

    `storage`: a database URL; None takes `$WORKBENCH_SWEEP_STORAGE`, and without it the sweep folder's journal.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r} must be a positive integer")
    sweep = load_sweep(sweep_path, overrides)
    storage = storage_url(storage)
    counts = {} if join else prepare(sweep, sweep_dir, storage=storage)
    if counts:
        log(f"sweep {sweep_dir} (queue: {masked(storage) if storage else JOURNAL}): {counts['complete']} complete, "
            f"{counts['enqueued']} to run, "
            f"{counts['stale']} stale trials of a stopped worker marked failed and run again, "
            f"{counts['live']} running in live workers (left to them)")
    if workers == 1:
        work(sweep, sweep_dir, storage=storage, log=log)
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker_main, args=(str(sweep_path), list(overrides), str(sweep_dir), storage,
                                                        threads)) for _ in range(workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        bad = [p.exitcode for p in procs if p.exitcode]
        if bad:
            raise RuntimeError(f"{len(bad)} of {workers} workers exited with codes {bad}; the runs they finished "
                               "are kept, run the sweep again to finish the rest")
    return counts
