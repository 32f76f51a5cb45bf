"""prune-workbench: GQA-aware global structured pruning of decoder LLMs. This is the front door.

Notebooks and scripts import from here; `docs/ARCHITECTURE.md` maps the stage packages behind it
(`STAGES`, in data-flow order: each imports only itself and the stages before it).

>>> import workbench as wb
>>> model, tokenizer = wb.load_model("tiny")
>>> samples = wb.calibration_samples(tokenizer, wb.CalibrationConfig(num_samples=2, seq_len=16))
>>> imp = wb.importance_cached(model, samples, cache=False, progress=False)
>>> table, plan = wb.select_plan(model, imp, "taylor", wb.SelectionConfig(ratio=0.2))
>>> plan.provenance.label, plan.provenance.description
('taylor', 'global taylor')
"""
from workbench.core.compat import warn_untested_versions

warn_untested_versions()  # once per process, when torch / transformers / peft is outside the tested range

# The stage packages, in data-flow order (tests/test_structure.py holds every import to it).
STAGES = ("core", "data", "scoring", "plans", "surgery", "baselines", "evaluation", "recovery", "deploy",
          "analysis", "plots", "runs", "lab")

from workbench import plots  # noqa: E402  (the figure namespace: plots.kept_fraction_per_layer, plots.export, ...)
from workbench.analysis.comparison import baseline_plans, compare_plans, study_variants  # noqa: E402
from workbench.analysis.diagnosis import diagnose, gradient_stats, taylor_terms  # noqa: E402
from workbench.analysis.distribution import best_split, xy_search  # noqa: E402
from workbench.analysis.outliers import (  # noqa: E402
    plan_outliers,
    unit_outliers,
    warn_removed_outliers,
    weight_histograms,
    weight_stats,
)
from workbench.baselines.registry import BASELINES, make_plan  # noqa: E402
from workbench.core.experiments import Experiment  # noqa: E402
from workbench.core.models import anatomy, model_summary  # noqa: E402
from workbench.core.paths import experiments_root  # noqa: E402
from workbench.core.testing import tiny_model  # noqa: E402
from workbench.core.timing import timed  # noqa: E402
from workbench.data.text import (  # noqa: E402
    CalibrationConfig,
    calibration_samples,
    evaluation_windows,
    held_out_samples,
)
from workbench.deploy import llamacpp  # noqa: E402  (llama.cpp's own API: llamacpp.compare, llamacpp.perplexity, ...)
from workbench.deploy.gguf import export_gguf, export_models  # noqa: E402
from workbench.evaluation.efficiency import EfficiencyConfig, parameter_breakdown  # noqa: E402
from workbench.evaluation.evaluate import (  # noqa: E402
    accuracy_table,
    efficiency_ratios,
    evaluate_models,
    perplexity,
    perplexity_after,
    perplexity_of_plans,
    plans_record,
    recovery_table,
    results_table,
)
from workbench.evaluation.zeroshot import STUDY_TASKS, ZeroShotConfig  # noqa: E402
from workbench.lab.notebook import load  # noqa: E402
from workbench.lab.widgets import panel  # noqa: E402
from workbench.plans.allocation import (  # noqa: E402
    ALLOCATIONS,
    LayerwiseConfig,
    allocate,
    compare_allocation,
    owl_plan,
    owl_ratios,
)
from workbench.plans.normalize import NORMALIZERS, PRESETS, ScoringConfig, standard_settings  # noqa: E402
from workbench.plans.plan import Plan, PlanProvenance, layer_summary  # noqa: E402
from workbench.plans.rescore import Rescorer  # noqa: E402
from workbench.plans.selection import Budget, SelectionConfig, build_table, select  # noqa: E402
from workbench.recovery.finetune import FinetuneConfig, finetune  # noqa: E402
from workbench.runs.config import load_run_config  # noqa: E402
from workbench.runs.consolidate import best, consolidate, correlations  # noqa: E402
from workbench.runs.pipeline import (  # noqa: E402
    calibrate,
    experiment_models,
    pruned_model,
    record_plan,
    run_pruning,
    save_and_check,
    select_plan,
)
from workbench.runs.queue import queue_status  # noqa: E402
from workbench.runs.sweep import run_sweep  # noqa: E402
from workbench.scoring.activations import activation_stats  # noqa: E402
from workbench.scoring.importance import importance_cached  # noqa: E402
from workbench.scoring.layer_importance import LAYER_IMPORTANCE, layer_importance, layer_outlier_ratio  # noqa: E402
from workbench.scoring.methods import IMPORTANCE_METHODS, available_methods  # noqa: E402
from workbench.scoring.removal import block_removal_loss  # noqa: E402
from workbench.surgery.checkpoints import load_model, load_plan, load_pruned, save_pruned  # noqa: E402
from workbench.surgery.prune import apply_plan, mask_plan  # noqa: E402
from workbench.surgery.reconstruct import ReconstructConfig, prune_and_reconstruct  # noqa: E402

__all__ = [
    "STAGES",
    # core: models, experiments, timing
    "Experiment", "anatomy", "experiments_root", "model_summary", "tiny_model", "timed",
    # loading and saving (one loader: "default", "tiny", a path, a hub id, "experiment:NAME")
    "load", "load_model", "load_plan", "load_pruned", "save_pruned",
    # data
    "CalibrationConfig", "calibration_samples", "evaluation_windows", "held_out_samples",
    # scoring
    "IMPORTANCE_METHODS", "LAYER_IMPORTANCE", "activation_stats", "available_methods", "block_removal_loss",
    "importance_cached", "layer_importance",
    # plans
    "ALLOCATIONS", "BASELINES", "NORMALIZERS", "PRESETS", "Budget", "LayerwiseConfig", "Plan", "PlanProvenance",
    "Rescorer", "ScoringConfig", "SelectionConfig", "allocate", "build_table", "compare_allocation",
    "layer_outlier_ratio", "layer_summary", "make_plan", "owl_plan", "owl_ratios", "select", "standard_settings",
    # surgery
    "ReconstructConfig", "apply_plan", "mask_plan", "prune_and_reconstruct",
    # evaluation and recovery
    "EfficiencyConfig", "FinetuneConfig", "STUDY_TASKS", "ZeroShotConfig", "accuracy_table", "efficiency_ratios",
    "evaluate_models", "finetune", "parameter_breakdown", "perplexity", "perplexity_after", "perplexity_of_plans", "plans_record",
    "recovery_table", "results_table",
    # deploy
    "export_gguf", "export_models", "llamacpp",
    # analysis
    "baseline_plans", "best_split", "compare_plans", "diagnose", "gradient_stats", "plan_outliers", "study_variants",
    "taylor_terms", "unit_outliers", "warn_removed_outliers", "weight_histograms", "weight_stats", "xy_search",
    # figures
    "plots",
    # runs
    "best", "calibrate", "consolidate", "correlations", "experiment_models", "load_run_config", "pruned_model",
    "queue_status", "record_plan", "run_pruning", "run_sweep", "save_and_check", "select_plan",
    # lab
    "panel",
]
