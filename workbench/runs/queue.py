"""A sweep's work queue: the Optuna storage that holds it, how workers reach it, and how a dead worker's run
goes back into it.

Where the queue lives:

- no storage given: a journal file in the sweep folder (`optuna.journal`; one machine, or a shared file
  system), study "sweep";
- a database URL (many machines): `--storage postgresql://me@db/sweeps` with the password in PGPASSWORD or
  ~/.pgpass, or the whole URL in the environment variable `WORKBENCH_SWEEP_STORAGE`. A URL is shown only with
  its password masked (`masked`), in messages, logs and the sweep folder's `queue.json`; a password on the
  command line is refused (every user of the machine sees it in the process list, and the shell keeps it).

`queue.json` in the sweep folder names the study (unique per sweep folder, so many sweeps share one
database) and the storage it lives in (masked): a worker that joins opens that study, and preparing the same
folder against another storage is refused instead of splitting the queue in two.

Dead workers: a worker names itself on the trial it holds (host, pid) and, on a database, records a heartbeat
every `heartbeat_s` seconds (Optuna's heartbeat). A running trial whose worker is gone (its process no longer
exists on this host, or its heartbeat is older than `stale_after_s`) is failed by the first worker or
`workbench sweep` that notices; the one whose change of state went through (the storage lets only one) puts
its grid run back in the queue, so a run is queued again once, however many workers notice.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import threading
import time
import uuid
import warnings
from pathlib import Path

from workbench.core.paths import process_alive, write_atomic
from workbench.runs.config import ConfigError

STORAGE_ENV = "WORKBENCH_SWEEP_STORAGE"
QUEUE_FILE = "queue.json"
JOURNAL = "optuna.journal"
JOURNAL_STUDY = "sweep"  # a journal holds one sweep: its folder's
CONNECT_TIMEOUT_S = 10
CLAIM_GRACE_S = 120.0  # a trial asked for this recently may not carry its worker's name yet

_PASSWORD = re.compile(r"(?P<head>://[^/@:?#]*):(?P<pw>[^@/?#]*)@")
_PASSWORD_PARAM = re.compile(r"(?P<head>[?&]password=)(?P<pw>[^&#]*)", re.IGNORECASE)


def masked(url: str) -> str:
    """A storage URL as it may be shown: its password replaced by ***.

    >>> masked("postgresql://me:s3cret@db:5432/sweeps")
    'postgresql://me:***@db:5432/sweeps'
    >>> masked("postgresql://db/sweeps?user=me&password=s3cret")
    'postgresql://db/sweeps?user=me&password=***'
    """
    url = _PASSWORD.sub(lambda m: f"{m['head']}:***@", url)
    return _PASSWORD_PARAM.sub(lambda m: f"{m['head']}***", url)


def has_password(url: str) -> bool:
    """Whether a URL carries a password (in its user part or as a `password=` parameter)."""
    return masked(url) != url


def storage_url(storage: str | None) -> str | None:
    """The storage URL a sweep uses: the one given, else `$WORKBENCH_SWEEP_STORAGE`, else None (the journal)."""
    return storage or os.environ.get(STORAGE_ENV) or None


def check_command_line_storage(storage: str | None) -> None:
    """Refuse a password given on the command line (`--storage`), naming where it belongs instead."""
    if storage and has_password(storage):
        raise ConfigError(f"--storage {masked(storage)} holds a password, which every user of the machine sees in the "
                          f"process list and the shell keeps in its history: put the URL in ${STORAGE_ENV} instead, or "
                          "only the password in PGPASSWORD or ~/.pgpass")


def _secret_free(text: str, url: str) -> str:
    """`text` (an error message that may quote the URL) with the URL's password masked, on one line."""
    for pattern in (_PASSWORD, _PASSWORD_PARAM):
        for m in pattern.finditer(url):
            if m["pw"]:
                text = text.replace(m["pw"], "***")
    return " ".join(masked(text).split())


def _reason(e: Exception) -> str:
    """What a driver said, without SQLAlchemy's wrapping (the statement, the link to its docs)."""
    orig = getattr(e, "orig", None)
    text = str(orig if orig is not None else e)
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("(Background")]
    return f"{type(orig if orig is not None else e).__name__}: {'; '.join(lines)}"


