"""The prune → evaluate → save pipeline as one call, recorded in an experiment directory.

Used by the README demo and by notebooks that want the whole run; each step is also a public
function of its own module for cell-by-cell work.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field

import torch

from workbench import plots
from workbench.data import CalibrationConfig, calibration_samples
from workbench.diagnosis import diagnose
from workbench.evaluate import perplexity
from workbench.experiments import Experiment
from workbench.importance import importance_cached
from workbench.models import anatomy, model_summary
from workbench.prune import apply_plan, load_pruned, save_pruned
from workbench.selection import SelectionConfig, build_table, layer_summary, select, unit_costs


@dataclass(frozen=True)
class PruneRunConfig:
    method: str = "taylor"
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    eval_source: str = "pydoc"
    eval_seq_len: int = 128
    eval_windows: int | None = 50
    save_model: bool = True


def run_pruning(model, tokenizer, cfg: PruneRunConfig, experiment: Experiment, *, log=print,
                progress: bool = True) -> dict:
    """Importance → global selection → physical pruning → PPL before/after → save → reload check.

    Mutates `model` (it is pruned in place). Returns the evaluation record, also written to
    `evaluation/perplexity.json`.
    """
    timings: dict[str, float] = {}

    @contextlib.contextmanager
    def step(name):
        t = time.perf_counter()
        yield
        timings[name] = round(time.perf_counter() - t, 3)
        log(f"  [{name}] {timings[name]:.1f} s")

    experiment.write_json("config.json", dict(run=asdict(cfg), model=model_summary(model)))
    with step("perplexity_dense"):
        dense = perplexity(model, tokenizer, cfg.eval_source, seq_len=cfg.eval_seq_len,
                           max_windows=cfg.eval_windows, progress=progress)
    log(f"dense PPL {dense.ppl:.2f} ({dense.windows} windows × {dense.seq_len} tokens, {dense.source})")
    with step("calibration_importance"):
        samples = calibration_samples(tokenizer, cfg.calibration)
        imp = importance_cached(model, samples, batch_size=cfg.calibration.batch_size, progress=progress,
                                calibration=asdict(cfg.calibration))
    with step("selection"):
        table = build_table(imp.scores(cfg.method), unit_costs(model))
        plan = select(table, model, cfg.selection)
        summary = layer_summary(plan)
    experiment.write_table("analysis/importance_table.csv", table)
    experiment.write_table("analysis/layer_summary.csv", summary)
    diagnosis = diagnose(imp, plan, cfg.method)
    experiment.write_json("analysis/gradient_diagnosis.json", diagnosis)
    log(f"diagnosis: mean_ratio {diagnosis['mean_ratio']:.1f}, norm_ratio {diagnosis['norm_ratio']:.1f}, "
        f"{diagnosis['n_extreme']} extreme blocks; {diagnosis['recommendation']['rule']}")
    with step("prune"):
        report = apply_plan(model, plan)
    log(f"removed {report.params_before - report.params_after:,} parameters: "
        f"{report.ratio_total:.2%} of all, {report.ratio_prunable:.2%} of attention+MLP; "
        f"layers removed {report.removed_layers}, emptied blocks {report.emptied_blocks}")
    with step("perplexity_pruned"):
        pruned = perplexity(model, tokenizer, cfg.eval_source, seq_len=cfg.eval_seq_len,
                            max_windows=cfg.eval_windows, progress=progress)
    log(f"pruned PPL {pruned.ppl:.2f}")
    reload_diff = None
    if cfg.save_model:
        with step("save_reload"):
            save_pruned(model, experiment.model_dir, tokenizer=tokenizer, plan=plan, report=report)
            reloaded = load_pruned(experiment.model_dir, dtype=next(model.parameters()).dtype,
                                   device=next(model.parameters()).device)
            probe = samples[:2].to(next(model.parameters()).device)
            with torch.no_grad():
                reload_diff = float((reloaded(probe).logits - model(probe).logits).abs().max())
        log(f"reload check: max |Δlogit| = {reload_diff:.2e}")
    with step("figures"):
        fig = plots.kept_fraction_per_layer(summary, backend="paper",
                                            title=f"{cfg.method}, {cfg.selection.ratio:.0%} of {cfg.selection.ratio_of}")
        figure_paths = plots.export(fig, "kept_fraction_per_layer", experiment.figures)
    record = dict(dense=dense.to_dict(), pruned=pruned.to_dict(), report=report.to_dict(), plan=plan.to_dict(),
                  reload_max_abs_diff=reload_diff, importance_seconds=imp.seconds, timings=timings,
                  figures=[str(p) for p in figure_paths], anatomy_after=anatomy(model).to_dict("records"))
    experiment.write_json("evaluation/perplexity.json", record)
    return record
