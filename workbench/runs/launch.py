"""`workbench launch`: a sweep's workers as a cluster job array (submitit), one GPU each, sharing one queue.

On a Slurm login node (the sweep folder on a file system the compute nodes share; the queue in a database
that they reach):

    export WORKBENCH_SWEEP_STORAGE=postgresql://me@dbhost:5432/sweeps     # the password in ~/.pgpass
    workbench launch configs/study-matrix.yaml --dir /shared/sweeps/study --workers 16 --partition gpu --hours 12
    workbench consolidate /shared/sweeps/study                            # when `squeue --me` is empty

`launch` prepares the queue here (fast: no model is loaded), then submits one array of `workers` jobs, each
running `workbench sweep --join` on the folder's resolved `sweep.yaml`. A job reads the storage URL from its
environment (Slurm hands it the submitting shell's), so a password is never in the job's pickled arguments,
its script, its logs or the sweep folder. A worker killed by Slurm (time limit, pre-emption, a node lost) is
taken for dead once its heartbeat is older than `stale_after_s`, and another worker runs its run again.
`--executor local` runs the same array as processes on this machine (what the tests run).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from workbench.core.registry import check_choice
from workbench.runs.config import ConfigError
from workbench.runs.queue import STORAGE_ENV, has_password, masked, storage_url
from workbench.runs.sweep import load_sweep, prepare, work

EXECUTORS = ("slurm", "local")
LOG_DIR = "jobs"  # inside the sweep folder: submitit's scripts, pickled calls and each job's stdout/stderr


@dataclass(frozen=True)
class LaunchConfig:
    """What `workbench launch` asks the cluster for.

    Args:
        workers: jobs in the array (each one worker on one GPU; at most this many run at once).
        executor: "slurm" (sbatch on this login node) or "local" (processes on this machine).
        partition: the Slurm partition (None: the cluster's default).
        gpus_per_worker: GPUs per job (0 for CPU-only workers).
        cpus_per_worker: CPU cores per job (data loading, tokenization, the CPU side of the runs).
        mem_gb: memory per job in GiB (None: the partition's default).
        hours: the time limit of each job; a worker stopped by it leaves its run to the others.
        account: the Slurm account to charge (None: the user's default).
        qos: the Slurm quality of service (None: the default).
        setup: shell lines each job runs first (e.g. `source ~/venvs/wb/bin/activate`).
    """

    workers: int = 1
    executor: str = "slurm"
    partition: str | None = None
    gpus_per_worker: int = 1
    cpus_per_worker: int = 8
    mem_gb: int | None = None
    hours: float = 12.0
    account: str | None = None
    qos: str | None = None
    setup: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        check_choice("executor", self.executor, EXECUTORS)
        for name in ("workers", "cpus_per_worker"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if isinstance(self.gpus_per_worker, bool) or not isinstance(self.gpus_per_worker, int) or self.gpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker={self.gpus_per_worker!r} must be a whole number >= 0")
        if self.mem_gb is not None and (isinstance(self.mem_gb, bool) or not isinstance(self.mem_gb, int)
                                        or self.mem_gb < 1):
            raise ValueError(f"mem_gb={self.mem_gb!r} must be a positive integer (GiB) or unset")
        if not isinstance(self.hours, (int, float)) or isinstance(self.hours, bool) or not 0 < self.hours <= 24 * 30:
            raise ValueError(f"hours={self.hours!r} must be a number of hours in (0, 720]")


def sweep_worker(sweep_dir: str, storage: str | None) -> int:
    """One job of the array: `workbench sweep --join` on the folder's resolved `sweep.yaml`. `storage` is
    None when the URL carries a password: the job reads it from `$WORKBENCH_SWEEP_STORAGE`."""
    sweep = load_sweep(Path(sweep_dir) / "sweep.yaml")
    return work(sweep, sweep_dir, storage=storage_url(storage), log=lambda *a: print(*a, flush=True))


@contextlib.contextmanager
def _environment(name: str, value: str | None):
    """`value` in the environment for the block (the submitted jobs inherit it); the old value after."""
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def _executor(cfg: LaunchConfig, folder: Path, name: str):
    import submitit  # deferred: only launching needs it

    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=cfg.executor)
    params: dict = dict(name=name, timeout_min=max(1, round(cfg.hours * 60)), gpus_per_node=cfg.gpus_per_worker,
                        cpus_per_task=cfg.cpus_per_worker, slurm_array_parallelism=cfg.workers)
    if cfg.mem_gb is not None:
        params["mem_gb"] = cfg.mem_gb
    for key in ("partition", "account", "qos"):
        if getattr(cfg, key) is not None:
            params[f"slurm_{key}"] = getattr(cfg, key)
    if cfg.setup:
        params["slurm_setup"] = list(cfg.setup)
        params["local_setup"] = list(cfg.setup)
    executor.update_parameters(**params)
    return executor


def launch(sweep_path: str | os.PathLike, sweep_dir: str | os.PathLike, cfg: LaunchConfig, *,
           overrides: list[str] | tuple = (), storage: str | None = None, wait: bool = False, log=print) -> list:
    """Prepare the sweep's queue, then submit `cfg.workers` jobs that work it off; returns submitit's jobs
    (`wait`: after they have all ended, each job's failure re-raised as one line naming its log).

    >>> LaunchConfig(workers=4, partition="gpu", hours=6).executor
    'slurm'
    """
    storage = storage_url(storage)
    if storage is None and cfg.executor == "slurm":
        log(f"note: no database queue (--storage or ${STORAGE_ENV}); the workers share the journal file in {sweep_dir}, "
            "which needs a file system with working locks on every node")
    sweep_dir = Path(sweep_dir).resolve()
    counts = prepare(load_sweep(sweep_path, overrides), sweep_dir, storage=storage)
    log(f"sweep {sweep_dir} (queue: {masked(storage) if storage else 'optuna.journal'}): {counts['complete']} complete, "
        f"{counts['enqueued']} to run, {counts['live']} running in live workers")
    secret = storage is not None and has_password(storage)
    with _environment(STORAGE_ENV, storage if secret else None):
        executor = _executor(cfg, sweep_dir / LOG_DIR, f"sweep-{sweep_dir.name}")
        try:
            jobs = executor.map_array(sweep_worker, [str(sweep_dir)] * cfg.workers,
                                      [None if secret else storage] * cfg.workers)
        except Exception as e:  # sbatch refused (a wrong partition, account, limit): its own words
            raise ConfigError(f"the cluster refused the job array: {' '.join(str(e).split())}") from None
    log(f"submitted {len(jobs)} workers ({cfg.executor}): job {jobs[0].job_id.split('_')[0]}; logs in "
        f"{sweep_dir / LOG_DIR}")
    if wait:
        failed = []
        for job in jobs:
            try:
                job.result()
            except Exception as e:
                failed.append(f"job {job.job_id} ({' '.join(str(e).split())[:300]}; log: {job.paths.stderr})")
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(jobs)} workers failed; the runs they finished are kept: "
                               + " | ".join(failed))
    return jobs
