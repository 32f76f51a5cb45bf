"""The prune → evaluate → save pipeline: its steps as functions, and the whole run as one call.

The README demo calls `run_pruning`; notebook 04 calls the same steps one cell at a time (`calibrate`,
`select_plan`, `record_plan`, `prune_and_reconstruct`, `save_and_check`), so the two cannot drift apart.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import pandas as pd
import torch
from torch import nn

from workbench import plots
from workbench.analysis.diagnosis import diagnose
from workbench.baselines.registry import BASELINES, baseline_compensation, make_plan, uses_refit_scores
from workbench.core.cache import fingerprint_once, model_fingerprint
from workbench.core.experiments import Experiment
from workbench.core.models import anatomy, check_context, model_summary
from workbench.core.timing import timed
from workbench.data.text import CalibrationConfig, calibration_samples
from workbench.evaluation.efficiency import EfficiencyConfig, measure
from workbench.evaluation.evaluate import perplexity
from workbench.evaluation.zeroshot import ZeroShotConfig, zero_shot
from workbench.plans.allocation import LayerwiseConfig
from workbench.plans.normalize import ScoringConfig
from workbench.plans.plan import Plan, PlanProvenance, layer_summary
from workbench.plans.rescore import Rescorer
from workbench.plans.selection import Budget, SelectionConfig
from workbench.recovery.finetune import FinetuneConfig, finetune
from workbench.scoring.importance import importance_cached
from workbench.scoring.layer_importance import layer_importance
from workbench.scoring.methods import IMPORTANCE_METHODS, Importance
from workbench.scoring.removal import block_removal_loss
from workbench.surgery.checkpoints import EXPERIMENT_PREFIX, load_model, load_plan, reload_max_diff, save_pruned
from workbench.surgery.prune import PruneReport
from workbench.surgery.reconstruct import ReconstructConfig, check_folds, prune_and_reconstruct


@dataclass(frozen=True)
class PruneRunConfig:
    """One pruning run.

    Args:
        scoring: importance method and score corrections of the global selection (`ScoringConfig`; its
            temperature / tau measure the block-removal loss on the calibration samples).
        calibration: calibration samples, batch size and Fisher mode of the importance pass.
        selection: budget (ratio and its denominator) and block protection of the global selection.
        baseline: make the plan with a registered baseline instead (a key of `BASELINES`, e.g. "flap",
            "shortgpt"), at `selection.ratio` of `selection.ratio_of`; None: the global selection.
        baseline_params: the baseline's own options (e.g. {"strategy": "inverse", "alpha": 1.0} for layerwise).
        eval_source: text source whose evaluation part measures perplexity (the run's main PPL).
        extra_eval_sources: more sources whose evaluation parts are measured too, on the dense, the pruned and the
            final (fine-tuned) model (recorded per source).
        eval_seq_len: tokens per evaluation window.
        eval_windows: evaluation windows (None: all of the evaluation part).
        save_model: save the pruned checkpoint into the experiment's `model/` and check its reload.
        reconstruction: re-fit the pruned blocks' output projections in closed form on the calibration
            samples (`workbench.surgery.reconstruct`); None: off (a baseline's own compensation, e.g. FLAP's, still
            applies).
        finetune: recovery training after pruning (`FinetuneConfig`, LoRA or full); None: off.
        zero_shot: lm-eval tasks on the final model (`ZeroShotConfig`); None: off.
        efficiency: latency / memory / KV-cache measurement of the final model (`EfficiencyConfig`); None: off.
        layer_importance_samples: calibration windows a baseline's per-layer importance (removal loss, Block
            Influence, outlier ratio) is measured on: the first this many of the calibration samples.
    """

    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    baseline: str | None = None
    baseline_params: dict = field(default_factory=dict)
    eval_source: str = "pydoc"
    extra_eval_sources: tuple[str, ...] = ()
    eval_seq_len: int = 128
    eval_windows: int | None = 50
    save_model: bool = True
    reconstruction: ReconstructConfig | None = None
    finetune: FinetuneConfig | None = None
    zero_shot: ZeroShotConfig | None = None
    efficiency: EfficiencyConfig | None = None
    layer_importance_samples: int = 16

    def __post_init__(self):
        if isinstance(self.eval_seq_len, bool) or not isinstance(self.eval_seq_len, int) or self.eval_seq_len < 2:
            raise ValueError(f"eval_seq_len={self.eval_seq_len!r} must be an integer >= 2")
        if self.eval_windows is not None and (isinstance(self.eval_windows, bool)
                                              or not isinstance(self.eval_windows, int) or self.eval_windows < 1):
            raise ValueError(f"eval_windows={self.eval_windows!r} must be a positive integer or None (all)")
        if self.baseline is not None:
            BASELINES.check(self.baseline, also="None (the global selection)")
        if isinstance(self.layer_importance_samples, bool) or not isinstance(self.layer_importance_samples, int) \
                or self.layer_importance_samples < 1:
            raise ValueError(f"layer_importance_samples={self.layer_importance_samples!r} must be a positive integer")
        if self.baseline_params and self.baseline is None:
            raise ValueError(f"baseline_params={self.baseline_params} without a baseline; set baseline too")
        if self.reconstruction is not None:  # the re-fit runs on the calibration samples: check its folds now
            try:
                check_folds(self.reconstruction, self.calibration.num_samples)
            except ValueError as e:
                raise ValueError(f"reconstruction: {e}") from None
        if self.uses_refit_scores:
            made = f"scoring.method={self.scoring.method}" if self.baseline is None else f"baseline={self.baseline}"
            if not self.calibration.refit:
                raise ValueError(f"{made} needs the re-fit scores of the calibration pass: set calibration.refit=true")
            rec, cal = self.reconstruction, self.calibration
            if rec is not None and not rec.cv_folds and (rec.damping, rec.toward) != (cal.refit_damping,
                                                                                        cal.refit_toward):
                raise ValueError(
                    f"{made} scores units for a re-fit with damping={cal.refit_damping}, toward={cal.refit_toward!r} "
                    f"(calibration.refit_damping / refit_toward), but the reconstruction uses damping={rec.damping}, "
                    f"toward={rec.toward!r}: set both the same (or let each block choose by cross-validation: "
                    f"reconstruction.cv_folds)")

    @property
    def uses_refit_scores(self) -> bool:
        """Whether the plan is made from the re-fit scores (`scoring.refit`)."""
        if self.baseline is not None:
            return uses_refit_scores(self.baseline, self.baseline_params)
        return IMPORTANCE_METHODS[self.scoring.method].needs == "refit"

    @property
    def method(self) -> str:
        """The importance method of the global selection."""
        return self.scoring.method

    @property
    def label(self) -> str:
        """How the plan is made, in the one labelling of plans (`PlanProvenance.label`)."""
        return self.provenance.label

    @property
    def provenance(self) -> PlanProvenance:
        """The provenance the run's plan will carry, known before it is made (labels of failed runs too)."""
        if self.baseline is not None:
            params = dict(self.baseline_params)
            if self.baseline == "layerwise":  # its label names the strategy, the default one included
                params.setdefault("strategy", LayerwiseConfig.strategy)
            return PlanProvenance("baseline", baseline=self.baseline, params=params)
        plain = self.scoring == ScoringConfig(method=self.scoring.method)
        return PlanProvenance("per_layer" if self.selection.layer_ratios else "global", method=self.scoring.method,
                              scoring={} if plain else self.scoring.to_dict(), selection=asdict(self.selection))