def _rdb(url: str, heartbeat_s: int, stale_after_s: int):
    import optuna  # deferred: only sweeps need it
    from optuna.storages import RDBStorage  # deferred: only sweeps need it

    engine: dict = {"pool_pre_ping": True}
    if url.startswith("postgresql"):
        engine["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    try:
        with warnings.catch_warnings():  # the heartbeat is marked experimental; it is what we test
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat_s, grace_period=stale_after_s,
                              heartbeat_stale_trial_callback=_on_stale)
    except Exception as e:  # a wrong URL, a missing driver, an unreachable server, a refused password
        raise ConfigError(f"cannot open the sweep queue at {masked(url)}: {_secret_free(_reason(e), url)}") from None


def _journal(sweep_dir: Path):
    from optuna.storages import JournalStorage  # deferred: only sweeps need it
    from optuna.storages.journal import JournalFileBackend  # deferred: only sweeps need it

    return JournalStorage(JournalFileBackend(str(sweep_dir / JOURNAL)))


def _study_name(sweep_dir: Path, url: str | None, create: bool) -> str:
    """The study of this sweep folder in its storage: from `queue.json`, or a new unique name (database)."""
    if url is None:
        return JOURNAL_STUDY
    path = sweep_dir / QUEUE_FILE
    if path.is_file():
        queue = json.loads(path.read_text())
        if create and queue["storage"] != masked(url):
            raise ConfigError(f"sweep folder {sweep_dir} is queued in {queue['storage']}, not {masked(url)}: give "
                              f"every worker the same storage (--storage or ${STORAGE_ENV}), or start a new sweep folder")
        return queue["study"]
    if not create:
        raise ConfigError(f"sweep folder {sweep_dir} is not prepared (no {QUEUE_FILE}): start the sweep there without "
                          "--join first, then join further workers")
    return f"sweep-{sweep_dir.resolve().name}-{uuid.uuid4().hex[:8]}"


def open_study(sweep_dir: str | os.PathLike, storage: str | None = None, *, create: bool = False,
               direction: str = "minimize", sampler=None, heartbeat_s: int = 30, stale_after_s: int = 300):
    """The Optuna study holding a sweep's queue (`create`: made when missing, else it must exist).

    `storage` is a database URL or None (the sweep folder's journal); `storage_url` resolves the environment.
    Every failure is one `ConfigError` line that names the storage (password masked) and what to do.
    """
    import optuna  # deferred: only sweeps need it

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweep_dir = Path(sweep_dir)
    where = masked(storage) if storage else str(sweep_dir / JOURNAL)
    if storage is None and not create and not (sweep_dir / JOURNAL).is_file():
        raise ConfigError(f"sweep folder {sweep_dir} is not prepared (no {JOURNAL}): start the sweep there "
                          "without --join first, then join further workers")
    name = _study_name(sweep_dir, storage, create)
    backend = _rdb(storage, heartbeat_s, stale_after_s) if storage else None  # a bad URL stops here: nothing made
    if create:
        sweep_dir.mkdir(parents=True, exist_ok=True)
    try:
        backend = backend or _journal(sweep_dir)
        if not create:
            return optuna.load_study(study_name=name, storage=backend, sampler=sampler)
        study = optuna.create_study(study_name=name, storage=backend, load_if_exists=True,
                                    direction=direction,  # type: ignore[arg-type]  # one of DIRECTIONS (SweepConfig)
                                    sampler=sampler)
    except KeyError:
        raise ConfigError(f"the storage {where} holds no sweep {name!r}: start it without --join first (with the same "
                          "storage)") from None
    except Exception as e:  # a damaged journal or database: say which, and that the runs are safe
        reason = _secret_free(_reason(e), storage or "")
        raise ConfigError(f"the sweep's queue {where} cannot be read ({reason}). The finished runs in "
                          f"{sweep_dir / 'runs'} are kept: move the queue aside and run `workbench sweep` again "
                          "(without --join) to rebuild it from them") from None
    if storage is not None and not (sweep_dir / QUEUE_FILE).is_file():
        write_atomic(sweep_dir / QUEUE_FILE, json.dumps(dict(study=name, storage=masked(storage)), indent=2))
    return study


# ----------------------------------------------------------------------------------------------
# Workers: who holds a trial, whether it is alive, and putting a dead worker's run back


