"""Diagnosis of gradient and importance scales across layers, and measured block-removal loss.

Gradient scales differ by orders of magnitude between layers, so a plain global ranking can prune a
few layers almost completely. This module measures that (per-layer statistics, the largest-over-
smallest ratios, the blocks a plan prunes beyond a threshold) and recommends a correction following
the rules of thumb of the GAQ-Aware-Prune study (mean_ratio > 1000 → log; more than 5 extreme blocks →
log + clipping; 100–1000 → minmax or sqrt; < 100 → none, or temperature 1).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from workbench.core.arch import BLOCKS
from workbench.plans.plan import EXTREME_THRESHOLD, Plan, extreme_blocks, layer_summary
from workbench.scoring.methods import Importance


def gradient_stats(imp: Importance) -> pd.DataFrame:
    """Per layer and block: mean |g|, gradient norm, max |g|, share of zeros (over the calibration pass)."""
    gs = imp.grad_stats
    batches = max(1, gs.attrs.get("batches", imp.acc.batches))
    agg = gs.groupby(["layer", "block"], sort=True).agg(
        numel=("numel", "sum"), abs_sum=("abs_sum", "sum"), sq_sum=("sq_sum", "sum"), max_abs=("max_abs", "max"),
        zeros=("zeros", "sum")).reset_index()
    count = agg["numel"] * batches
    return pd.DataFrame({
        "layer": agg["layer"], "block": agg["block"],
        "grad_mean_abs": agg["abs_sum"] / count,
        "grad_norm": np.sqrt(agg["sq_sum"] / batches),  # RMS over batches of the block's gradient norm
        "grad_max_abs": agg["max_abs"],
        "grad_zero_share": agg["zeros"] / count,
        "grad_nonfinite": 0,  # the pass stops on any inf/NaN, naming the module
    })


def importance_stats(imp: Importance, method: str, costs: dict[str, list[int]] | None = None) -> pd.DataFrame:
    """Per layer and block: mean / sum / max / min importance of its units; with `costs` (parameters per
    unit, `Budget.costs`) also `score_mean`, the mean importance per parameter, which is what a global
    ranking compares (an attention group owns far more parameters than an MLP channel)."""
    rows = []
    for block, per_layer in imp.scores(method).items():
        for layer, t in enumerate(per_layer):
            if t.numel():
                row = dict(layer=layer, block=block, imp_mean=float(t.mean()), imp_sum=float(t.sum()),
                           imp_max=float(t.max()), imp_min=float(t.min()))
                if costs is not None:
                    row["score_mean"] = row["imp_mean"] / costs[block][layer]
                rows.append(row)
    return pd.DataFrame(rows).sort_values(["layer", "block"]).reset_index(drop=True)


def taylor_terms(imp: Importance) -> pd.DataFrame:
    """Per layer and block, the two terms of the second-order Taylor score summed over the block's units.

    `first` = Σ|w·g| (mean over batches); `second_batch` = ½Σw²·F with F from batch-mean gradients;
    `second_seq` = the same with the empirical Fisher over sequences (NaN unless the pass had fisher="sequence");
    and each second term over the first, which says whether adding it can change a ranking at all.
    """
    a = imp.acc
    rows = []
    for block in BLOCKS:
        for layer, first in enumerate(a.first[block]):
            if not first.numel():
                continue
            f1 = float(first.sum()) / a.batches
            sb = 0.5 * float(a.fisher[block][layer].sum()) / a.batches
            ss = 0.5 * float(a.fisher_seq[block][layer].sum()) / a.sequences if a.fisher_seq is not None else np.nan
            rows.append(dict(layer=layer, block=block, first=f1, second_batch=sb, second_seq=ss,
                             batch_over_first=sb / f1 if f1 else np.nan, seq_over_first=ss / f1 if f1 else np.nan))
    return pd.DataFrame(rows).sort_values(["layer", "block"]).reset_index(drop=True)


def scale_ratios(grad: pd.DataFrame) -> dict:
    """Largest over smallest per-layer mean |g| and gradient norm (layer = attention and MLP together)."""
    per_layer = grad.groupby("layer").agg(mean=("grad_mean_abs", "mean"), norm=("grad_norm", lambda x: np.sqrt((x ** 2).sum())))

    def ratio(col):
        lo = per_layer[col].min()
        return float(per_layer[col].max() / lo) if lo > 0 else float("inf")

    return dict(mean_ratio=ratio("mean"), norm_ratio=ratio("norm"),
                max_mean_layer=int(per_layer["mean"].idxmax()), min_mean_layer=int(per_layer["mean"].idxmin()))


@dataclass(frozen=True)
class Recommendation:
    """A suggested correction: normalization and level, whether to clip, temperature, and the rule that fired."""

    normalization: str
    level: str
    clip: bool
    temperature: float
    rule: str


def recommend(mean_ratio: float, n_extreme: int) -> Recommendation:
    """The GAQ-Aware-Prune study's rules of thumb; `rule` says which fired."""
    if n_extreme > 5:
        return Recommendation("log", "block", True, 0.0,
                              f"{n_extreme} extreme blocks > 5 → log normalization + percentile clipping")
    if mean_ratio > 1000:
        return Recommendation("log", "layer", False, 0.0, f"mean_ratio {mean_ratio:.0f} > 1000 → log normalization")
    if mean_ratio >= 100:
        return Recommendation("minmax", "layer", False, 0.0,
                              f"mean_ratio {mean_ratio:.0f} in [100, 1000] → minmax (or sqrt) normalization")
    return Recommendation("none", "layer", False, 1.0,
                          f"mean_ratio {mean_ratio:.1f} < 100 → no normalization, or temperature 1")


def diagnose(imp: Importance, plan: Plan, method: str = "taylor", threshold: float = EXTREME_THRESHOLD,
             costs: dict[str, list[int]] | None = None) -> dict:
    """Everything the diagnosis notebook shows, JSON-ready (written as analysis/gradient_diagnosis.json).

    costs: parameters per unit (`Budget.costs`), for the per-parameter score column `score_mean`."""
    grad = gradient_stats(imp)
    ratios = scale_ratios(grad)
    extreme = extreme_blocks(plan, threshold)
    rec = recommend(ratios["mean_ratio"], len(extreme))
    summary = layer_summary(plan)
    per_block = grad.merge(importance_stats(imp, method, costs), on=["layer", "block"], how="left").merge(
        summary[["layer", "block", "pruned_fraction"]], on=["layer", "block"], how="left")
    return dict(
        method=method, threshold=threshold, **ratios, n_extreme=len(extreme),
        extreme_blocks=extreme[["layer", "block", "pruned_fraction"]].to_dict("records"),
        recommendation=asdict(rec), plan_settings=plan.settings, per_block=per_block.to_dict("records"),
    )


# ----------------------------------------------------------------------------------------------
# Block-removal loss
