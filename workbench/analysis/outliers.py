"""Outliers in weights, and the outlier units a pruning plan removes.

* Weights, per layer and module: standard deviation, excess kurtosis, max |w| / std, share beyond k·σ,
  and log-count histograms.
* Units: each prunable unit's activation (from `workbench.scoring.activations`) and weight outlier statistics,
  and the outlier units a plan removes (with a warning).

Activation statistics live in `workbench.scoring.activations`, the OWL-style allocation in `workbench.plans.allocation`.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch
from torch import nn

from workbench.core.arch import decoder_layers, geometry, get_spec, kv_groups, layer_parts, mlp_channels
from workbench.plans.plan import Plan
from workbench.scoring.activations import ActivationStats

# ----------------------------------------------------------------------------------------------
# Weights


def _module_table(model: nn.Module) -> list[tuple[int, str, torch.Tensor]]:
    """(layer, module, weight) for every weight outlier statistics cover; layer -1 = outside the stack."""
    spec = get_spec(model)
    rows = [(-1, "embeddings", model.get_input_embeddings().weight)]
    for i, layer in enumerate(decoder_layers(model, spec)):
        parts = layer_parts(layer, spec)
        for name in ("q", "k", "v", "o", "gate", "up", "down"):
            m = getattr(parts, name)
            if m is not None:
                rows.append((i, name, m.weight))
        for name, attr in (("input_norm", spec.input_norm), ("post_attn_norm", spec.post_attn_norm)):
            rows.append((i, name, getattr(layer, attr).weight))
    out = model.get_output_embeddings()
    if out is not None and out.weight is not model.get_input_embeddings().weight:
        rows.append((-1, "lm_head", out.weight))
    return rows


def tensor_stats(w: torch.Tensor, k_sigma: float = 6.0) -> dict:
    """std, excess kurtosis, max |w| / std and share beyond k·σ of one tensor (float64 moments)."""
    x = w.detach().reshape(-1).double()
    mu = x.mean()
    d = x - mu
    var = (d * d).mean()
    std = var.sqrt()
    kurt = float((d ** 4).mean() / (var * var) - 3.0) if var > 0 else float("nan")
    max_abs = float(x.abs().max())
    return dict(numel=x.numel(), mean=float(mu), std=float(std), kurtosis=kurt, max_abs=max_abs,
                max_over_std=max_abs / float(std) if std > 0 else float("inf"),
                beyond_k_sigma=float((d.abs() > k_sigma * std).double().mean()))


def weight_stats(model: nn.Module, k_sigma: float = 6.0) -> pd.DataFrame:
    """One row per layer and module (q, k, v, o, gate, up, down, norms; embeddings and lm_head as layer -1)."""
    if not k_sigma > 0:
        raise ValueError(f"k_sigma={k_sigma} must be > 0")
    rows = [dict(layer=i, module=name, **tensor_stats(w, k_sigma)) for i, name, w in _module_table(model)]
    return pd.DataFrame(rows)


def weight_histograms(model: nn.Module, bins: int = 121, modules: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Counts of weights per module kind (all layers together) on a symmetric range ±max |w| of that kind."""
    if bins < 2:
        raise ValueError(f"bins={bins} must be >= 2")
    by_kind: dict[str, list[torch.Tensor]] = {}
    for _, name, w in _module_table(model):
        if modules is None or name in modules:
            by_kind.setdefault(name, []).append(w.detach().reshape(-1).float())
    rows = []
    for name, ws in by_kind.items():
        lim = max(float(w.abs().max()) for w in ws)
        counts = sum(torch.histc(w, bins=bins, min=-lim, max=lim) for w in ws)
        edges = np.linspace(-lim, lim, bins + 1)
        rows.append(pd.DataFrame(dict(module=name, left=edges[:-1], right=edges[1:], count=counts.numpy())))
    return pd.concat(rows, ignore_index=True)


# ----------------------------------------------------------------------------------------------
# Units and plans


UNIT_ACT_FACTOR = 10.0
UNIT_K_SIGMA = 16.0