def calibrate(model: nn.Module, tokenizer, calibration: CalibrationConfig, *,
              progress: bool = True, data_parallel: bool = False) -> tuple[torch.Tensor, Importance]:
    """The calibration samples and the importance of one (cached) pass over them (`data_parallel`: this
    process's share of it, inside a torch.distributed process group; every process gets the whole result)."""
    samples = calibration_samples(tokenizer, calibration)
    imp = importance_cached(model, samples, batch_size=calibration.batch_size, fisher=calibration.fisher,
                            progress=progress, calibration=asdict(calibration), data_parallel=data_parallel,
                            gradient_checkpointing=calibration.gradient_checkpointing,
                            accumulation=calibration.accumulation, refit=calibration.refit,
                            refit_damping=calibration.refit_damping, refit_toward=calibration.refit_toward)
    return samples, imp


def select_plan(model: nn.Module, imp: Importance, method: str,
                selection: SelectionConfig) -> tuple[pd.DataFrame, Plan]:
    """The global unit table of one importance method and the plan selected from its raw scores (`Rescorer.plan`
    without corrections: it warns when the method is not comparable across layers, e.g. Wanda)."""
    return Rescorer(imp, Budget.of(model)).plan(ScoringConfig(method=method), selection)


def record_plan(experiment: Experiment, table: pd.DataFrame, plan: Plan) -> pd.DataFrame:
    """Write the unit table and the per-layer summary into `analysis/`; returns the summary."""
    summary = layer_summary(plan)
    experiment.write_table("analysis/importance_table.csv", table)
    experiment.write_table("analysis/layer_summary.csv", summary)
    return summary


def save_and_check(model: nn.Module, experiment: Experiment, probe: torch.Tensor, *, tokenizer=None,
                   plan: Plan | None = None, report: PruneReport | None = None, card: dict | None = None) -> float:
    """Save the pruned model into the experiment's `model/` (self-contained, with its model card: `card` as
    `save_pruned` takes it), reload it, return max |Δlogit| on `probe`."""
    save_pruned(model, experiment.model_dir, tokenizer=tokenizer, plan=plan, report=report, card=card)
    return reload_max_diff(model, experiment.model_dir, probe)


