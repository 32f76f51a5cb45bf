"""The baselines stage."""
from workbench.baselines.registry import (
    BASELINES,
    REFIT_BASELINES,
    Baseline,
    default_llm_pruner_range,
    make_plan,
    shortgpt_plan,
)

__all__ = [
    "Baseline",
    "default_llm_pruner_range",
    "shortgpt_plan",
    "BASELINES",
    "REFIT_BASELINES",
    "make_plan",
]
