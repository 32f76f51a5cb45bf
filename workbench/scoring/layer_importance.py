"""How much each whole layer matters: one value per layer, cached, for per-layer allocation and depth pruning.

- `removal`: the calibration-loss increase when the whole layer is bypassed (both blocks add nothing), the
  layer-level twin of the block-removal loss (`scoring.removal.block_removal_loss`).
- `activation`: Block Influence, 1 − cos(x_in, x_out) of the residual stream around the layer, averaged over
  calibration tokens (ShortGPT, Men et al., 2024): one forward pass through the tracer.

`LAYER_IMPORTANCE` is the registry read by the allocation strategies, the baselines, notebooks and tests.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from workbench.core.arch import BLOCKS, decoder_layers, get_spec, layer_parts
from workbench.core.cache import cached, make_key
from workbench.core.models import check_token_ids, eval_mode
from workbench.core.registry import Registry
from workbench.core.tracer import trace
from workbench.scoring.activations import ActivationStats, activation_stats
from workbench.scoring.removal import removal_losses

CACHE_FORMAT = 1


def layer_removal_loss(model: nn.Module, samples: torch.Tensor, *, batch_size: int = 4, progress: bool = True,
                       cache: bool | str | os.PathLike = True) -> pd.Series:
    """Per layer: mean calibration loss with the layer bypassed minus the intact model's (cached, kind `layer_loss`)."""
    check_token_ids(samples, model, "calibration token ids")

    def compute() -> dict:
        targets = [[(layer, block) for block in BLOCKS] for layer in range(len(decoder_layers(model)))]
        base, out = removal_losses(model, samples, targets, batch_size=batch_size, progress=progress,
                                   desc="layer removal loss")
        return dict(values=out, base_loss=base)

    key = make_key(model=model, data=samples, settings=dict(batch_size=batch_size))
    d = cached("layer_loss", key, compute, cache=cache, version=CACHE_FORMAT)
    s = pd.Series(d["values"], index=pd.RangeIndex(len(d["values"]), name="layer"), name="removal")
    s.attrs["base_loss"] = d["base_loss"]
    return s


def block_influence(model: nn.Module, samples: torch.Tensor, *, batch_size: int = 4, progress: bool = True,
                    cache: bool | str | os.PathLike = True) -> pd.Series:
    """Per layer: ShortGPT's Block Influence 1 − mean over tokens of cos(x_in, x_out) (cached, kind `block_influence`)."""
    check_token_ids(samples, model, "calibration token ids")
    device = next(model.parameters()).device

    def compute() -> dict:
        n = len(decoder_layers(model))
        sums, tokens = torch.zeros(n, dtype=torch.float64), 0
        inputs: dict[int, torch.Tensor] = {}

        def add(layer: int, site: str, x: torch.Tensor) -> None:
            if site == "residual":
                inputs[layer] = x.detach()
            else:
                cos = torch.nn.functional.cosine_similarity(inputs.pop(layer).float(), x.detach().float(), dim=-1)
                sums[layer] += cos.double().sum().cpu()

        with eval_mode(model), torch.no_grad(), trace(model, ["residual", "layer_output"], add):
            for s in tqdm(range(0, len(samples), batch_size), desc="block influence", disable=not progress,
                          leave=False):
                batch = samples[s : s + batch_size].to(device)
                model(input_ids=batch, use_cache=False)
                tokens += batch.numel()
        return dict(values=(1 - sums / tokens).tolist())

    key = make_key(model=model, data=samples, settings=dict(batch_size=batch_size))
    d = cached("block_influence", key, compute, cache=cache, version=CACHE_FORMAT)
    return pd.Series(d["values"], index=pd.RangeIndex(len(d["values"]), name="layer"), name="activation")


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


def outlier_ratio(model: nn.Module, samples: torch.Tensor, *, batch_size: int = 4, progress: bool = True,
                  cache: bool | str | os.PathLike = True, m: float = 5.0) -> pd.Series:
    """Per layer: OWL's outlier ratio (Yin et al., 2024) from the streamed activation statistics (cached)."""
    acts = activation_stats(model, samples, batch_size=batch_size, progress=progress, cache=cache)
    values = layer_outlier_ratio(model, acts, m=m)
    return pd.Series(values, index=pd.RangeIndex(len(values), name="layer"), name="outlier_ratio")


@dataclass(frozen=True)
class LayerImportance:
    name: str
    description: str
    fn: Callable[..., pd.Series]


LAYER_IMPORTANCE: Registry[LayerImportance] = Registry.of("measure", [
    LayerImportance("removal", "calibration-loss increase when the whole layer is bypassed", layer_removal_loss),
    LayerImportance("activation", "Block Influence 1 − cos(x_in, x_out) of the residual stream (ShortGPT)",
                    block_influence),
    LayerImportance("outlier_ratio", "share of Wanda scores |w|·‖x‖ above m × the layer mean (OWL's outlier ratio)",
                    outlier_ratio),
])


def layer_importance(model: nn.Module, samples: torch.Tensor, measure: str = "removal", **kw) -> pd.Series:
    """One registered layer-importance measure (`LAYER_IMPORTANCE`), cached."""
    LAYER_IMPORTANCE.check(measure)
    return LAYER_IMPORTANCE[measure].fn(model, samples, **kw)


def check_layer_values(values, n_layers: int, what: str = "layer importance") -> np.ndarray:
    """A finite float array of one value per layer, or a clear error."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(v) != n_layers:
        raise ValueError(f"{what} has {len(v)} values; the model has {n_layers} layers (one value per layer)")
    if not np.isfinite(v).all():
        raise ValueError(f"{what} holds inf/NaN at layers {np.flatnonzero(~np.isfinite(v)).tolist()}")
    return v
