"""Pruning units and the parameters each one owns.

Attention unit = one KV head with the query heads that share it: its rows of q/k/v (and their
biases) and its columns of o_proj. MLP unit = one intermediate channel: its rows of gate/up (and
biases) and its column of down_proj. Every unit-indexed parameter is listed with the axis along
which units lie; importance, cost, zeroing and slicing all read this one list.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from workbench.core.arch import BLOCKS, ArchSpec, LayerParts, decoder_layers, get_spec, kv_groups, layer_parts, mlp_channels
from workbench.core.registry import choice_error


@dataclass(frozen=True)
class UnitParam:
    """One unit-indexed parameter: which module and attribute, and the axis along which units lie."""

    name: str  # e.g. "q.weight"
    module: nn.Linear
    attr: str  # "weight" or "bias"
    axis: int  # the dimension along which the block's units lie

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.attr)


def block_params(parts: LayerParts, block: str) -> list[UnitParam]:
    """The unit-indexed parameters of one block (empty for an emptied block)."""
    if block == "attn":
        mods = [("q", parts.q, 0), ("k", parts.k, 0), ("v", parts.v, 0), ("o", parts.o, 1)]
    elif block == "mlp":
        mods = [("gate", parts.gate, 0), ("up", parts.up, 0), ("down", parts.down, 1)]
    else:
        raise choice_error("block", block, BLOCKS)
    out = []
    for short, mod, axis in mods:
        if mod is None:
            return []
        out.append(UnitParam(f"{short}.weight", mod, "weight", axis))
        if axis == 0 and mod.bias is not None:  # row-wise biases belong to the unit; o/down biases do not
            out.append(UnitParam(f"{short}.bias", mod, "bias", 0))
    return out


def block_units(parts: LayerParts, block: str, head_dim: int) -> int:
    """How many units a block has now."""
    if block == "attn":
        return kv_groups(parts, head_dim)
    return mlp_channels(parts)


def reduce_to_units(t: torch.Tensor, axis: int, n_units: int) -> torch.Tensor:
    """Sum an elementwise tensor shaped like a unit parameter down to one value per unit."""
    if t.ndim == 2:
        t = t.sum(dim=1 - axis)
    return t.view(n_units, -1).sum(dim=1)


def unit_rows(units: torch.Tensor, axis_len: int, n_units: int) -> torch.Tensor:
    """Indices along a parameter's unit axis that belong to the given units (in the given order)."""
    per = axis_len // n_units
    return (units[:, None] * per + torch.arange(per, device=units.device)).reshape(-1)


def unit_cost(parts: LayerParts, block: str, head_dim: int) -> int:
    """Exact parameters one unit of this block removes."""
    n = block_units(parts, block, head_dim)
    if n == 0:
        return 0
    return sum(up.param.numel() // n for up in block_params(parts, block))


def iter_blocks(model: nn.Module, spec: ArchSpec | None = None):
    """Yield (layer_index, block, parts) for every layer and both blocks."""
    spec = spec or get_spec(model)
    for i, layer in enumerate(decoder_layers(model, spec)):
        parts = layer_parts(layer, spec)
        for block in BLOCKS:
            yield i, block, parts
