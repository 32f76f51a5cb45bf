"""OWL-style allocation (Yin et al., 2024): layers richer in outliers get a smaller share of the pruning.

`layer_outlier_ratio` is OWL's layerwise outlier distribution (share of Wanda scores |w|·‖x‖ above
M × the layer mean); `owl_ratios` turns it into per-layer ratios within ratio ± λ whose mean is the
ratio; `SelectionConfig(layer_ratios=...)` prunes each layer to its own ratio.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from workbench.activations import ActivationStats
from workbench.models import decoder_layers, get_spec, layer_parts
from workbench.plans import Plan


def layer_outlier_ratio(model: nn.Module, acts: ActivationStats, m: float = 5.0) -> np.ndarray:
    """Per layer: share of weights whose Wanda score |w|·‖x‖ exceeds m × the layer's mean score (OWL's LOD)."""
    if not m > 0:
        raise ValueError(f"m={m} must be > 0")
    spec = get_spec(model)
    out = []
    for i, layer in enumerate(decoder_layers(model, spec)):
        parts = layer_parts(layer, spec)
        scores = []
        for names, site in ((("q", "k", "v"), "attn_input"), (("o",), "attn_channels"),
                            (("gate", "up"), "mlp_input"), (("down",), "mlp_channels")):
            for name in names:
                lin = getattr(parts, name)
                if lin is not None:
                    norm = acts.sites[(i, site)].sum_sq.sqrt().float()
                    scores.append((lin.weight.detach().abs().float() * norm[None, :]).reshape(-1))
        if not scores:
            out.append(0.0)
            continue
        s = torch.cat(scores)
        out.append(float((s > m * s.mean()).double().mean()))
    return np.array(out)


def owl_ratios(outlier_ratio: np.ndarray, ratio: float, lam: float = 0.08) -> np.ndarray:
    """Per-layer ratios in [ratio − λ, ratio + λ], lower where outliers are more frequent, mean = ratio."""
    d = np.asarray(outlier_ratio, dtype=np.float64)
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio={ratio} must be in [0, 1)")
    if not 0 <= lam or ratio - lam < 0 or ratio + lam >= 1:
        raise ValueError(f"lam={lam}: ratio ± lam = [{ratio - lam:.3f}, {ratio + lam:.3f}] must stay in [0, 1)")
    span = d.max() - d.min()
    a = (d - d.min()) / span if span > 0 else np.full_like(d, 0.5)
    base = ratio + lam - 2 * lam * a
    lo, hi = -2 * lam, 2 * lam  # shift c so that mean(clip(base + c)) = ratio (monotone in c: bisection)
    for _ in range(100):
        c = (lo + hi) / 2
        if np.clip(base + c, ratio - lam, ratio + lam).mean() < ratio:
            lo = c
        else:
            hi = c
    return np.clip(base + (lo + hi) / 2, ratio - lam, ratio + lam)


def compare_allocation(global_plan: Plan, owl_plan: Plan, budget, outlier_ratio: np.ndarray) -> pd.DataFrame:
    """Per layer: outlier ratio and the pruned share of the layer's attention+MLP parameters under both plans."""
    def share(plan):
        out = []
        for i, (g, c) in enumerate(plan.widths):
            total = g * budget.costs["attn"][i] + c * budget.costs["mlp"][i]
            gone = len(plan.removed["attn"][i]) * budget.costs["attn"][i] + len(plan.removed["mlp"][i]) * budget.costs["mlp"][i]
            out.append(gone / total if total else np.nan)
        return np.array(out)

    return pd.DataFrame(dict(layer=np.arange(len(outlier_ratio)), outlier_ratio=outlier_ratio,
                             global_pruned=share(global_plan), owl_pruned=share(owl_plan)))
