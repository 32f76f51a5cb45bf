"""Outliers in weights and activations, and what a pruning plan does to them.

* Weights, per layer and module: standard deviation, excess kurtosis, max |w| / std, share beyond k·σ,
  and log-count histograms.
* Activations over calibration data, streamed (only per-dimension running sums, maxima, counts and a
  fixed log-spaced histogram are kept, so any amount of data fits): per layer the residual stream and
  each block's input per hidden dimension, the MLP channels (input of `down_proj`) and the attention
  head dimensions (input of `o_proj`). Per dimension: max |x|, mean |x|, input norm, and how often
  |x| exceeds a threshold (6.0 as in LLM.int8 by default). Massive activations: top magnitudes against
  the median magnitude of the site.
* Units: each prunable unit's activation and weight outlier statistics, the outlier units a plan
  removes (with a warning), and an OWL-style per-layer allocation of the pruning ratio.
"""
from __future__ import annotations

import contextlib
import hashlib
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from workbench import models
from workbench.models import decoder_layers, geometry, get_spec, layer_parts
from workbench.selection import Plan

LLM_INT8_THRESHOLD = 6.0
SITES = ("residual", "attn_input", "mlp_input", "attn_channels", "mlp_channels")
# log10 |x| histogram shared by every site: mergeable across batches, quantiles to 1/20 decade.
HIST_EDGES = np.r_[0.0, 10.0 ** np.arange(-8, 6.001, 0.05)]


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
# Activations (streamed)


@dataclass
class SiteStats:
    """Mergeable statistics of one activation site (per dimension unless said otherwise)."""

    max_abs: torch.Tensor
    sum_abs: torch.Tensor
    sum_sq: torch.Tensor
    exceed: torch.Tensor  # how many tokens had |x| > threshold in this dimension
    hist: torch.Tensor  # counts of |x| over HIST_EDGES, all dimensions together
    tokens: int = 0

    @classmethod
    def empty(cls, dim: int) -> SiteStats:
        z = lambda: torch.zeros(dim, dtype=torch.float64)  # noqa: E731
        return cls(z(), z(), z(), z(), torch.zeros(len(HIST_EDGES) - 1, dtype=torch.float64))

    def update(self, x: torch.Tensor, threshold: float) -> None:
        a = x.detach().reshape(-1, x.shape[-1]).abs().double().cpu()
        self.max_abs = torch.maximum(self.max_abs, a.max(0).values)
        self.sum_abs += a.sum(0)
        self.sum_sq += (a * a).sum(0)
        self.exceed += (a > threshold).sum(0).double()
        idx = np.searchsorted(HIST_EDGES, a.reshape(-1).numpy(), side="right") - 1
        self.hist += torch.from_numpy(np.bincount(np.clip(idx, 0, len(HIST_EDGES) - 2),
                                                  minlength=len(HIST_EDGES) - 1).astype(np.float64))
        self.tokens += a.shape[0]

    def quantile(self, q: float) -> float:
        """|x| quantile from the histogram (upper bin edge: exact to 1/20 decade)."""
        c = self.hist.cumsum(0)
        i = int(torch.searchsorted(c, q * c[-1]))
        return float(HIST_EDGES[min(i + 1, len(HIST_EDGES) - 1)])


@dataclass
class ActivationStats:
    sites: dict[tuple[int, str], SiteStats]  # (layer, site) -> stats
    threshold: float
    n_layers: int
    samples: int
    key: str = ""

    def frame(self, site: str) -> pd.DataFrame:
        """Per layer and dimension: max |x|, mean |x|, RMS, share of tokens beyond the threshold."""
        rows = []
        for (layer, s), st in sorted(self.sites.items()):
            if s == site:
                rows.append(pd.DataFrame(dict(
                    layer=layer, dim=np.arange(len(st.max_abs)), max_abs=st.max_abs.numpy(),
                    mean_abs=(st.sum_abs / st.tokens).numpy(), rms=(st.sum_sq / st.tokens).sqrt().numpy(),
                    exceed_share=(st.exceed / st.tokens).numpy())))
        if not rows:
            raise ValueError(f"site={site!r} has no statistics; recorded: {sorted({s for _, s in self.sites})}")
        return pd.concat(rows, ignore_index=True)

    def massive(self, site: str = "residual", top: int = 3) -> pd.DataFrame:
        """Per layer: the `top` largest |x| dimensions and their ratio to the site's median |x|."""
        rows = []
        for (layer, s), st in sorted(self.sites.items()):
            if s != site:
                continue
            median = st.quantile(0.5)
            vals, dims = st.max_abs.topk(min(top, len(st.max_abs)))
            rows.append(dict(layer=layer, median_abs=median, top_dims=dims.tolist(), top_abs=vals.tolist(),
                             ratio_to_median=float(vals[0]) / median if median > 0 else float("inf")))
        return pd.DataFrame(rows)

    def outlier_dims(self, site: str = "residual", min_layers: int = 2) -> pd.DataFrame:
        """Dimensions whose max |x| exceeds the threshold in at least `min_layers` layers (LLM.int8 style)."""
        f = self.frame(site)
        hit = f[f.max_abs > self.threshold]
        out = hit.groupby("dim").agg(n_layers=("layer", "nunique"), layers=("layer", list), max_abs=("max_abs", "max"),
                                     mean_exceed_share=("exceed_share", "mean")).reset_index()
        return out[out.n_layers >= min_layers].sort_values(["n_layers", "max_abs"], ascending=False).reset_index(drop=True)