def unit_outliers(model: nn.Module, acts: ActivationStats, k_sigma: float = UNIT_K_SIGMA,
                  act_factor: float = UNIT_ACT_FACTOR) -> pd.DataFrame:
    """Per prunable unit: the largest |activation| it carries, its share of tokens beyond the threshold,
    and the largest |w − mean| / σ among its weights (σ of the whole module).

    `is_outlier`: a massive channel (act_max ≥ act_factor × the median act_max of the units of the same
    layer and block) or an outlier weight (weight_max_z > k_sigma). Both bounds are relative because an
    absolute |x| > 6 or a 6σ weight is common in heavy-tailed LLM weights and intermediate activations
    (SmolLM2: 6σ flags 3,076 of 46,080 MLP channels; 16σ flags 48, ≥ 10 × median flags 64).
    Attention units are KV groups: their activations are the o_proj input dimensions of their query heads.
    """
    if not k_sigma > 0 or not act_factor > 1:
        raise ValueError(f"k_sigma={k_sigma} must be > 0 and act_factor={act_factor} > 1")
    spec = get_spec(model)
    geo = geometry(model.config)
    rows = []
    for i, layer in enumerate(decoder_layers(model, spec)):
        parts = layer_parts(layer, spec)
        if parts.q is not None:
            st = acts.sites[(i, "attn_channels")]
            n_kv = kv_groups(parts, geo.head_dim)
            per = parts.q.weight.shape[0] // n_kv  # o_proj inputs per group (its query heads × head_dim)
            act_max = st.max_abs.view(n_kv, per).max(1).values
            exceed = (st.exceed / st.tokens).view(n_kv, per).max(1).values
            wz = torch.stack([_max_z(parts.q.weight, per, n_kv, 0), _max_z(parts.k.weight, geo.head_dim, n_kv, 0),
                              _max_z(parts.v.weight, geo.head_dim, n_kv, 0), _max_z(parts.o.weight, per, n_kv, 1)]).max(0).values
            rows.append(pd.DataFrame(dict(layer=i, block="attn", unit=np.arange(n_kv), act_max=act_max.numpy(),
                                          exceed_share=exceed.numpy(), weight_max_z=wz.numpy())))
        if parts.gate is not None:
            st = acts.sites[(i, "mlp_channels")]
            n = mlp_channels(parts)
            wz = torch.stack([_max_z(parts.gate.weight, 1, n, 0), _max_z(parts.up.weight, 1, n, 0),
                              _max_z(parts.down.weight, 1, n, 1)]).max(0).values
            rows.append(pd.DataFrame(dict(layer=i, block="mlp", unit=np.arange(n), act_max=st.max_abs.numpy(),
                                          exceed_share=(st.exceed / st.tokens).numpy(), weight_max_z=wz.numpy())))
    table = pd.concat(rows, ignore_index=True)
    median = table.groupby(["layer", "block"]).act_max.transform("median")
    table["act_over_median"] = table.act_max / median
    table["is_outlier"] = (table.act_over_median >= act_factor) | (table.weight_max_z > k_sigma)
    return table


def _max_z(w: torch.Tensor, width: int, n_units: int, axis: int) -> torch.Tensor:
    """Per unit (a run of `width` rows, or columns with axis=1): max |w − mean| / std of the whole module."""
    w = w.detach().double()
    z = (w - w.mean()).abs() / w.std(correction=0)
    z = z if axis == 0 else z.T
    return z.reshape(n_units, width, -1).amax(dim=(1, 2)).float()


def plan_outliers(plan: Plan, units: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(removed vs kept statistics per block and overall, the removed units that carry an outlier)."""
    removed = np.zeros(len(units), dtype=bool)
    lookup = {(l, b, u): k for k, (l, b, u) in enumerate(zip(units.layer, units.block, units.unit))}
    for block in ("attn", "mlp"):
        for layer, gone in enumerate(plan.removed[block]):
            for u in gone:
                removed[lookup[(layer, block, u)]] = True
    t = units.assign(removed=removed)
    rows = []
    for block, g in [*t.groupby("block"), ("all", t)]:
        for flag, part in (("removed", g[g.removed]), ("kept", g[~g.removed])):
            rows.append(dict(block=block, part=flag, units=len(part), outlier_units=int(part.is_outlier.sum()),
                             mean_act_max=float(part.act_max.mean()) if len(part) else np.nan,
                             max_act_max=float(part.act_max.max()) if len(part) else np.nan,
                             mean_weight_max_z=float(part.weight_max_z.mean()) if len(part) else np.nan))
    flagged = t[t.removed & t.is_outlier].drop(columns="removed").reset_index(drop=True)
    return pd.DataFrame(rows), flagged


def warn_removed_outliers(plan: Plan, units: pd.DataFrame, show: int = 10) -> pd.DataFrame:
    """Warn, naming them, when the plan removes units that carry outliers; returns those units."""
    _, flagged = plan_outliers(plan, units)
    if len(flagged):
        names = ", ".join(f"layer {r.layer} {r.block} unit {r.unit} (act {r.act_max:.1f}, w z {r.weight_max_z:.1f})"
                          for r in flagged.head(show).itertuples())
        more = f" and {len(flagged) - show} more" if len(flagged) > show else ""
        warnings.warn(f"the plan removes {len(flagged)} outlier unit(s): {names}{more}", stacklevel=2)
    return flagged