def take(study):
    """The next trial (a waiting one first), claimed by this worker: its host and pid on the trial, so others can
    tell live from dead. The heartbeat is ours (`heartbeat`), not `Study.optimize`'s, so Optuna's warning
    that it expects `optimize` does not apply."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        trial = study.ask()
    trial.set_user_attr("worker", dict(host=platform.node(), pid=os.getpid()))
    return trial


def has_heartbeat(study) -> bool:
    """Whether the study's storage records heartbeats (a database), so another host's dead worker is seen."""
    interval = getattr(study._storage, "get_heartbeat_interval", None)  # a database (behind Optuna's cache)
    return bool(interval and interval())


def worker_alive(trial) -> bool:
    """Whether the worker holding a running trial may still be at work, as far as its process tells: on this
    host, its process exists; another host's is taken as alive here (its heartbeat, on a database, decides)."""
    worker = trial.user_attrs.get("worker")
    if worker is None:
        started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
        return time.time() - started < CLAIM_GRACE_S
    return worker.get("host") != platform.node() or process_alive(int(worker["pid"]))


def recoverable(trial, heartbeat: bool) -> bool:
    """Whether this process could tell if the trial's worker died: it runs on this host, or heartbeats count."""
    worker = trial.user_attrs.get("worker") or {}
    return heartbeat or worker.get("host", platform.node()) == platform.node()


def _requeue_stale(study, trial) -> None:
    """Put a failed grid trial's run back in the queue (a search trial is simply failed: the search asks anew)."""
    key = trial.user_attrs.get("run")
    if key and not trial.params:
        study.enqueue_trial({}, user_attrs=dict(run=key))


_stale_seen = [0]  # trials this process failed through Optuna's heartbeat check (its callback runs only for those)


def _on_stale(study, trial) -> None:
    _stale_seen[0] += 1
    _requeue_stale(study, trial)


def _fail_first(study, trial) -> bool:
    """Fail a running trial; True only for the one caller whose change went through."""
    import optuna  # deferred: only sweeps need it

    try:
        return bool(study._storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL))
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def reclaim(study, requeue: bool = True) -> int:
    """Fail the running trials whose worker is gone and put their grid runs back (`requeue=False`: the caller
    queues every missing run itself, as `prepare` does); returns how many this call reclaimed (a trial another
    process reclaimed first is not counted, and its run is queued once)."""
    import optuna  # deferred: only sweeps need it

    seen = _stale_seen[0]
    if has_heartbeat(study):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # heartbeat too old: `_on_stale` requeues
    n = _stale_seen[0] - seen
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if not worker_alive(t) and _fail_first(study, t):
            if requeue:
                _requeue_stale(study, t)
            n += 1
    return n


@contextlib.contextmanager
def heartbeat(study, trial):
    """Record the trial's heartbeat every interval while the block runs (databases only; a no-op otherwise).
    A failed beat (a database blip) is retried at the next one: the trial goes stale only after `stale_after_s`."""
    if not has_heartbeat(study):
        yield
        return
    storage = study._storage
    interval = storage.get_heartbeat_interval()
    stop = threading.Event()

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):
                storage.record_heartbeat(trial._trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def queue_status(sweep_dir: str | os.PathLike, storage: str | None = None):
    """What a sweep's queue holds now: one row per trial (run key, state, the worker's host and pid, whether
    that worker is alive as far as this machine can tell, seconds since it started), waiting and running first.
    `storage`: None takes `$WORKBENCH_SWEEP_STORAGE`, else the folder's journal.

    >>> import tempfile
    >>> queue_status(tempfile.mkdtemp()).empty   # a folder with no queue
    True
    """
    import pandas as pd  # deferred: only tables need it

    columns = ["run", "state", "host", "pid", "alive", "seconds"]
    sweep_dir = Path(sweep_dir)
    url = storage_url(storage)
    if url is None and not (sweep_dir / JOURNAL).is_file() or url is not None and not (sweep_dir / QUEUE_FILE).is_file():
        return pd.DataFrame(columns=columns)
    study = open_study(sweep_dir, url)
    rows = []
    for t in study.get_trials(deepcopy=False):
        worker = t.user_attrs.get("worker") or {}
        running = t.state.name == "RUNNING"
        started = t.datetime_start.timestamp() if t.datetime_start else None
        rows.append(dict(run=t.user_attrs.get("run"), state=t.state.name.lower(), host=worker.get("host"),
                         pid=worker.get("pid"), alive=worker_alive(t) if running else None,
                         seconds=round(time.time() - started, 1) if running and started else None))
    order = {"running": 0, "waiting": 1, "fail": 2, "complete": 3}
    table = pd.DataFrame(rows, columns=columns)
    return table.sort_values("state", key=lambda s: s.map(order).fillna(4), kind="stable").reset_index(drop=True)
