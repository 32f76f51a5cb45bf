"""Importance methods: what one calibration pass accumulates, and the registry of methods computed from it.

Every method is a cheap function of the same accumulators (`Accumulators`), so switching methods never
re-runs the model. The registry `IMPORTANCE_METHODS` is what widgets, configs and tests read.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd
import torch

from workbench.core.arch import BLOCKS
from workbench.core.registry import Registry


@dataclass
class Accumulators:
    """Per-unit sums of one calibration pass; every importance method is a function of these."""

    first: dict[str, list[torch.Tensor]]  # block -> per layer [units]: Σ_batches Σ_e |w·g|
    fisher: dict[str, list[torch.Tensor]]  # block -> per layer [units]: Σ_batches Σ_e (w·g)²
    magnitude: dict[str, list[torch.Tensor]]  # block -> per layer [units]: Σ_e |w|
    wanda: dict[str, list[torch.Tensor]]  # block -> per layer [units]: Σ_e |w|·‖x_in(e)‖₂
    # block -> per layer [units]: Wanda-sp's Σ_columns mean_rows |w|·‖x‖ of o_proj / down_proj only
    wanda_sp: dict[str, list[torch.Tensor]]
    fluctuation: dict[str, list[torch.Tensor]]  # block -> per layer [units]: Σ_j Var(x_j)·‖W_out[:, j]‖² (FLAP)
    # block -> per layer [units]: FLAP's standardized statistic (attention columns squared, z per layer, unit mean)
    flap: dict[str, list[torch.Tensor]]
    batches: int
    tokens: int
    # Only from a pass with fisher="sequence": Σ_sequences Σ_e (w·g_s)², g_s the gradient of one sequence's loss.
    fisher_seq: dict[str, list[torch.Tensor]] | None = None
    sequences: int = 0
    # Only from a pass with refit=True (`workbench.scoring.refit`): block -> per layer [units], the increase of the
    # mean calibration loss once the kept units are re-fitted, pooled along each block's greedy removal order;
    # and the raw marginals along that order.
    refit: dict[str, list[torch.Tensor]] | None = None
    refit_raw: dict[str, list[torch.Tensor]] | None = None
    # the ridge of the re-fit those scores assume: {"damping": λ, "toward": "zero" | "dense"} (None: the default)
    refit_ridge: dict | None = None


# What a method may need beyond every pass's accumulators: whether the pass has it, and how to get it.
NEEDS: dict[str, tuple[Callable[[Accumulators], bool], str]] = {
    "sequence_fisher": (lambda a: a.fisher_seq is not None,
                        "the per-sequence Fisher; calibrate with fisher='sequence' (CalibrationConfig(fisher='sequence'))"),
    "refit": (lambda a: a.refit is not None,
              "the re-fit scores; calibrate with refit=True (CalibrationConfig(refit=True), or calibration.refit=true "
              "in a run file)"),
}


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
        m = IMPORTANCE_METHODS[method]
        if m.needs is not None and not NEEDS[m.needs][0](self.acc):
            raise ValueError(f"importance method {method!r} needs {NEEDS[m.needs][1]}; this pass did not compute it. "
                             f"Methods this pass supports: {available_methods(self)}")
        return m.fn(self.acc)


def available_methods(imp: Importance) -> list[str]:
    """The registered methods this importance result can score (per-sequence ones only after such a pass)."""
    return [n for n, m in IMPORTANCE_METHODS.items() if m.needs is None or NEEDS[m.needs][0](imp.acc)]


def global_warning(method: str, normalization: str) -> str | None:
    """Why a global plan (one knapsack over all layers) from this method's raw scores is suspect, or None."""
    m = IMPORTANCE_METHODS[method]
    if m.layer_local and normalization == "none":
        return (f"importance method {method!r} is not comparable across layers (its scale follows each layer's "
                "activation norms), so a global plan from its raw scores tends to empty whole layers: on the default "
                "model global wanda at 20 % gives PPL ≈ 10⁵. Use the per-layer baseline (Wanda-sp: "
                "make_plan('wanda_sp', ...)), or a per-block normalization (e.g. minmax or zscore, level='block')")
    return None


# ----------------------------------------------------------------------------------------------
# The registry of methods (widgets' dropdowns and tests read it)


