"""The analysis stage."""
from workbench.analysis.comparison import Refused, baseline_plans, compare_plans, study_variants
from workbench.analysis.diagnosis import (
    Recommendation,
    diagnose,
    gradient_stats,
    importance_stats,
    recommend,
    scale_ratios,
    taylor_terms,
)
from workbench.analysis.distribution import TOTAL, best_split, held_out_ppl, xy_search
from workbench.analysis.outliers import (
    UNIT_ACT_FACTOR,
    UNIT_K_SIGMA,
    plan_outliers,
    tensor_stats,
    unit_outliers,
    warn_removed_outliers,
    weight_histograms,
    weight_stats,
)

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
