"""Run files, the command line, resumable sweeps over workers, and consolidation (tiny random models)."""
import json
import math
import os
import platform
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from workbench.data.text import CalibrationConfig
from workbench.plans.normalize import PRESETS, ScoringConfig
from workbench.plans.selection import SelectionConfig
from workbench.recovery.finetune import FinetuneConfig
from workbench.runs.cli import main
from workbench.runs.config import ConfigError, RunConfig, config_hash, from_dict, load_run_config, save_config, to_dict
from workbench.runs.consolidate import best, consolidate, correlations
from workbench.runs.sweep import expand, load_sweep, prepare, run_status, run_sweep, work
from workbench.surgery.reconstruct import ReconstructConfig

RUN = """\
model: {name: tiny}
calibration: {num_samples: 4, seq_len: 32, batch_size: 2}
selection: {ratio: 0.2}
eval_windows: 4
eval_seq_len: 32
save_model: false
"""


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _files(tmp_path, grid="  scoring: [taylor, layerwise, blockwise]\n  calibration.num_samples: [2, 4]\n"):
    (tmp_path / "run.yaml").write_text(RUN)
    (tmp_path / "sweep.yaml").write_text(f"base: run.yaml\ngrid:\n{grid}")
    return tmp_path / "run.yaml", tmp_path / "sweep.yaml"


def test_run_config_round_trips_through_yaml(tmp_path):
    cfg = RunConfig(scoring=ScoringConfig(method="taylor2", normalization="log", level="block", tau=0.01),
                    calibration=CalibrationConfig(num_samples=8, seq_len=16, fisher="sequence"),
                    selection=SelectionConfig(ratio=0.3, attn_mlp=(2.0, 8.0)),
                    reconstruction=ReconstructConfig(mode="sequential", damping=1e-3),
                    finetune=FinetuneConfig(max_steps=3, warmup_steps=1, target_modules=("q_proj", "v_proj")),
                    baseline="layerwise", baseline_params={"strategy": "inverse", "alpha": 2.0}, eval_windows=None)
    save_config(cfg, tmp_path / "r.yaml")
    again = load_run_config(tmp_path / "r.yaml")
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert to_dict(again)["selection"]["attn_mlp"] == [2.0, 8.0]
    # overrides with dotted keys; a changed setting changes the key
    changed = load_run_config(tmp_path / "r.yaml", ["selection.ratio=0.25", "reconstruction=null"])
    assert changed.selection.ratio == 0.25 and changed.reconstruction is None
    assert config_hash(changed) != config_hash(cfg)


@pytest.mark.parametrize("text, match", [
    ("selection: {ratoi: 0.2}", r"unknown key 'selection.ratoi'; did you mean 'ratio'"),
    ("scoring: {method: taylor, normalisation: log}", r"'scoring.normalisation'.*'normalization'"),
    ("selection: {ratio: high}", r"selection.ratio: 'high' must be a number"),
    ("selection: {ratio: 1.5}", r"selection: ratio=1.5 must be in \[0, 1\)"),
    ("calibration: {num_samples: 2.5}", r"calibration.num_samples: 2.5 must be an integer"),
    ("save_model: 3", r"save_model: 3 must be true or false"),
    ("baseline: magic", r"baseline='magic' is not registered"),
    ("selection: {ratio: [0.2", r"not valid YAML"),
    ("- a\n- b", r"top level must be a mapping"),
])
def test_bad_run_files_name_the_key(tmp_path, text, match):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_run_config(tmp_path / "bad.yaml")


def test_bad_files_and_overrides_exit_2_and_write_nothing(tmp_path, capsys):
    run, sweep = _files(tmp_path)
    assert main(["run", str(run), "selection.rato=0.3", "--name", "x"]) == 2
    assert "did you mean 'ratio'" in capsys.readouterr().err
    (tmp_path / "empty.yaml").write_text("base: run.yaml\ngrid: {}\n")
    assert main(["sweep", str(tmp_path / "empty.yaml"), "--dir", str(tmp_path / "s")]) == 2
    assert "grid is empty" in capsys.readouterr().err
    (tmp_path / "bad_point.yaml").write_text("base: run.yaml\ngrid:\n  selection.ratio: [0.2, 2.0]\n")
    assert main(["sweep", str(tmp_path / "bad_point.yaml"), "--dir", str(tmp_path / "s")]) == 2
    assert "grid point {'selection.ratio': 2.0}" in capsys.readouterr().err
    (tmp_path / "preset.yaml").write_text("base: run.yaml\ngrid:\n  scoring: [taylr]\n")
    assert main(["sweep", str(tmp_path / "preset.yaml"), "--dir", str(tmp_path / "s")]) == 2
    assert "presets" in capsys.readouterr().err
    assert not (tmp_path / "s").exists() and not (tmp_path / "experiments").exists()


