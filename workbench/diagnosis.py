"""Diagnosis of gradient and importance scales across layers, and measured block-removal loss.

Gradient scales differ by orders of magnitude between layers, so a plain global ranking can prune a
few layers almost completely. This module measures that (per-layer statistics, the largest-over-
smallest ratios, the blocks a plan prunes beyond a threshold) and recommends a correction following
the rules of thumb of the GAQ-Aware-Prune study (mean_ratio > 1000 → log; more than 5 extreme blocks →
log + clipping; 100–1000 → minmax or sqrt; < 100 → none, or temperature 1).
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

from workbench.cache import cached, make_key
from workbench.methods import Importance
from workbench.models import BLOCKS, EmptyBlock, check_token_ids, decoder_layers, eval_mode, geometry, get_spec
from workbench.plans import Plan, layer_summary

EXTREME_THRESHOLD = 0.9


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


def extreme_blocks(plan: Plan, threshold: float = EXTREME_THRESHOLD) -> pd.DataFrame:
    """Blocks whose pruned fraction exceeds `threshold` under `plan`."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold} must be in (0, 1]")
    s = layer_summary(plan)
    return s[s.pruned_fraction > threshold].reset_index(drop=True)


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


@contextlib.contextmanager
def bypassed(model: nn.Module, layer: int, block: str):
    """Inside the block, one layer's attention or MLP adds nothing to the residual stream."""
    spec = get_spec(model)
    target = decoder_layers(model, spec)[layer]
    name = spec.attn if block == "attn" else spec.mlp
    original = getattr(target, name)
    setattr(target, name, EmptyBlock(block, getattr(original, "layer_idx", layer), geometry(model.config).head_dim))
    try:
        yield
    finally:
        setattr(target, name, original)


@torch.no_grad()
def mean_loss(model: nn.Module, samples: torch.Tensor, batch_size: int) -> float:
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(samples), batch_size):
        b = samples[start : start + batch_size].to(device)
        total += float(model(input_ids=b, labels=b, use_cache=False).loss) * len(b)
        count += len(b)
    return total / count


INPUT_CACHE_BYTES = 2 * 2**30  # layer inputs kept for the removal losses up to this size; beyond, full passes


@contextlib.contextmanager
def _from_layer(model: nn.Module, start: int):
    """Inside, the model runs only its decoder layers from `start` on (feed it that layer's input as
    `inputs_embeds`): a removal loss then skips the layers before the first bypassed block."""
    spec = get_spec(model)
    parent_path, _, attr = spec.layers.rpartition(".")
    parent = model.get_submodule(parent_path)
    layers = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList(list(layers)[start:]))
    try:
        yield
    finally:
        setattr(parent, attr, layers)


@torch.no_grad()
def _layer_inputs(model: nn.Module, samples: torch.Tensor, batch_size: int, starts: set[int]):
    """One dense pass: (mean loss, {layer: [its input per batch]}) for the layers in `starts`."""
    device = next(model.parameters()).device
    inputs: dict[int, list[torch.Tensor]] = {s: [] for s in starts}
    total = 0.0
    for start in range(0, len(samples), batch_size):
        b = samples[start : start + batch_size].to(device)
        out = model(input_ids=b, labels=b, use_cache=False, output_hidden_states=True)
        total += float(out.loss) * len(b)
        for s in starts:
            inputs[s].append(out.hidden_states[s])
    return total / len(samples), inputs


@torch.no_grad()
def _loss_from(model: nn.Module, samples: torch.Tensor, batch_size: int, start: int, inputs: list[torch.Tensor]) -> float:
    device = next(model.parameters()).device
    total = 0.0
    with _from_layer(model, start):
        for i, first in enumerate(range(0, len(samples), batch_size)):
            b = samples[first : first + batch_size].to(device)
            total += float(model(inputs_embeds=inputs[i], labels=b, use_cache=False).loss) * len(b)
    return total / len(samples)


def removal_losses(model: nn.Module, samples: torch.Tensor, targets: list[list[tuple[int, str]]], *,
                   batch_size: int = 4, progress: bool = True, desc: str = "removal loss") -> tuple[float, list[float]]:
    """(intact calibration loss, loss increase with each target's (layer, block) list bypassed together).

    The input of each target's first layer is kept from one dense pass, so a target runs only the layers
    from there on: about half the work of full passes for one block per target. Above `INPUT_CACHE_BYTES`
    of kept inputs it falls back to full passes (the same numbers).
    """
    starts = {min(layer for layer, _ in t) for t in targets if t}
    hidden = geometry(model.config).hidden
    itemsize = next(model.parameters()).element_size()
    fits = samples.numel() * hidden * itemsize * len(starts) <= INPUT_CACHE_BYTES
    with eval_mode(model):
        if fits:
            base, inputs = _layer_inputs(model, samples, batch_size, starts)
        else:
            base, inputs = mean_loss(model, samples, batch_size), None
        out = []
        for target in tqdm(targets, desc=desc, disable=not progress, leave=False):
            with contextlib.ExitStack() as stack:
                for layer, block in target:
                    stack.enter_context(bypassed(model, layer, block))
                if inputs is not None and target:
                    start = min(layer for layer, _ in target)
                    out.append(_loss_from(model, samples, batch_size, start, inputs[start]) - base)
                else:
                    out.append(mean_loss(model, samples, batch_size) - base)
    return base, out


def block_removal_loss(model: nn.Module, samples: torch.Tensor, *, batch_size: int = 4, progress: bool = True,
                       cache: bool | str | os.PathLike = True) -> pd.DataFrame:
    """Calibration-loss increase when each block is bypassed: one row per (layer, block), plus `base_loss`.

    Cached (`workbench.cache`, kind `block_loss`) by the model's content, the samples and the batch size.
    """
    check_token_ids(samples, model, "calibration token ids")

    def compute() -> pd.DataFrame:
        targets = [[(layer, block)] for layer in range(len(decoder_layers(model))) for block in BLOCKS]
        base, losses = removal_losses(model, samples, targets, batch_size=batch_size, progress=progress,
                                      desc="block removal loss")
        df = pd.DataFrame([dict(layer=t[0][0], block=t[0][1], removal_loss=v) for t, v in zip(targets, losses)])
        df["base_loss"] = base  # the unbypassed calibration loss, kept in the cache too
        return df

    key = make_key(model=model, data=samples, settings=dict(batch_size=batch_size))
    return cached("block_loss", key, compute, cache=cache, encode=lambda df: df.to_dict("list"),
                  decode=pd.DataFrame)
