"""Importance methods: what one calibration pass accumulates, and the registry of methods computed from it.

Every method is a cheap function of the same accumulators (`Accumulators`), so switching methods never
re-runs the model. The registry `IMPORTANCE_METHODS` is what widgets, configs and tests read.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd
import torch

from workbench.models import BLOCKS


@dataclass
class Accumulators:
    """Per-unit sums of one calibration pass; every importance method is a function of these."""

    first: dict[str, list[torch.Tensor]]  # block -> per layer [units]: Σ_batches Σ_e |w·g|
    fisher: dict[str, list[torch.Tensor]]  # block -> per layer [units]: Σ_batches Σ_e (w·g)²
    magnitude: dict[str, list[torch.Tensor]]  # block -> per layer [units]: Σ_e |w|
    wanda: dict[str, list[torch.Tensor]]  # block -> per layer [units]: Σ_e |w|·‖x_in(e)‖₂
    fluctuation: dict[str, list[torch.Tensor]]  # block -> per layer [units]: Σ_j Var(x_j)·‖W_out[:, j]‖² (FLAP)
    batches: int
    tokens: int


@dataclass
class Importance:
    """Cached result of one calibration pass: accumulators, gradient statistics and provenance."""

    acc: Accumulators
    grad_stats: pd.DataFrame
    widths: list[tuple[int, int]]
    model: str
    calibration: dict = field(default_factory=dict)
    seconds: float = 0.0
    key: str = ""

    def scores(self, method: str) -> dict[str, list[torch.Tensor]]:
        """Per-unit importance of one registered method: block -> per-layer tensors."""
        if method not in IMPORTANCE_METHODS:
            raise ValueError(f"importance method {method!r} is not registered; allowed: {list(IMPORTANCE_METHODS)}")
        return IMPORTANCE_METHODS[method].fn(self.acc)


# ----------------------------------------------------------------------------------------------
# The registry of methods (widgets' dropdowns and tests read it)


@dataclass(frozen=True)
class ImportanceMethod:
    name: str
    description: str
    fn: Callable[[Accumulators], dict[str, list[torch.Tensor]]]


def _per_block(fn) -> Callable[[Accumulators], dict[str, list[torch.Tensor]]]:
    def apply(acc: Accumulators) -> dict[str, list[torch.Tensor]]:
        return {b: [fn(acc, b, i) for i in range(len(acc.first[b]))] for b in BLOCKS}

    return apply


IMPORTANCE_METHODS: dict[str, ImportanceMethod] = {
    m.name: m
    for m in [
        ImportanceMethod(
            "taylor", "first-order Taylor: mean over batches of Σ|w·g| over the unit's parameters",
            _per_block(lambda a, b, i: a.first[b][i] / a.batches),
        ),
        ImportanceMethod(
            "taylor2", "second-order Taylor: Σ(|w·g| + ½·w²·F), F = Fisher diagonal (mean of g²)",
            _per_block(lambda a, b, i: a.first[b][i] / a.batches + 0.5 * a.fisher[b][i] / a.batches),
        ),
        ImportanceMethod(
            "wanda", "Wanda: Σ|w|·‖x‖₂ with ‖x‖₂ the input-activation norm over calibration tokens",
            _per_block(lambda a, b, i: a.wanda[b][i]),
        ),
        ImportanceMethod(
            "fluctuation", "FLAP's fluctuation: Σ Var(x_j)·‖W_out[:, j]‖² over the unit's output-projection inputs",
            _per_block(lambda a, b, i: a.fluctuation[b][i]),
        ),
        ImportanceMethod(
            "magnitude", "weight magnitude Σ|w| (baseline; no data needed)",
            _per_block(lambda a, b, i: a.magnitude[b][i]),
        ),
    ]
}