def test_grid_expands_in_file_order_with_presets(tmp_path):
    _, sweep = _files(tmp_path)
    runs = expand(load_sweep(sweep))
    assert len(runs) == 6 and len({config_hash(r) for r in runs}) == 6
    assert [r.scoring for r in runs[::2]] == [PRESETS["taylor"], PRESETS["layerwise"], PRESETS["blockwise"]]
    assert [r.calibration.num_samples for r in runs[:2]] == [2, 4]


@pytest.mark.slow
def test_cli_run_writes_one_experiment_with_its_resolved_config(tmp_path):
    run, _ = _files(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: pruning removes units and keeps the rest of the model." * 3
                                 for i in range(40)))
    assert main(["run", str(run), "selection.ratio=0.3", f"extra_eval_sources=[{text}]", "--name", "one",
                 "--quiet"]) == 0
    root = tmp_path / "experiments" / "one"
    cfg = load_run_config(root / "run.yaml")
    assert cfg.selection.ratio == 0.3 and cfg.model.name == "tiny" and cfg.extra_eval_sources == (str(text),)
    rec = json.loads((root / "evaluation" / "perplexity.json").read_text())
    # the knapsack stops at the first unit that reaches the budget: it may pass it by at most one unit,
    # here one GQA group (6,144 of the tiny model's 129,840 parameters, 4.7 %)
    assert 0.3 <= rec["report"]["ratio_total"] < 0.3 + 6144 / 129840
    other = rec["extra_sources"][str(text)]
    assert other["dense"]["source"] != rec["dense"]["source"] and other["final"]["ppl"] > 1
    assert other["pruned"] == other["final"]  # no fine-tuning: the final model is the pruned one, measured once


@pytest.mark.slow
def test_sweep_resumes_only_what_is_left_after_a_kill(tmp_path):

    from workbench.runs.queue import open_study
    _, sweep_file = _files(tmp_path)
    sweep_dir = tmp_path / "s"
    sweep = load_sweep(sweep_file)
    assert prepare(sweep, sweep_dir)["enqueued"] == 6
    assert work(sweep, sweep_dir, max_runs=3, log=lambda *_: None) == 3
    # the worker is "killed" in the middle of its fourth run: its trial stays RUNNING, held by a process that is
    # gone, and a staging folder is left
    trial = open_study(sweep_dir).ask()
    trial.set_user_attr("worker", dict(host=platform.node(), pid=_dead_pid()))
    (sweep_dir / "runs" / ".abc.staging-x").mkdir()
    first = {p.name: (p / "status.json").read_text() for p in (sweep_dir / "runs").iterdir() if not p.name.startswith(".")}
    assert len(first) == 3
    counts = run_sweep(sweep_file, sweep_dir, log=lambda *_: None)
    assert counts == dict(stale=1, live=0, enqueued=1, complete=3)  # the abandoned run is queued again; 2 still wait
    done = {p.name: (p / "status.json").read_text() for p in (sweep_dir / "runs").iterdir() if not p.name.startswith(".")}
    assert len(done) == 6 and all(done[k] == v for k, v in first.items())  # the first three were not rerun
    assert all(json.loads(v)["status"] == "complete" for v in done.values())
    # nothing is left to do
    assert run_sweep(sweep_file, sweep_dir, log=lambda *_: None) == dict(stale=0, live=0, enqueued=0, complete=6)


