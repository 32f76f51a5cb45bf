"""Measured removal loss: the calibration-loss increase when blocks (or layers) are bypassed.

One dense pass keeps each target's first-layer input, so a target runs only the layers from there on
(`removal_losses`); `block_removal_loss` is the per-(layer, block) table the block correction of
`plans.normalize` reads, cached (kind `block_loss`).
"""
from __future__ import annotations

import contextlib
import os

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from workbench.core.arch import BLOCKS, EmptyBlock, decoder_layers, geometry, get_spec
from workbench.core.cache import cached, make_key
from workbench.core.loss import summed_nll, token_batches
from workbench.core.models import check_token_ids, eval_mode


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


def mean_loss(model: nn.Module, samples: torch.Tensor, batch_size: int) -> float:
    """Mean next-token NLL of `model` over token windows (the one loss loop, `core.loss`)."""
    total, count = summed_nll(model, token_batches(samples, batch_size))
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


def _layer_inputs(model: nn.Module, samples: torch.Tensor, batch_size: int, starts: set[int]):
    """One dense pass: (mean loss, {layer: [its input per batch]}) for the layers in `starts`."""
    inputs: dict[int, list[torch.Tensor]] = {s: [] for s in starts}

    def keep(out, _i):
        for s in starts:
            inputs[s].append(out.hidden_states[s])

    total, count = summed_nll(model, token_batches(samples, batch_size), keep=keep, output_hidden_states=True)
    return total / count, inputs


def _loss_from(model: nn.Module, samples: torch.Tensor, batch_size: int, start: int, inputs: list[torch.Tensor]) -> float:
    batches = ({"inputs_embeds": h, "labels": b["input_ids"]} for h, b in zip(inputs, token_batches(samples, batch_size)))
    with _from_layer(model, start):
        total, count = summed_nll(model, batches)
    return total / count


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

    Cached (`workbench.core.cache`, kind `block_loss`) by the model's content, the samples and the batch size.
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
