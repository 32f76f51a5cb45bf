"""The analysis stage."""
from workbench.analysis.comparison import Refused, baseline_plans, study_variants, compare_plans
from workbench.analysis.diagnosis import gradient_stats, importance_stats, taylor_terms, scale_ratios, Recommendation, recommend, diagnose
from workbench.analysis.distribution import TOTAL, held_out_ppl, xy_search, best_split
from workbench.analysis.outliers import tensor_stats, weight_stats, weight_histograms, UNIT_ACT_FACTOR, UNIT_K_SIGMA, unit_outliers, plan_outliers, warn_removed_outliers

__all__ = [
    "Refused",
    "baseline_plans",
    "study_variants",
    "compare_plans",
    "gradient_stats",
    "importance_stats",
    "taylor_terms",
    "scale_ratios",
    "Recommendation",
    "recommend",
    "diagnose",
    "TOTAL",
    "held_out_ppl",
    "xy_search",
    "best_split",
    "tensor_stats",
    "weight_stats",
    "weight_histograms",
    "UNIT_ACT_FACTOR",
    "UNIT_K_SIGMA",
    "unit_outliers",
    "plan_outliers",
    "warn_removed_outliers",
]