@pytest.mark.slow
def test_two_worker_processes_run_every_run_exactly_once(tmp_path):
    import optuna

    from workbench.runs.queue import open_study
    _, sweep_file = _files(tmp_path)
    sweep_dir = tmp_path / "s"
    run_sweep(sweep_file, sweep_dir, workers=2, log=lambda *_: None)
    statuses = [run_status(p) for p in (sweep_dir / "runs").iterdir() if not p.name.startswith(".")]
    assert len(statuses) == 6 and all(s["status"] == "complete" for s in statuses)
    study = open_study(sweep_dir)
    ran = [t.user_attrs["run"] for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))]
    assert sorted(ran) == sorted(s["key"] for s in statuses)  # each run once
    assert len({s["pid"] for s in statuses}) == 2  # both workers took runs


@pytest.mark.slow
def test_a_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    _, sweep_file = _files(tmp_path, grid="  eval_source: [pydoc, missing.txt]\n")
    sweep_dir = tmp_path / "s"
    assert main(["sweep", str(sweep_file), "--dir", str(sweep_dir)]) == 1  # 1: a run failed
    table = pd.read_csv(sweep_dir / "consolidated.csv")
    assert sorted(table.status) == ["complete", "failed"]
    failed = table[table.status == "failed"].iloc[0]
    assert "missing.txt" in failed.error and math.isnan(failed.ppl)
    assert "Traceback" in run_status(failed.output_dir)["traceback"]
    ok = table[table.status == "complete"].iloc[0]
    assert ok.ppl > 1 and ok.method == "taylor" and ok["cfg.selection.ratio"] == 0.2
    assert abs(ok.pruning_ratio_total - 0.2) < 0.02 and ok.grad_mean_ratio >= 1
    assert pd.read_parquet(sweep_dir / "consolidated.parquet").shape[0] == 2
    out = best(sweep_dir)
    assert out["models"]["tiny_0.2"]["best"] == ok.key
    cmp = json.loads((sweep_dir / "best" / "tiny_0.2" / "method_comparison.json").read_text())
    assert cmp["taylor"]["count"] == 1
    assert (sweep_dir / "best" / "tiny_0.2" / "run").resolve() == (sweep_dir / "runs" / ok.key).resolve()
    best(sweep_dir)  # again: the link is replaced
    assert (sweep_dir / "report.txt").read_text().startswith(f"sweep {sweep_dir}: 2 runs, 1 complete, 1 failed")


@pytest.mark.slow
def test_search_runs_its_trials(tmp_path):
    (tmp_path / "run.yaml").write_text(RUN)
    (tmp_path / "search.yaml").write_text(
        "base: run.yaml\nsearch: {trials: 3, sampler: random, seed: 1, params: "
        "{selection.ratio: {low: 0.1, high: 0.3}, scoring.normalization: {choices: [none, minmax]}}}\n")
    sweep_dir = tmp_path / "s"
    run_sweep(tmp_path / "search.yaml", sweep_dir, log=lambda *_: None)
    table = consolidate(sweep_dir)
    assert len(table) == 3 and (table.status == "complete").all()
    assert table["cfg.selection.ratio"].between(0.1, 0.3).all()


def test_correlations_match_a_direct_computation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=12)
    table = pd.DataFrame(dict(status=["complete"] * 11 + ["failed"], grad_mean_ratio=x,
                              acc_mean=0.7 * x + rng.normal(scale=0.5, size=12), ppl=rng.normal(size=12)))
    corr = correlations(table).set_index(["x", "y"])
    r = np.corrcoef(x[:11], table.acc_mean[:11])[0, 1]
    t = r * math.sqrt(9 / (1 - r * r))
    p = 2 * stats.t.sf(abs(t), df=9)
    row = corr.loc[("grad_mean_ratio", "acc_mean")]
    assert row.n == 11 and row.pearson_r == pytest.approx(r) and row.pearson_p == pytest.approx(p)
    assert ("extreme_pruning_layers", "acc_mean") not in corr.index  # absent columns are left out


def test_run_from_dict_defaults_and_unknown_section():
    assert from_dict(RunConfig, {}) == RunConfig()
    with pytest.raises(ConfigError, match="unknown key 'evaluation'"):
        from_dict(RunConfig, {"evaluation": {}})


