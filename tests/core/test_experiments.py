import json
import math

import pandas as pd
import pytest

from workbench.core.experiments import Experiment
from workbench.core.paths import write_atomic


def test_layout_and_round_trip(tmp_path):
    exp = Experiment.create("run-1", {"ratio": 0.2, "inf": math.inf}, base=tmp_path)
    for sub in ("analysis", "evaluation", "figures", "model"):
        assert (exp.root / sub).is_dir()
    assert exp.read_json("config.json") == {"ratio": 0.2, "inf": "inf"}
    df = pd.DataFrame({"layer": [0, 1], "score": [0.5, 0.25]})
    exp.write_table("analysis/table.csv", df)
    pd.testing.assert_frame_equal(exp.read_table("analysis/table.csv"), df)


def test_bad_names_and_paths_are_refused(tmp_path):
    with pytest.raises(ValueError, match="'../x'"):
        Experiment.create("../x", base=tmp_path)
    exp = Experiment.create("ok", base=tmp_path)
    with pytest.raises(ValueError, match="'notes/x.json' is outside the layout"):
        exp.write_json("notes/x.json", {})
    with pytest.raises(FileExistsError):
        Experiment.create("ok", base=tmp_path)


def test_interrupted_write_leaves_old_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "evaluation" / "r.json"
    write_atomic(path, json.dumps({"ppl": 10.0}))

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, json.dumps({"ppl": 99.0}))
    assert json.loads(path.read_text()) == {"ppl": 10.0}


@pytest.mark.slow
def test_pipeline_on_tiny_model(tmp_path, tokenizer):
    from workbench.core.testing import tiny_model
    from workbench.data.text import CalibrationConfig
    from workbench.plans.selection import SelectionConfig
    from workbench.runs.pipeline import PruneRunConfig, run_pruning

    model = tiny_model("llama", n_layers=3)
    exp = Experiment.create("tiny", base=tmp_path)
    cfg = PruneRunConfig(calibration=CalibrationConfig(num_samples=4, seq_len=32, batch_size=2),
                         selection=SelectionConfig(ratio=0.2), eval_seq_len=32, eval_windows=4)
    rec = run_pruning(model, tokenizer, cfg, exp, log=lambda *_: None, progress=False)
    assert rec["reload_max_abs_diff"] == 0.0
    assert exp.read_json("evaluation/perplexity.json")["pruned"]["windows"] == 4
    assert exp.read_json("config.json")["run"]["selection"]["ratio"] == 0.2
    assert len(exp.read_table("analysis/importance_table.csv")) == 3 * (2 + 96)
    assert (exp.figures / "kept_fraction_per_layer.pdf").stat().st_size > 0
    assert (exp.model_dir / "model.safetensors").exists()
    diag = exp.read_json("analysis/gradient_diagnosis.json")
    assert diag["method"] == "taylor" and len(diag["per_block"]) == 6 and diag["recommendation"]["rule"]
    assert diag["plan_settings"]["ratio"] == 0.2


@pytest.mark.slow
def test_other_texts_are_measured_on_the_pruned_model_before_recovery_and_after(tmp_path, tokenizer):
    from workbench.core.testing import tiny_model
    from workbench.data.text import CalibrationConfig
    from workbench.evaluation.evaluate import perplexity_after
    from workbench.plans.plan import Plan
    from workbench.plans.selection import SelectionConfig
    from workbench.recovery.finetune import FinetuneConfig
    from workbench.runs.pipeline import PruneRunConfig, run_pruning

    text = tmp_path / "other.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: another text, far from the calibration's." * 3 for i in range(40)))
    exp = Experiment.create("recovered", base=tmp_path)
    cfg = PruneRunConfig(calibration=CalibrationConfig(num_samples=4, seq_len=32, batch_size=2),
                         selection=SelectionConfig(ratio=0.2), eval_seq_len=32, eval_windows=4,
                         extra_eval_sources=(str(text),), save_model=False,
                         finetune=FinetuneConfig(max_steps=3, seq_len=32, batch_size=2, warmup_steps=0, lr=1e-2))
    rec = run_pruning(tiny_model("llama", n_layers=3), tokenizer, cfg, exp, log=lambda *_: None, progress=False)
    other = rec["extra_sources"][str(text)]
    # the pruned model's figure is the plan applied to the dense model, before any fine-tuning
    again = perplexity_after(tiny_model("llama", n_layers=3), tokenizer, Plan.from_dict(rec["plan"]), str(text),
                             seq_len=32, max_windows=4, progress=False)
    assert other["pruned"]["ppl"] == pytest.approx(again.ppl, rel=1e-6)
    assert len({other["dense"]["ppl"], other["pruned"]["ppl"], other["final"]["ppl"]}) == 3


def test_a_symlink_that_leads_out_is_named_as_a_symlink(tmp_path):
    from workbench.core.paths import confined
    (tmp_path / "root").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "root" / "exp").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(ValueError, match=r"'exp' under .* is \(or lies under\) a symbolic link to .*elsewhere"):
        confined(tmp_path / "root", "exp")
    with pytest.raises(ValueError, match=r"leaves its folder"):
        confined(tmp_path / "root", "../elsewhere")
    (tmp_path / "root" / "inside").symlink_to(tmp_path / "root" / "exp", target_is_directory=True)
    (tmp_path / "root" / "real").mkdir()
    (tmp_path / "root" / "alias").symlink_to(tmp_path / "root" / "real", target_is_directory=True)
    assert confined(tmp_path / "root", "alias") == tmp_path / "root" / "alias"  # links inside the root are followed
