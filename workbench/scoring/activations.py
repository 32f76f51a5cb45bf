"""Activation statistics over calibration data, streamed: nothing but per-dimension sums, maxima and counts.

Per layer, at the tracer's sites (`workbench.core.tracer`): the residual stream, each block's input, the MLP
channels (input of `down_proj`) and the attention head dimensions (input of `o_proj`). Per dimension:
max |x|, Σ|x|, Σx², how often |x| exceeds a threshold (6.0 as in LLM.int8 by default), and one
log-spaced |x| histogram per site, so any amount of data fits. Massive activations: the top magnitudes
against the median magnitude of the site.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from workbench.core.arch import decoder_layers
from workbench.core.cache import cached, make_key
from workbench.core.models import check_token_ids, eval_mode
from workbench.core.tracer import trace

LLM_INT8_THRESHOLD = 6.0
SITES = ("residual", "attn_input", "mlp_input", "attn_channels", "mlp_channels")
# log10 |x| histogram shared by every site: mergeable across batches, quantiles to 1/20 decade.
HIST_EDGES = np.r_[0.0, 10.0 ** np.arange(-8, 6.001, 0.05)]


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
    """Inside the block, every forward adds to the returned {(layer, site): SiteStats} (sites: `SITES`)."""
    stats: dict[tuple[int, str], SiteStats] = {}

    def add(layer: int, site: str, x: torch.Tensor) -> None:
        key = (layer, site)
        if key not in stats:
            stats[key] = SiteStats.empty(x.shape[-1])
        stats[key].update(x, threshold)

    with trace(model, SITES, add):
        yield stats


def _encode(result: ActivationStats) -> dict:
    return dict(sites={k: asdict(v) for k, v in result.sites.items()}, threshold=result.threshold,
                n_layers=result.n_layers, samples=result.samples, key=result.key)


def _decode(d: dict) -> ActivationStats:
    return ActivationStats({k: SiteStats(**v) for k, v in d["sites"].items()}, d["threshold"], d["n_layers"],
                           d["samples"], d["key"])


@torch.no_grad()
def activation_stats(model: nn.Module, samples: torch.Tensor, *, batch_size: int = 4,
                     threshold: float = LLM_INT8_THRESHOLD, progress: bool = True,
                     cache: bool | str | os.PathLike = True) -> ActivationStats:
    """Stream the calibration samples through the model once; cached (`workbench.core.cache`, kind `activations`)."""
    if not threshold > 0:
        raise ValueError(f"threshold={threshold} must be > 0")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be a positive integer")
    check_token_ids(samples, model, "calibration token ids")
    key = make_key(model=model, data=samples, settings=dict(threshold=threshold, bins=len(HIST_EDGES)))

    def compute() -> ActivationStats:
        device = next(model.parameters()).device
        with eval_mode(model), recording(model, threshold) as stats:
            for s in tqdm(range(0, len(samples), batch_size), desc="activation statistics", disable=not progress,
                          leave=False):
                model(input_ids=samples[s : s + batch_size].to(device), use_cache=False)
        return ActivationStats(dict(stats), threshold, len(decoder_layers(model)), len(samples), key)

    return cached("activations", key, compute, cache=cache, encode=_encode, decode=_decode)