def test_shipped_configs_are_valid():
    from workbench.core.paths import REPO_ROOT
    configs = REPO_ROOT / "configs"
    assert load_run_config(configs / "demo.yaml") == RunConfig(save_model=True, calibration=CalibrationConfig(
        num_samples=64, seq_len=128))
    big = load_run_config(configs / "llama3-8b-25.yaml")
    assert big.model.dtype == "bfloat16" and big.selection.ratio == 0.25 and big.finetune.method == "lora"
    small = expand(load_sweep(configs / "smollm2-small-matrix.yaml"))
    assert len(small) == 12 and {r.model.name for r in small} == {"default"}
    study = load_sweep(configs / "study-matrix.yaml")
    assert len(expand(study)) == 135 and study.objective == "acc_mean" and study.direction == "maximize"
    # every other shipped sweep expands to valid runs that measure out of the calibration domain too
    for name, n in [("normalization", 7), ("lora-recovery", 2), ("out-of-domain", 8)]:
        runs = expand(load_sweep(configs / f"{name}.yaml"))
        assert len(runs) == n and all(r.extra_eval_sources == ("jargon",) for r in runs), name
    lora = expand(load_sweep(configs / "lora-recovery.yaml"))
    assert {r.selection.ratio for r in lora} == {0.0, 0.2} and all(r.finetune.lora_r == 8 for r in lora)


@pytest.mark.slow
def test_a_run_with_a_baseline_uses_its_plan_and_compensation(tmp_path):
    from workbench.core.experiments import Experiment
    from workbench.core.testing import byte_tokenizer, tiny_model
    from workbench.runs.pipeline import PruneRunConfig, run_pruning
    cfg = PruneRunConfig(baseline="flap", calibration=CalibrationConfig(num_samples=4, seq_len=32, batch_size=2),
                         selection=SelectionConfig(ratio=0.25), eval_windows=2, eval_seq_len=32)
    with pytest.raises(ValueError, match="baseline='flapp' is not registered"):
        PruneRunConfig(baseline="flapp")
    with pytest.raises(ValueError, match="without a baseline"):
        PruneRunConfig(baseline_params={"alpha": 1})
    exp = Experiment.create("flap")
    rec = run_pruning(tiny_model("qwen2", n_layers=3), byte_tokenizer(), cfg, exp, log=lambda *_: None,
                      progress=False)
    assert rec["plan"]["settings"]["baseline"] == "flap"
    saved = json.loads((exp.model_dir / "config.json").read_text())
    # FLAP's bias compensation was applied and saved
    assert any(lc.get("attn_out_bias") or lc.get("mlp_out_bias") for lc in saved["pruned_layers"])
    assert rec["reload_max_abs_diff"] < 1e-4


# ---------------------------------------------------------------------------------------------- bad sweeps


def test_a_preset_axis_after_its_sub_keys_keeps_them(tmp_path):
    """`scoring: [preset, …]` after `scoring.*` axes used to replace them: a 3 × 2 grid ran 2 runs."""
    _, sweep = _files(tmp_path, grid="  scoring.clip_high: [95.0, 99.0, 100.0]\n  scoring: [taylor, blockwise]\n")
    runs = expand(load_sweep(sweep))
    assert len(runs) == 6 and len({config_hash(r) for r in runs}) == 6
    assert sorted((r.scoring.normalization, r.scoring.clip_high) for r in runs) == sorted(
        (n, c) for n in ("none", "minmax") for c in (95.0, 99.0, 100.0))


@pytest.mark.slow
def test_a_second_sweep_leaves_a_live_worker_s_run_alone(tmp_path):
    import optuna

    from workbench.runs.queue import open_study
    _, sweep_file = _files(tmp_path, grid="  calibration.num_samples: [2, 4]\n")
    sweep_dir = tmp_path / "s"
    assert run_sweep(sweep_file, sweep_dir, log=lambda *_: None)["enqueued"] == 2
    # a live worker (this process) holds a trial of a third point
    _, bigger = _files(tmp_path, grid="  calibration.num_samples: [2, 4, 6]\n")
    study = open_study(sweep_dir)
    counts = prepare(load_sweep(bigger), sweep_dir)
    assert counts == dict(stale=0, live=0, enqueued=1, complete=2)
    trial = study.ask()
    trial.set_user_attr("worker", dict(host=platform.node(), pid=os.getpid()))
    trial.set_user_attr("run", study.get_trials()[-1].user_attrs["run"])
    # a second invocation without --join: the live trial is neither failed nor queued again
    assert prepare(load_sweep(bigger), sweep_dir) == dict(stale=0, live=1, enqueued=0, complete=2)
    assert study.get_trials()[-1].state == optuna.trial.TrialState.RUNNING