def pruned_model(model: nn.Module, tokenizer, *, experiment: str | None = None, method: str = "taylor",
                 calibration: CalibrationConfig = CalibrationConfig(),
                 selection: SelectionConfig = SelectionConfig(),
                 reconstruction: ReconstructConfig | None = None) -> tuple[nn.Module, Plan]:
    """The pruned model of an earlier experiment (its `model/`), or `model` pruned here by a global plan
    (and reconstructed on the calibration samples when `reconstruction` is given)."""
    if experiment is not None:
        pruned, _ = load_model(f"{EXPERIMENT_PREFIX}{experiment}")
        return pruned, load_plan(Experiment.open(experiment).model_dir)
    samples, imp = calibrate(model, tokenizer, calibration)
    _, plan = select_plan(model, imp, method, selection)
    prune_and_reconstruct(model, plan, samples, reconstruction)
    return model, plan


def make_run_plan(model: nn.Module, cfg: PruneRunConfig, samples: torch.Tensor, imp: Importance, *,
                  progress: bool = True) -> tuple[pd.DataFrame, Plan, ReconstructConfig | None]:
    """The run's unit table, plan, and the compensation that goes with it (the run's reconstruction, else the
    baseline's own, e.g. FLAP's bias)."""
    budget = Budget.of(model)
    block_loss = (block_removal_loss(model, samples, batch_size=cfg.calibration.batch_size, progress=progress)
                  if cfg.scoring.needs_block_loss else None)
    rescorer = Rescorer(imp, budget, block_loss)
    if cfg.baseline is None:
        table, plan = rescorer.plan(cfg.scoring, cfg.selection)
        return table, plan, cfg.reconstruction
    base = BASELINES[cfg.baseline]
    layer_scores = {m: layer_importance(model, samples[:cfg.layer_importance_samples], m, progress=progress).to_numpy()
                    for m in base.layer_measures}
    plan = make_plan(cfg.baseline, rescorer, cfg.selection.ratio, cfg.selection.ratio_of, layer_scores=layer_scores,
                     **cfg.baseline_params)
    own = baseline_compensation(cfg.baseline, imp, cfg.baseline_params)
    return rescorer.table(cfg.scoring.method), plan, cfg.reconstruction or own


