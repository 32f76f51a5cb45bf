"""Applying a plan: physical slicing, emptied blocks, depth pruning and zeroing.

`apply_plan` slices weights in place so the model is really smaller. A block left with no unit is
replaced by `EmptyBlock`, which adds nothing to the residual stream (an emptied attention block
still records zero-head keys/values so the KV cache keeps counting positions). A layer whose
attention and MLP are both empty is removed and the rest re-indexed. `mask_plan` zeroes the same
units in a dense model: the two must compute the same logits (the project's core invariant).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from workbench.core.arch import ArchSpec, EmptyBlock, Geometry, decoder_layers, geometry, get_spec, layer_parts, layer_widths
from workbench.core.models import parameter_count, verify_decoding
from workbench.core.units import BLOCKS, block_params, block_units, unit_rows
from workbench.plans.plan import Plan
from workbench.plans.selection import prunable_params, unit_costs

LAYERS_KEY = "pruned_layers"  # config attribute: per-layer query heads, KV heads, MLP width


@dataclass(frozen=True)
class PruneReport:
    """What `apply_plan` did: parameters before/after (all, and attention + MLP), removed layers, emptied blocks."""

    params_before: int
    params_after: int
    prunable_before: int
    prunable_after: int
    removed_layers: list[int]
    emptied_blocks: list[tuple[int, str]]

    @property
    def ratio_total(self) -> float:
        return 1 - self.params_after / self.params_before

    @property
    def ratio_prunable(self) -> float:
        return 1 - self.prunable_after / self.prunable_before

    def to_dict(self) -> dict:
        return dict(asdict(self), ratio_total=self.ratio_total, ratio_prunable=self.ratio_prunable)


def check_plan(model: nn.Module, plan: Plan, what: str = "the model") -> None:
    """The one plan-against-model check: refuse a plan made for other layer widths than `model` has (another
    model, or this one pruned after the plan was made), or one that removes every layer. `what` names the model
    in the message (e.g. "`dense`")."""
    widths = layer_widths(model)
    if [tuple(w) for w in plan.widths] != widths:
        raise ValueError(
            f"the plan was not made for {what}: the plan was made for layer widths {plan.widths[:4]}… "
            f"({plan.n_layers} layers) but {what} has "
            f"{widths[:4]}… ({len(widths)} layers): make the plan from this model; if the model was pruned after "
            "the plan was made (e.g. by a later notebook cell), use the unpruned model (load it again, or run the "
            "cells in order)"
        )
    if len(plan.removed_layers()) == plan.n_layers:
        raise ValueError("the plan removes every layer; keep at least one unit somewhere")


def _slice_block(parts, block: str, keep: torch.Tensor, geo: Geometry) -> None:
    n = block_units(parts, block, geo.head_dim)
    for up in block_params(parts, block):
        old = up.param
        rows = unit_rows(keep.to(old.device), old.shape[up.axis], n)
        new = nn.Parameter(old.detach().index_select(up.axis, rows).contiguous(), requires_grad=old.requires_grad)
        setattr(up.module, up.attr, new)
        if up.attr == "weight":
            up.module.out_features, up.module.in_features = new.shape


def shape_layer(layer: nn.Module, spec: ArchSpec, geo: Geometry, layer_idx: int,
                 keep: dict[str, torch.Tensor]) -> None:
    """Keep the given units of each block of one layer; a block with none left becomes EmptyBlock."""
    for block in BLOCKS:
        parts = layer_parts(layer, spec)
        n = block_units(parts, block, geo.head_dim)
        kept = keep[block]
        if kept.numel() == n:
            continue
        if kept.numel() == 0:
            name = spec.attn if block == "attn" else spec.mlp
            setattr(layer, name, EmptyBlock(block, layer_idx, geo.head_dim))
        else:
            _slice_block(parts, block, kept, geo)


def _set_layer_indices(model: nn.Module, spec: ArchSpec) -> None:
    for i, layer in enumerate(decoder_layers(model, spec)):
        getattr(layer, spec.attn).layer_idx = i


def output_bias(layer: nn.Module, spec: ArchSpec, block: str) -> nn.Parameter | None:
    """The bias a block adds after its units (o_proj / down_proj bias, or an emptied block's constant)."""
    parts = layer_parts(layer, spec)
    module = parts.block(block)
    return module.bias if isinstance(module, EmptyBlock) else parts.out_proj(block).bias


def add_output_bias(layer: nn.Module, spec: ArchSpec, block: str, hidden: int) -> nn.Parameter:
    """Give a block an output bias (zeros) if it has none, and return it (bias compensation, reconstruction)."""
    existing = output_bias(layer, spec, block)
    if existing is not None:
        return existing
    parts = layer_parts(layer, spec)
    module = parts.block(block)
    target = module if isinstance(module, EmptyBlock) else parts.out_proj(block)
    like = next((p for p in layer.parameters()), None)
    target.bias = nn.Parameter(torch.zeros(hidden, dtype=like.dtype, device=like.device), requires_grad=False)
    return target.bias


def record_layer_config(model: nn.Module) -> list[dict]:
    """Write per-layer widths into the config; a uniform model also gets standard config fields.

    A block with an output bias its family would not have (added by reconstruction) is recorded as
    `attn_out_bias` / `mlp_out_bias`, so the loader re-creates it.
    """
    spec, geo = get_spec(model), geometry(model.config)
    widths = layer_widths(model)
    layers = [dict(num_attention_heads=g * geo.gqa_ratio, num_key_value_heads=g, intermediate_size=c)
              for g, c in widths]
    family_bias = {"attn": geo.o_bias, "mlp": geo.mlp_bias}
    for entry, layer in zip(layers, decoder_layers(model, spec)):
        for block in BLOCKS:
            if output_bias(layer, spec, block) is not None and not (family_bias[block] and _has_units(entry, block)):
                entry[f"{block}_out_bias"] = True
    cfg = model.config
    setattr(cfg, LAYERS_KEY, layers)
    cfg.head_dim = geo.head_dim  # explicit: head counts may change, head_dim never does
    uniform = len(set(widths)) == 1 and widths[0][0] > 0 and widths[0][1] > 0
    # Standard fields only where the family's config validation accepts them (Llama-style configs
    # demand hidden_size % num_attention_heads == 0); otherwise only the workbench loader reads it.
    if uniform and geo.hidden % (widths[0][0] * geo.gqa_ratio) == 0:
        g, c = widths[0]
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size = g * geo.gqa_ratio, g, c
    return layers


def _has_units(entry: dict, block: str) -> bool:
    return (entry["num_key_value_heads"] if block == "attn" else entry["intermediate_size"]) > 0


def apply_plan(model: nn.Module, plan: Plan, check_decoding: bool = True) -> PruneReport:
    """Physically remove the plan's units from `model` (in place) and drop emptied layers.

    >>> from workbench import load_model
    >>> model, _ = load_model("tiny")
    >>> report = apply_plan(model, Plan.from_units(layer_widths(model), {"mlp": {0: [0, 1, 2]}}))
    >>> report.params_before - report.params_after == 3 * 3 * model.config.hidden_size
    True


    When the result relies on transformers internals to decode (an emptied attention, per-layer KV heads,
    removed layers), a few tokens are decoded once with the KV cache and against a full pass; a mismatch
    raises `compat.DecodingCheckError` naming the transformers version (`check_decoding=False` skips it).
    """
    check_plan(model, plan)
    spec, geo = get_spec(model), geometry(model.config)
    costs = unit_costs(model)
    prunable_before = prunable_params(costs, plan.widths)
    params_before = parameter_count(model)
    layers = decoder_layers(model, spec)
    for i, layer in enumerate(layers):
        keep = {b: torch.tensor(plan.kept(b, i), dtype=torch.long) for b in BLOCKS}
        shape_layer(layer, spec, geo, i, keep)
    gone = plan.removed_layers()
    if gone:
        kept_idx = [i for i in range(len(layers)) if i not in gone]
        parent_path, _, attr = spec.layers.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, attr, nn.ModuleList([layers[i] for i in kept_idx]))
        model.config.num_hidden_layers = len(kept_idx)
        if getattr(model.config, "layer_types", None) is not None:
            model.config.layer_types = [model.config.layer_types[i] for i in kept_idx]
        _set_layer_indices(model, spec)
    record_layer_config(model)
    if check_decoding:
        verify_decoding(model, ["removed layers"] if gone else [])
    new_costs = unit_costs(model)
    return PruneReport(
        params_before=params_before,
        params_after=parameter_count(model),
        prunable_before=prunable_before,
        prunable_after=prunable_params(new_costs, layer_widths(model)),
        removed_layers=gone,
        emptied_blocks=[e for e in plan.emptied_blocks() if e[0] not in gone],
    )


@torch.no_grad()
def mask_plan(model: nn.Module, plan: Plan) -> None:
    """Zero the plan's units in place (shapes unchanged); an emptied block's output becomes exactly 0."""
    check_plan(model, plan)
    spec, geo = get_spec(model), geometry(model.config)
    for i, layer in enumerate(decoder_layers(model, spec)):
        parts = layer_parts(layer, spec)
        for block in BLOCKS:
            gone = torch.tensor(plan.removed[block][i], dtype=torch.long)
            if gone.numel() == 0:
                continue
            n = block_units(parts, block, geo.head_dim)
            for up in block_params(parts, block):
                rows = unit_rows(gone.to(up.param.device), up.param.shape[up.axis], n)
                up.param.index_fill_(up.axis, rows, 0.0)
            if gone.numel() == n:  # biases added after the units (o_proj / down_proj) go too
                out_proj = parts.out_proj(block)
                if out_proj.bias is not None:
                    out_proj.bias.zero_()
