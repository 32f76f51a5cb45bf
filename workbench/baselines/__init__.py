"""The baselines stage."""
from workbench.baselines.registry import Baseline, default_llm_pruner_range, shortgpt_plan, BASELINES, make_plan

__all__ = [
    "Baseline",
    "default_llm_pruner_range",
    "shortgpt_plan",
    "BASELINES",
    "make_plan",
]
