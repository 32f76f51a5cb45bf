"""Every numbered notebook is a jupytext pair in sync, committed clean, and runs end to end on a tiny model."""
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every notebook end to end: `make test`, not `make test-fast`

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
SMOKE_PARAMS = {
    "00_quickstart": dict(SMOKE=True, SEQ_LEN=32, EVAL_WINDOWS=4),
    "01_gradient_diagnosis": dict(SMOKE=True, NUM_SAMPLES=8, SEQ_LEN=32),
    "02_outliers_and_distributions": dict(SMOKE=True, NUM_SAMPLES=8, SEQ_LEN=32, EVAL_WINDOWS=4),
    "03_normalization_choices": dict(SMOKE=True, NUM_SAMPLES=8, SEQ_LEN=32, EVAL_WINDOWS=4, BLOCK_LOSS_SAMPLES=4),
    "04_global_pruning": dict(SMOKE=True, NUM_SAMPLES=8, SEQ_LEN=32, EVAL_WINDOWS=4),
    "05_finetuning": dict(SMOKE=True, NUM_SAMPLES=8, MAX_STEPS=4, SEQ_LEN=32, BATCH_SIZE=2, GRAD_ACCUM=1,
                          EVAL_EVERY=2, EVAL_WINDOWS=4, LR=1e-3),
    "06_evaluation": dict(SMOKE=True, LIMIT=8, EVAL_WINDOWS=4, PROMPT_LEN=16, NEW_TOKENS=4),
    "07_layerwise_and_baselines": dict(SMOKE=True, NUM_SAMPLES=8, SEQ_LEN=32, LAYER_SAMPLES=4, HELD_OUT=4,
                                       EVAL_WINDOWS=4, RATIO=0.1, OUT_OF_DOMAIN=["../README.md"], CV_FOLDS=2),
    "08_sweeps": dict(SMOKE=True),
}


def _prepare_06(experiments):
    """06 evaluates the models of 04 and 05: put tiny ones (of the SMOKE model) where they would be."""
    from workbench.core.arch import layer_widths
    from workbench.core.experiments import Experiment
    from workbench.core.testing import byte_tokenizer, tiny_model
    from workbench.plans.plan import random_plan
    from workbench.surgery.checkpoints import save_pruned
    from workbench.surgery.prune import apply_plan

    for name, seed in [("nb04-global-pruning", 0), ("nb05-finetuning", 1)]:
        model = tiny_model("llama", n_layers=4)
        plan = random_plan(layer_widths(model), 0.3, seed=seed, empty_blocks=1)
        apply_plan(model, plan)
        save_pruned(model, Experiment.create(name, base=experiments).model_dir, tokenizer=byte_tokenizer(), plan=plan)


PREPARE = {"06_evaluation": _prepare_06}


def test_every_notebook_has_smoke_parameters():
    assert {p.stem for p in NOTEBOOKS} == set(SMOKE_PARAMS)


def test_every_notebook_is_a_jupytext_pair():
    assert {p.stem for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.py")} == {p.stem for p in NOTEBOOKS}


def _cells(nb):
    return [(c["cell_type"], c["source"].strip(), tuple(c["metadata"].get("tags", []))) for c in nb["cells"]]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_pair_is_in_sync(path):
    """The .py (what reviewers diff) and the .ipynb (what JupyterLab opens) hold the same cells."""
    import jupytext
    import nbformat

    text = jupytext.read(path.with_suffix(".py"))
    ipynb = nbformat.read(path, as_version=4)
    assert ipynb.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent", "pairing metadata is missing"
    assert _cells(text) == _cells(ipynb), f"{path.name} and {path.with_suffix('.py').name} differ: run " \
        f"`jupytext --sync notebooks/{path.stem}.py`"


def test_drift_is_detected(tmp_path):
    """The sync check fails on a changed cell (guards the guard)."""
    import jupytext
    import nbformat

    src = NOTEBOOKS[0]
    nb = nbformat.read(src, as_version=4)
    nb.cells[-1].source += "\n# edited in JupyterLab only"
    assert _cells(jupytext.read(src.with_suffix(".py"))) != _cells(nb)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_clean(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert "parameters" in code[0]["metadata"].get("tags", []), "first code cell must be the parameters cell"
    assert all(not c["outputs"] and c["execution_count"] is None for c in code)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path, monkeypatch):
    import papermill as pm

    monkeypatch.setenv("WORKBENCH_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("WORKBENCH_EXPERIMENTS", str(tmp_path / "experiments"))
    monkeypatch.setenv("WORKBENCH_DATA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    if path.stem in PREPARE:
        PREPARE[path.stem](tmp_path / "experiments")
    out = tmp_path / path.name
    pm.execute_notebook(str(path), str(out), parameters=SMOKE_PARAMS[path.stem], kernel_name="python3",
                        cwd=str(path.parent), progress_bar=False)
    assert list((tmp_path / "figures").glob("*.pdf")) and list((tmp_path / "figures").glob("*.png"))


def test_timed_prints_one_line_per_step(capsys):
    from workbench.lab import notebook
    with notebook.timed("importance pass"):
        pass
    model, _ = notebook.load(smoke=True)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("importance pass: ") and out[0].endswith(" s") and out[1].startswith("model loaded: ")