@pytest.mark.slow
def test_a_reclaimed_trial_does_not_crash_its_worker_nor_overwrite_a_record(tmp_path):
    import optuna

    from workbench.runs.queue import open_study
    from workbench.runs.sweep import _tell
    _, sweep_file = _files(tmp_path, grid="  calibration.num_samples: [2]\n")
    sweep_dir = tmp_path / "s"
    run_sweep(sweep_file, sweep_dir, log=lambda *_: None)
    study = open_study(sweep_dir)
    study.enqueue_trial({}, user_attrs=dict(run="x"))
    trial = study.ask()
    study.tell(trial.number, state=optuna.trial.TrialState.FAIL)  # another invocation took it for dead
    _tell(study, trial, dict(status="complete", objective_values=dict(ppl=3.0)), "ppl")  # no "Cannot tell"
    (key,) = [p.name for p in (sweep_dir / "runs").iterdir() if not p.name.startswith(".")]
    before = (sweep_dir / "runs" / key / "status.json").read_text()
    from workbench.runs.sweep import run_one
    cfg = expand(load_sweep(sweep_file))[0]
    assert run_one(cfg, sweep_dir / "runs", log=lambda *_: None)["status"] == "complete"
    assert (sweep_dir / "runs" / key / "status.json").read_text() == before


