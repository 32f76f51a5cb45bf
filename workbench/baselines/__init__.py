"""The baselines stage."""
from workbench.baselines.registry import BASELINES, Baseline, default_llm_pruner_range, make_plan, shortgpt_plan

__all__ = [
    "Baseline",
    "default_llm_pruner_range",
    "shortgpt_plan",
    "BASELINES",
    "make_plan",
]
