"""Sweeps across processes and machines on a real PostgreSQL server (see conftest.py), the cluster launcher
(submitit's local executor, and Slurm's script through a stand-in `sbatch`), and credentials kept out of files."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workbench.runs.cli import main
from workbench.runs.config import ConfigError, config_hash
from workbench.runs.queue import STORAGE_ENV, masked, open_study, queue_status, reclaim, take
from workbench.runs.sweep import expand, load_sweep, prepare, run_status

RUN = """\
model: {name: tiny}
calibration: {num_samples: 4, seq_len: 32, batch_size: 2}
selection: {ratio: 0.2}
eval_windows: 4
eval_seq_len: 32
save_model: false
"""
# a dead worker's heartbeat goes stale in seconds here (the defaults are 30 s and 300 s)
QUEUE = "heartbeat_s: 1\nstale_after_s: 3\npoll_s: 0.3\n"
README = Path(__file__).resolve().parents[2] / "README.md"


def _files(tmp_path, grid="  scoring: [taylor, layerwise, blockwise]\n  calibration.num_samples: [2, 4]\n"):
    (tmp_path / "run.yaml").write_text(RUN)
    (tmp_path / "sweep.yaml").write_text(f"base: run.yaml\n{QUEUE}grid:\n{grid}")
    return tmp_path / "sweep.yaml"


def _env(url: str | None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop(STORAGE_ENV, None)
    if url:
        env[STORAGE_ENV] = url
    return env


def _worker(sweep_file, sweep_dir, url, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "workbench", "sweep", str(sweep_file), "--dir", str(sweep_dir), *extra],
                            env=_env(url), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_until(cond, timeout=120.0, what="a condition"):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _no_secret_under(root: Path, secret: str) -> None:
    """No file under `root` holds the password, as text or in a pickle."""
    for path in root.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"{path} holds the storage password"


def _password(url: str) -> str:
    return re.match(r"postgresql://[^:]+:([^@]+)@", url)[1]


@pytest.mark.slow
def test_two_workers_share_a_database_queue_a_killed_one_s_run_is_done_once_by_a_joiner(tmp_path, postgres_url):
    import optuna

    sweep_file = _files(tmp_path, grid="  scoring: [taylor, layerwise, blockwise]\n  calibration.num_samples: [2, 4]\n"
                                        "  selection.ratio: [0.1, 0.2]\n")
    sweep_dir = tmp_path / "s"
    keys = {config_hash(c) for c in expand(load_sweep(sweep_file))}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(STORAGE_ENV, postgres_url)
        assert main(["sweep", str(sweep_file), "--dir", str(sweep_dir), "--join"]) == 2  # not prepared: refused
    assert prepare(load_sweep(sweep_file), sweep_dir, storage=postgres_url)["enqueued"] == len(keys) == 12
    first, second = (_worker(sweep_file, sweep_dir, postgres_url, "--join") for _ in range(2))

    def study():
        return open_study(sweep_dir, postgres_url)

    def held_by_second():
        running = study().get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        return [t for t in running if (t.user_attrs.get("worker") or {}).get("pid") == second.pid]

    _wait_until(lambda: held_by_second(), what="the second worker to take a run")
    (killed,) = held_by_second()
    second.send_signal(signal.SIGKILL)  # mid-run: no chance to tell the queue anything
    second_log = second.communicate(timeout=60)[0]
    third = _worker(sweep_file, sweep_dir, postgres_url, "--join")
    logs = [second_log] + [p.communicate(timeout=300)[0] for p in (first, third)]
    assert first.returncode == 0 and third.returncode == 0, logs

    # every run is done, each by exactly one worker (a run found complete on disk is not run again)
    done_by = [m for log in logs for m in re.findall(r"run (\w+): complete \(", log)]
    assert sorted(done_by) == sorted(keys), logs
    trials = study().get_trials(deepcopy=False)
    complete = [t.user_attrs["run"] for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(complete) == sorted(keys)  # once each in the queue too
    assert study().get_trials(deepcopy=False)[killed.number].state == optuna.trial.TrialState.FAIL
    # the killed run was done by a worker still alive, and each record is the one its worker wrote
    statuses = {k: run_status(sweep_dir / "runs" / k) for k in keys}
    assert all(s["status"] == "complete" for s in statuses.values())
    assert statuses[killed.user_attrs["run"]]["pid"] in (first.pid, third.pid)
    for k, s in statuses.items():
        worker = {first.pid: logs[1], third.pid: logs[2], second.pid: logs[0]}[s["pid"]]
        assert f"run {k}: complete (" in worker
    assert main(["consolidate", str(sweep_dir)]) == 0
    import pandas as pd
    table = pd.read_csv(sweep_dir / "consolidated.csv")
    assert sorted(table.key) == sorted(keys) and (table.status == "complete").all() and (table.ppl > 1).all()
    # the password is in no file the sweep wrote, nor in what the workers printed
    _no_secret_under(tmp_path, _password(postgres_url))
    assert not any(_password(postgres_url) in log for log in logs)
    assert json.loads((sweep_dir / "queue.json").read_text())["storage"] == masked(postgres_url)


@pytest.mark.slow
def test_another_host_s_worker_is_taken_for_dead_only_when_its_heartbeat_stops_and_requeued_once(tmp_path, postgres_url):
    import optuna

    sweep = load_sweep(_files(tmp_path, grid="  calibration.num_samples: [2, 4]\n"))
    sweep_dir = tmp_path / "s"
    assert prepare(sweep, sweep_dir, storage=postgres_url)["enqueued"] == 2
    a, b = open_study(sweep_dir, postgres_url, heartbeat_s=1, stale_after_s=3), open_study(sweep_dir, postgres_url)
    trial = take(a)  # then claimed by "another machine"
    trial.set_user_attr("worker", dict(host="another-machine", pid=1))
    key = trial.user_attrs["run"]
    a._storage.record_heartbeat(trial._trial_id)
    assert reclaim(a) == 0 and reclaim(b) == 0  # its heartbeat is fresh: alive, wherever it runs
    queue = queue_status(sweep_dir, postgres_url)
    assert list(queue.state) == ["running", "waiting"] and queue.host[0] == "another-machine" and queue.alive[0]
    time.sleep(4)  # no beat for longer than stale_after_s
    assert reclaim(a) + reclaim(b) == 1  # one of them fails it ...
    waiting = [t.user_attrs["run"] for t in b.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))]
    assert sorted(waiting).count(key) == 1 and len(waiting) == 2  # ... and its run is queued again, once
    assert b.get_trials(deepcopy=False)[trial.number].state == optuna.trial.TrialState.FAIL


def test_a_password_on_the_command_line_is_refused_and_never_echoed(tmp_path, capsys, postgres_server):
    sweep_file = _files(tmp_path, grid="  calibration.num_samples: [2]\n")
    url = postgres_server.url()
    assert main(["sweep", str(sweep_file), "--dir", str(tmp_path / "s"), "--storage", url]) == 2
    err = capsys.readouterr().err
    assert postgres_server.password not in err and masked(url) in err and STORAGE_ENV in err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("bad, match", [
    ("port", r"cannot open the sweep queue at postgresql://workbench:\*\*\*@127\.0\.0\.1:1/postgres: .*refused"),
    ("password", r"cannot open the sweep queue at .*:\*\*\*@.*password authentication failed for user \"workbench\""),
    ("scheme", r"cannot open the sweep queue at postgres://workbench:\*\*\*@.*Can't load plugin"),
])
def test_a_wrong_or_unreachable_storage_is_one_line_before_anything_is_queued(tmp_path, capsys, monkeypatch,
                                                                              postgres_server, bad, match):
    sweep_file = _files(tmp_path, grid="  calibration.num_samples: [2]\n")
    url = {"port": postgres_server.url().replace(f":{postgres_server.port}/", ":1/"),
           "password": postgres_server.url().replace(postgres_server.password, "not-the-password"),
           "scheme": postgres_server.url().replace("postgresql://", "postgres://")}[bad]
    monkeypatch.setenv(STORAGE_ENV, url)
    assert main(["sweep", str(sweep_file), "--dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(match, err), err
    assert postgres_server.password not in err and "not-the-password" not in err
    assert not (tmp_path / "s").exists()  # nothing made, nothing queued


def test_a_folder_queued_in_one_storage_is_not_prepared_again_in_another(tmp_path, postgres_url, postgres_server):
    sweep = load_sweep(_files(tmp_path, grid="  calibration.num_samples: [2]\n"))
    prepare(sweep, tmp_path / "s", storage=postgres_url)
    other = postgres_server.url("postgres")
    with pytest.raises(ConfigError, match=r"is queued in postgresql://workbench:\*\*\*@.*/sweep_\w+, not .*/postgres"):
        prepare(sweep, tmp_path / "s", storage=other)
    with pytest.raises(ConfigError, match="holds no sweep"):  # a joiner pointed at the wrong database
        open_study(tmp_path / "s", other)


def test_the_slurm_array_asks_for_what_was_given_and_carries_no_password(tmp_path, postgres_url, monkeypatch):
    """The script submitit hands to `sbatch` (a stand-in that keeps it and answers with a job id)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ncp \"$1\" {tmp_path}/submitted.sh\necho 'Submitted batch job 4242'\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit looks for it to know it is on a cluster
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv(STORAGE_ENV, postgres_url)
    sweep_file = _files(tmp_path, grid="  calibration.num_samples: [2, 4, 6]\n")
    sweep_dir = tmp_path / "s"
    assert main(["launch", str(sweep_file), "--dir", str(sweep_dir), "--workers", "3", "--partition", "gpu",
                 "--hours", "12", "--setup", "source ~/wb/bin/activate"]) == 0
    script = (tmp_path / "submitted.sh").read_text()
    for line in ("#SBATCH --array=0-2%3", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --time=720", "source ~/wb/bin/activate"):
        assert line in script, (line, script)
    assert os.environ[STORAGE_ENV] == postgres_url  # the jobs inherit it from the submitting shell
    _no_secret_under(tmp_path, _password(postgres_url))
    assert len(open_study(sweep_dir, postgres_url).get_trials(deepcopy=False)) == 3  # prepared before submitting


def test_bad_launch_settings_are_named(tmp_path, capsys):
    sweep_file = _files(tmp_path, grid="  calibration.num_samples: [2]\n")
    assert main(["launch", str(sweep_file), "--dir", str(tmp_path / "s"), "--workers", "0"]) == 2
    assert "workers=0 must be a positive integer" in capsys.readouterr().err
    assert main(["launch", str(sweep_file), "--dir", str(tmp_path / "s"), "--workers", "2", "--hours", "0"]) == 2
    assert "hours=0.0 must be a number of hours in (0, 720]" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_the_readme_s_cluster_commands_run_a_job_array_of_workers_to_the_end(tmp_path, postgres_url, monkeypatch):
    """The README's three login-node commands, run as written with `--executor local --wait` (submitit's local
    executor: the same job array as on Slurm, as processes here), this machine's paths and the test server."""
    text = README.read_text()
    block = re.search(r"<!-- cluster-commands -->\n```bash\n(.*?)```", text, re.S)[1]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert [c.split()[0] for c in commands] == ["export", "workbench", "workbench"]
    assert commands[0].startswith(f"export {STORAGE_ENV}=postgresql://")
    sweep_file = _files(tmp_path, grid="  calibration.num_samples: [2, 4]\n  selection.ratio: [0.1, 0.2]\n")
    launch_args = commands[1].split()[1:]
    assert launch_args[0] == "launch" and "--dir" in launch_args and "--workers" in launch_args
    assert Path(README.parent / launch_args[1]).is_file()  # the README names a shipped sweep file
    shared = launch_args[launch_args.index("--dir") + 1]
    assert commands[2].split()[1:] == ["consolidate", shared]
    sweep_dir = tmp_path / "shared" / "sweep"
    launch_args = [str(sweep_file) if a.endswith(".yaml") else str(sweep_dir) if a == shared else a for a in launch_args]
    launch_args[launch_args.index("--workers") + 1] = "2"
    for k, v in _env(postgres_url).items():
        monkeypatch.setenv(k, v)
    assert main(launch_args + ["--executor", "local", "--gpus-per-worker", "0", "--cpus-per-worker", "1",
                               "--wait"]) == 0
    assert main(["consolidate", str(sweep_dir)]) == 0
    import pandas as pd
    table = pd.read_csv(sweep_dir / "consolidated.csv")
    assert len(table) == 4 and (table.status == "complete").all()
    logs = [p.read_text() for p in (sweep_dir / "jobs").rglob("*_log.out")]
    assert len(logs) == 2  # one log per job of the array
    assert sorted(re.findall(r"run (\w+): complete \(", "".join(logs))) == sorted(table.key)  # each run once
    _no_secret_under(tmp_path, _password(postgres_url))