@contextlib.contextmanager
def recording(model: nn.Module, threshold: float = LLM_INT8_THRESHOLD):
    """Inside the block, every forward adds to the returned {(layer, site): SiteStats}; hooks go on exit."""
    spec = get_spec(model)
    stats: dict[tuple[int, str], SiteStats] = {}
    handles = []

    def hook(layer: int, site: str):
        def fn(_module, args, kwargs=None):
            x = args[0] if args else (kwargs or {}).get("hidden_states")
            key = (layer, site)
            if key not in stats:
                stats[key] = SiteStats.empty(x.shape[-1])
            stats[key].update(x, threshold)
        return fn

    try:
        for i, layer in enumerate(decoder_layers(model, spec)):
            parts = layer_parts(layer, spec)
            handles.append(layer.register_forward_pre_hook(hook(i, "residual"), with_kwargs=True))
            if parts.q is not None:
                handles.append(parts.q.register_forward_pre_hook(hook(i, "attn_input")))
                handles.append(parts.o.register_forward_pre_hook(hook(i, "attn_channels")))
            if parts.gate is not None:
                handles.append(parts.gate.register_forward_pre_hook(hook(i, "mlp_input")))
                handles.append(parts.down.register_forward_pre_hook(hook(i, "mlp_channels")))
        yield stats
    finally:
        for h in handles:
            h.remove()


def _key(model, samples, threshold) -> str:
    from workbench.data import fingerprint
    from workbench.importance import model_fingerprint

    return hashlib.sha1(f"{model_fingerprint(model)}|{fingerprint(samples)}|{tuple(samples.shape)}|{threshold}|"
                        f"{len(HIST_EDGES)}".encode()).hexdigest()[:20]


@torch.no_grad()
def activation_stats(model: nn.Module, samples: torch.Tensor, *, batch_size: int = 4,
                     threshold: float = LLM_INT8_THRESHOLD, progress: bool = True,
                     cache: bool = True) -> ActivationStats:
    """Stream the calibration samples through the model once; cached under data_cache/outliers/."""
    if not threshold > 0:
        raise ValueError(f"threshold={threshold} must be > 0")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be a positive integer")
    key = _key(model, samples, threshold)
    path = Path(models.DATA_CACHE) / "outliers" / f"{key}.pt"
    if cache and path.exists():
        d = torch.load(path, weights_only=False)
        return ActivationStats({k: SiteStats(**v) for k, v in d["sites"].items()}, d["threshold"], d["n_layers"],
                               d["samples"], key)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with recording(model, threshold) as stats:
            for s in tqdm(range(0, len(samples), batch_size), desc="activation statistics", disable=not progress,
                          leave=False):
                model(input_ids=samples[s : s + batch_size].to(device), use_cache=False)
    finally:
        model.train(was_training)
    result = ActivationStats(dict(stats), threshold, len(decoder_layers(model)), len(samples), key)
    if cache:
        from workbench.experiments import torch_save_atomic

        torch_save_atomic(dict(sites={k: asdict(v) for k, v in result.sites.items()}, threshold=threshold,
                               n_layers=result.n_layers, samples=result.samples), path)
    return result


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
            n_kv = parts.k.weight.shape[0] // geo.head_dim
            per = (parts.q.weight.shape[0] // geo.head_dim // n_kv) * geo.head_dim  # o_proj inputs per group
            act_max = st.max_abs.view(n_kv, per).max(1).values
            exceed = (st.exceed / st.tokens).view(n_kv, per).max(1).values
            wz = torch.stack([_max_z(parts.q.weight, per, n_kv, 0), _max_z(parts.k.weight, geo.head_dim, n_kv, 0),
                              _max_z(parts.v.weight, geo.head_dim, n_kv, 0), _max_z(parts.o.weight, per, n_kv, 1)]).max(0).values
            rows.append(pd.DataFrame(dict(layer=i, block="attn", unit=np.arange(n_kv), act_max=act_max.numpy(),
                                          exceed_share=exceed.numpy(), weight_max_z=wz.numpy())))
        if parts.gate is not None:
            st = acts.sites[(i, "mlp_channels")]
            n = parts.gate.weight.shape[0]
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


# ----------------------------------------------------------------------------------------------
# OWL-style allocation


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
