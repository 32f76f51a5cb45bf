"""The baselines stage."""
from workbench.baselines.registry import (
    BASELINES,
    REFIT_BASELINES,
    Baseline,
    baseline_compensation,
    default_llm_pruner_range,
    make_plan,
    shortgpt_plan,
    uses_refit_scores,
)

__all__ = [
    "Baseline",
    "default_llm_pruner_range",
    "shortgpt_plan",
    "BASELINES",
    "REFIT_BASELINES",
    "make_plan",
    "baseline_compensation",
    "uses_refit_scores",
]