@dataclass(frozen=True)
class ImportanceMethod:
    """A registered importance method.

    Args:
        name: registry key (widgets, configs, tests).
        description: one line for tables and dropdowns.
        fn: the per-unit scores from the accumulators.
        needs: what the pass must have computed beyond the default (a key of `NEEDS`: "sequence_fisher" for a
            pass with fisher="sequence", "refit" for one with refit=True), or None.
        layer_local: its scale is only meaningful within a layer (a global plan from raw scores is warned about).
    """

    name: str
    description: str
    fn: Callable[[Accumulators], dict[str, list[torch.Tensor]]]
    needs: str | None = None
    layer_local: bool = False

    def __post_init__(self):
        if self.needs is not None and self.needs not in NEEDS:
            raise ValueError(f"needs={self.needs!r}: one of {list(NEEDS)} or None")


def _per_block(fn) -> Callable[[Accumulators], dict[str, list[torch.Tensor]]]:
    def apply(acc: Accumulators) -> dict[str, list[torch.Tensor]]:
        return {b: [fn(acc, b, i) for i in range(len(acc.first[b]))] for b in BLOCKS}

    return apply


IMPORTANCE_METHODS: Registry[ImportanceMethod] = Registry.of("importance method", [
    ImportanceMethod(
        "taylor", "first-order Taylor: mean over batches of Σ|w·g| over the unit's parameters",
        _per_block(lambda a, b, i: a.first[b][i] / a.batches),
    ),
    ImportanceMethod(
        "taylor2", "second-order Taylor: Σ(|w·g| + ½·w²·F), F = Fisher diagonal from batch-mean gradients",
        _per_block(lambda a, b, i: a.first[b][i] / a.batches + 0.5 * a.fisher[b][i] / a.batches),
    ),
    ImportanceMethod(
        "taylor2_seq", "second-order Taylor with the empirical Fisher over sequences: Σ|w·g| + ½·Σw²·E_s[g_s²]",
        _per_block(lambda a, b, i: a.first[b][i] / a.batches + 0.5 * a.fisher_seq[b][i] / a.sequences),
        needs="sequence_fisher",
    ),
    ImportanceMethod(
        "fisher_seq", "second-order term only (Optimal Brain Damage's saliency, LeCun et al., 1990): "
        "½·Σw²·E_s[g_s²], per-sequence Fisher",
        _per_block(lambda a, b, i: 0.5 * a.fisher_seq[b][i] / a.sequences),
        needs="sequence_fisher",
    ),
    ImportanceMethod(
        "wanda", "Wanda: Σ|w|·‖x‖₂ with ‖x‖₂ the input-activation norm over calibration tokens",
        _per_block(lambda a, b, i: a.wanda[b][i]), layer_local=True,
    ),
    ImportanceMethod(
        "wanda_sp", "Wanda-sp's own statistic (An et al., 2024): the output projection's columns only, |w|·‖x‖ "
        "averaged over each column's rows, summed over the unit's columns",
        _per_block(lambda a, b, i: a.wanda_sp[b][i]), layer_local=True,
    ),
    ImportanceMethod(
        "fluctuation", "FLAP's fluctuation: Σ Var(x_j)·‖W_out[:, j]‖² over the unit's output-projection inputs",
        _per_block(lambda a, b, i: a.fluctuation[b][i]), layer_local=True,
    ),
    ImportanceMethod(
        "flap", "FLAP's own unit statistic (An et al., 2024, structure AL-AM): the fluctuation per input column "
        "(squared for attention), standardized over each layer's columns, averaged over the unit's columns",
        _per_block(lambda a, b, i: a.flap[b][i]),
    ),
    ImportanceMethod(
        "refit", "reconstruction-aware: the loss increase once the kept units are re-fitted (Optimal Brain Surgeon's "
        "update per block, greedy; the block's output error weighted by its Fisher diagonal, so comparable across "
        "layers)",
        _per_block(lambda a, b, i: a.refit[b][i]), needs="refit",
    ),
    ImportanceMethod(
        "magnitude", "weight magnitude Σ|w| (baseline; no data needed)",
        _per_block(lambda a, b, i: a.magnitude[b][i]),
    ),
])