@pytest.mark.parametrize("params, match", [
    ("{selection.ratoi: {low: 0.1, high: 0.3}}", r"search point .*unknown key 'selection.ratoi'"),
    ("{selection.ratio: {low: 0.3, high: 0.1}}", r"low=0.3 is above high=0.1"),
    ("{selection.ratio: {low: 0.1, high: 0.3, log: true, step: 0.1}}", r"log range needs low > 0 and no step"),
    ("{selection.ratio: {low: 0.1, high: 0.3, lo: 1}}", r"must be \{low, high"),
    ("{selection.ratio: {low: 0.1, high: 1.5}}", r"search point .*ratio=1.5 must be in"),
    ("{scoring.normalization: {choices: []}}", r"choices must be a non-empty list"),
    ("{scoring.normalization: {choices: [none, lgo]}}", r"search point .*lgo"),
])
def test_a_bad_search_space_is_refused_before_anything_is_queued(tmp_path, capsys, params, match):
    (tmp_path / "run.yaml").write_text(RUN)
    (tmp_path / "search.yaml").write_text(f"base: run.yaml\nsearch: {{trials: 2, params: {params}}}\n")
    with pytest.raises(ConfigError, match=match):
        load_sweep(tmp_path / "search.yaml")
    assert main(["sweep", str(tmp_path / "search.yaml"), "--dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "s").exists()


def test_an_objective_the_runs_never_produce_is_refused(tmp_path):
    (tmp_path / "run.yaml").write_text(RUN)
    for body in ("search: {trials: 2, params: {selection.ratio: {low: 0.1, high: 0.3}}}",
                 "grid: {selection.ratio: [0.1, 0.2]}"):
        (tmp_path / "s.yaml").write_text(f"base: run.yaml\nobjective: acc_mean\ndirection: maximize\n{body}\n")
        with pytest.raises(ConfigError, match=r"objective 'acc_mean' is not produced .*needs zero_shot"):
            load_sweep(tmp_path / "s.yaml")


@pytest.mark.slow
def test_best_reads_the_sweep_file_s_objective_and_direction(tmp_path, capsys):
    _, sweep_file = _files(tmp_path, grid="  calibration.num_samples: [2, 4]\n")
    text = sweep_file.read_text() + "objective: ppl_dense\ndirection: maximize\n"
    sweep_file.write_text(text)
    sweep_dir = tmp_path / "s"
    run_sweep(sweep_file, sweep_dir, log=lambda *_: None)
    out = best(sweep_dir)
    assert (out["objective"], out["direction"]) == ("ppl_dense", "maximize")
    assert main(["best", str(sweep_dir)]) == 0
    assert "objective ppl_dense (maximize)" in capsys.readouterr().out
    assert best(sweep_dir, "ppl", "minimize")["objective"] == "ppl"  # an explicit choice still wins


def test_a_tiny_run_in_bfloat16_runs_in_bfloat16(tmp_path):
    from workbench.runs.sweep import ModelPool
    cfg = from_dict(RunConfig, dict(model=dict(name="tiny", dtype="bfloat16")))
    model, _ = ModelPool().get(cfg)
    assert next(model.parameters()).dtype == __import__("torch").bfloat16


def test_sequences_beyond_the_model_s_context_are_refused_before_any_work(tmp_path, capsys):
    run, _ = _files(tmp_path)
    for override, what in (("eval_seq_len=600", "eval_seq_len=600"), ("calibration.seq_len=513", "calibration.seq_len=513")):
        assert main(["run", str(run), override, "--name", "long", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"{what} is longer than the model's context of 512 tokens" in err and err.count("\n") == 1
    assert not (tmp_path / "experiments" / "long").exists()


@pytest.mark.parametrize("args, match", [
    (["--name", "a" * 300], r"has 300 characters; at most 200"),
    (["--name", "../x"], r"must be letters, digits"),
    (["model.device=banana"], r"device='banana' is not a device; allowed"),
    (["model.device=cuda:7"], r"device='cuda:7' asks for a CUDA GPU, but torch sees none"),
])
def test_bad_run_arguments_exit_2_with_one_line(tmp_path, capsys, args, match):
    pytest.importorskip("torch")
    if "cuda" in args[0] and __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    run, _ = _files(tmp_path)
    assert main(["run", str(run), *args, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert __import__("re").search(match, err), err


def test_overrides_may_follow_options(tmp_path):
    run, _ = _files(tmp_path)
    assert main(["run", str(run), "--name", "mixed", "selection.ratio=0.25", "--quiet", "eval_windows=2"]) == 0
    cfg = load_run_config(tmp_path / "experiments" / "mixed" / "run.yaml")
    assert cfg.selection.ratio == 0.25 and cfg.eval_windows == 2


@pytest.mark.slow
def test_joining_an_unprepared_folder_and_a_damaged_queue_are_named(tmp_path, capsys):
    _, sweep_file = _files(tmp_path, grid="  calibration.num_samples: [2]\n")
    assert main(["sweep", str(sweep_file), "--dir", str(tmp_path / "none"), "--join"]) == 2
    assert "is not prepared (no optuna.journal)" in capsys.readouterr().err
    sweep_dir = tmp_path / "s"
    assert main(["sweep", str(sweep_file), "--dir", str(sweep_dir)]) == 0
    capsys.readouterr()
    (sweep_dir / "optuna.journal").write_bytes(b"\x00garbage{not json\n" * 3)
    assert main(["sweep", str(sweep_file), "--dir", str(sweep_dir)]) == 2
    err = capsys.readouterr().err
    assert f"the sweep's queue {sweep_dir / 'optuna.journal'} cannot be read" in err and "rebuild it" in err
    (sweep_dir / "optuna.journal").rename(sweep_dir / "journal.bad")  # as the message says: the runs are kept
    assert run_sweep(sweep_file, sweep_dir, log=lambda *_: None) == dict(stale=0, live=0, enqueued=0, complete=1)


@pytest.mark.slow
def test_a_killed_run_s_staging_folder_is_removed_by_the_next_start(tmp_path):
    from workbench.core.paths import clean_staging, staging_dir
    _, sweep_file = _files(tmp_path, grid="  calibration.num_samples: [2]\n")
    runs = tmp_path / "s" / "runs"
    dead = staging_dir(runs, "abc")
    (dead / "model.safetensors").write_bytes(b"half a checkpoint")
    dead.rename(runs / dead.name.replace(f"-{os.getpid()}-", f"-{_dead_pid()}-"))
    mine = staging_dir(runs, "live")  # this process is alive: its folder stays
    other = runs / ".x.staging-00000000-1-abc"  # another host's: stays
    other.mkdir()
    run_sweep(sweep_file, tmp_path / "s", log=lambda *_: None)
    left = sorted(p.name for p in runs.iterdir() if p.name.startswith("."))
    assert left == sorted([mine.name, other.name])
    assert mine.stat().st_mode & 0o777 == 0o777 & ~_umask()
    assert clean_staging(runs) == []


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.slow
def test_sweep_runs_keep_their_figures_and_failed_runs_publish_none(tmp_path):
    import matplotlib.pyplot as plt

    from workbench import plots
    from workbench.core.experiments import Experiment
    from workbench.core.paths import figures_root
    _, sweep_file = _files(tmp_path, grid="  calibration.num_samples: [2, 4]\n")
    run_sweep(sweep_file, tmp_path / "s", log=lambda *_: None)
    runs = [p for p in (tmp_path / "s" / "runs").iterdir() if not p.name.startswith(".")]
    assert all(list((p / "figures").glob("*.png")) for p in runs)  # each run keeps its figures
    assert not figures_root().exists() or not list(figures_root().iterdir())  # the project's figures/ untouched
    with pytest.raises(RuntimeError, match="boom"):
        with Experiment.staged("fails") as exp:
            plots.export(plt.figure(), "half", exp, show=False)
            raise RuntimeError("boom")
    assert not figures_root().exists() or not list(figures_root().iterdir())
    with Experiment.staged("works") as exp:
        plots.export(plt.figure(), "whole", exp, show=False)
    assert sorted(p.name for p in figures_root().iterdir()) == ["works_whole.pdf", "works_whole.png"]


def test_a_field_added_later_keeps_the_keys_of_runs_at_its_default():
    """`layer_importance_samples` joined the run config after sweeps were keyed: at its default the key is the
    one the run had before; set, it is a different run."""
    import dataclasses
    import hashlib

    from workbench.runs.config import RunConfig, config_hash, to_dict

    cfg = RunConfig()
    old = {k: v for k, v in to_dict(cfg).items() if k != "layer_importance_samples"}
    before = hashlib.sha256(json.dumps(old, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]
    assert config_hash(cfg) == before
    assert config_hash(dataclasses.replace(cfg, layer_importance_samples=8)) != before
    with pytest.raises(ValueError, match="layer_importance_samples=0"):
        RunConfig(layer_importance_samples=0)


def test_cross_validation_fields_keep_the_keys_of_reconstructed_runs():
    """`reconstruction.cv_folds` / `cv_ridges` joined after runs with a reconstruction were keyed: a fixed-ridge
    run keeps its key; cross-validation, or another list of ridges, is another run."""
    import dataclasses
    import hashlib

    from workbench.runs.config import RunConfig, config_hash, to_dict
    from workbench.surgery.reconstruct import ReconstructConfig

    cfg = RunConfig(reconstruction=ReconstructConfig(damping=1e-3))
    old = to_dict(cfg)
    del old["layer_importance_samples"], old["reconstruction"]["cv_folds"], old["reconstruction"]["cv_ridges"]
    before = hashlib.sha256(json.dumps(old, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]
    assert config_hash(cfg) == before
    keys = {before, config_hash(dataclasses.replace(cfg, reconstruction=ReconstructConfig(cv_folds=4))),
            config_hash(dataclasses.replace(cfg, reconstruction=ReconstructConfig(cv_ridges=(("dense", 0.1),)))),
            config_hash(dataclasses.replace(cfg, reconstruction=None))}
    assert len(keys) == 4


@pytest.mark.parametrize("settings", [
    dict(), dict(scoring=ScoringConfig(normalization="minmax", level="block")),
    dict(scoring=ScoringConfig(temperature=0.5)), dict(baseline="layerwise"),
    dict(baseline="layerwise", baseline_params=dict(strategy="proportional")), dict(baseline="flap"),
    dict(baseline="wanda_sp"), dict(selection=SelectionConfig(ratio=0.2, layer_ratios=(0.2, 0.2, 0.2, 0.2))),
])
def test_a_run_s_label_before_the_plan_is_the_plan_s_label(settings):
    """What consolidation groups by (the label from the run config, known even for a failed run) is the label
    the run's plan carries."""
    import torch

    from workbench.core.testing import tiny_model
    from workbench.runs.pipeline import PruneRunConfig, make_run_plan
    from workbench.scoring.importance import compute_importance

    model = tiny_model("llama", n_layers=4)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    cfg = PruneRunConfig(**settings)
    _, plan, _ = make_run_plan(model, cfg, ids, compute_importance(model, ids, progress=False), progress=False)
    assert plan.provenance.label == cfg.label