def run_pruning(model, tokenizer, cfg: PruneRunConfig, experiment: Experiment, *, log=print,
                progress: bool = True) -> dict:
    """Importance → plan (global selection or a baseline) → pruning (+ reconstruction) → PPL → optional
    fine-tuning, zero-shot and efficiency → save → reload check.

    Mutates `model` (it is pruned in place). Returns the evaluation record, also written to
    `evaluation/perplexity.json`.
    """
    timings: dict[str, float] = {}

    def step(name):
        return timed(name, into=timings, log=log, fmt="  [{label}] {seconds:.1f} s")

    def ppl(m, source=cfg.eval_source):
        return perplexity(m, tokenizer, source, seq_len=cfg.eval_seq_len, max_windows=cfg.eval_windows,
                          progress=progress)

    extra = [s for s in cfg.extra_eval_sources if s != cfg.eval_source]
    lengths = dict(eval_seq_len=cfg.eval_seq_len, **{"calibration.seq_len": cfg.calibration.seq_len})
    if cfg.finetune is not None:
        lengths["finetune.seq_len"] = cfg.finetune.seq_len
    for what, n in lengths.items():  # before any work: a run that cannot be right stops at once
        check_context(model, n, what)

    experiment.write_json("config.json", dict(run=asdict(cfg), model=model_summary(model)))
    with fingerprint_once(model):  # up to the selection the dense model is only read: its fingerprint once
        # the dense model the checkpoint's card names (its content fingerprint: the cache keys' hash of every weight)
        base = dict(name=str(getattr(model.config, "name_or_path", "")),
                    fingerprint=model_fingerprint(model) if cfg.save_model else None)
        dense_figure = plots.export(plots.params_per_layer(anatomy(model), backend="paper"), "params_per_layer_dense",
                                    experiment)
        with step("perplexity_dense"):
            dense = ppl(model)
            dense_extra = {s: ppl(model, s).to_dict() for s in extra}
        log(f"dense PPL {dense.ppl:.2f} ({dense.windows} windows × {dense.seq_len} tokens, {dense.source})")
        with step("calibration_importance"):
            samples, imp = calibrate(model, tokenizer, cfg.calibration, progress=progress)
        with step("selection"):
            table, plan, compensation = make_run_plan(model, cfg, samples, imp, progress=progress)
    summary = record_plan(experiment, table, plan)
    diagnosis = diagnose(imp, plan, cfg.method)
    experiment.write_json("analysis/gradient_diagnosis.json", diagnosis)
    log(f"diagnosis: mean_ratio {diagnosis['mean_ratio']:.1f}, norm_ratio {diagnosis['norm_ratio']:.1f}, "
        f"{diagnosis['n_extreme']} extreme blocks; {diagnosis['recommendation']['rule']}")
    with step("prune"):
        report, rec = prune_and_reconstruct(model, plan, samples, compensation, progress=progress)
    if rec is not None:
        log(f"reconstructed {len(rec.solutions)} blocks from {rec.tokens:,} tokens ({rec.seconds:.1f} s when computed)"
            + ("; ridges chosen by cross-validation: " + rec.ridge_counts() if rec.config.get("cv_folds") else ""))
    log(f"removed {report.params_before - report.params_after:,} parameters: "
        f"{report.ratio_total:.2%} of all, {report.ratio_prunable:.2%} of attention+MLP; "
        f"layers removed {report.removed_layers}, emptied blocks {report.emptied_blocks}")
    with step("perplexity_pruned"):
        pruned = ppl(model)
        pruned_extra = {s: ppl(model, s).to_dict() for s in extra}
    log(f"pruned PPL {pruned.ppl:.2f}")
    record = dict(dense=dense.to_dict(), pruned=pruned.to_dict(), report=report.to_dict(), plan=plan.to_dict(),
                  diagnosis={k: diagnosis[k] for k in ("mean_ratio", "norm_ratio", "n_extreme")},
                  importance_seconds=imp.seconds)
    if rec is not None:
        record["reconstruction"] = rec.summary()
    if cfg.finetune is not None:
        with step("finetune"):
            result = finetune(model, tokenizer, cfg.finetune, experiment.checkpoints, progress=progress, log=log)
            model = result.model
        with step("perplexity_finetuned"):
            record["finetuned"] = ppl(model).to_dict()
        record["finetune"] = result.summary()
        log(f"fine-tuned PPL {record['finetuned']['ppl']:.2f} after {result.steps} steps")
    if extra:  # each other text on the dense, the pruned and the final (fine-tuned or else pruned) model
        with step("perplexity_extra_sources"):
            record["extra_sources"] = {s: dict(dense=dense_extra[s], pruned=pruned_extra[s],
                                               final=ppl(model, s).to_dict() if cfg.finetune else pruned_extra[s])
                                       for s in extra}
    if cfg.zero_shot is not None:
        with step("zero_shot"):
            record["zero_shot"] = zero_shot(model, tokenizer, cfg.zero_shot, progress=progress).to_dict()
        log(f"zero-shot mean acc {record['zero_shot']['mean_acc']:.4f}")
    with step("figures"):
        fig = plots.kept_fraction_per_layer(summary, backend="paper",
                                            title=f"{plan.provenance.label}, {cfg.selection.ratio:.0%} of "
                                                  f"{cfg.selection.ratio_of}")
        figure_paths = plots.export(fig, "kept_fraction_per_layer", experiment)
    reload_diff = None
    if cfg.save_model:
        png = next((p for p in figure_paths if p.suffix == ".png"), None)
        card = dict(base=base, results={k: record[k] for k in ("dense", "pruned", "finetuned") if k in record},
                    figure={png.name: png.read_bytes()} if png is not None else None)
        with step("save_reload"):
            reload_diff = save_and_check(model, experiment, samples[:2], tokenizer=tokenizer, plan=plan, report=report,
                                         card=card)
        log(f"reload check: max |Δlogit| = {reload_diff:.2e}")
    if cfg.efficiency is not None:
        with step("efficiency"):
            record["efficiency"] = measure(model, cfg.efficiency,
                                           checkpoint_dir=experiment.model_dir if cfg.save_model else None)
    record.update(reload_max_abs_diff=reload_diff, timings=timings,
                  figures=[_relative(p, experiment.root) for p in [*dense_figure, *figure_paths]],
                  anatomy_after=anatomy(model).to_dict("records"))
    experiment.write_json("evaluation/perplexity.json", record)
    return record


def experiment_models(experiments: dict[str, str | None]) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Load the `model/` checkpoint of each named experiment (None entries are skipped): (models, folders)."""
    models, folders = {}, {}
    for label, name in experiments.items():
        if name is not None:
            folders[label] = str(Experiment.open(name).model_dir)
            models[label], _ = load_model(f"{EXPERIMENT_PREFIX}{name}")
    return models, folders


def _relative(path, root) -> str:
    """A path inside the experiment relative to it (it stays right when a staged run is moved), others as they are."""
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)
