"""The modelling code a self-contained pruned checkpoint carries: per-layer widths on top of transformers' own
Llama / Mistral / Qwen2 / Qwen3 classes, the block that stands in for an emptied one, and its KV-cache layer.

This file imports only torch and transformers (>= 5.23, for `per_layer_config`): `deploy.hf.export_hf` copies it
into the checkpoint as `modeling_pruned.py`, where `AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)` runs it without the workbench installed. The workbench itself uses the same `EmptyBlock`
and `PositionsOnlyCacheLayer` (through `core.arch`), so the checkpoint computes what the pruned model computed.

The checkpoint's config is transformers' heterogeneous form: global attributes of the dense model, and
`per_layer_config` {layer: {num_attention_heads, num_key_value_heads, intermediate_size, skip, ...}} where `skip`
lists the emptied blocks ("self_attn", "mlp") and `attn_out_bias` / `mlp_out_bias` mark output biases a
reconstruction (or FLAP's compensation) added.
"""
from __future__ import annotations

import importlib

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

# model_type -> the class-name prefix of transformers' modelling module for it
FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
ATTN, MLP = "self_attn", "mlp"  # the attribute names of a decoder layer's blocks in these families


def find_cache(args: tuple, kwargs: dict) -> Cache | None:
    """The KV cache among a module call's arguments, found by its type (transformers 5.24 renamed the
    `past_key_values` keyword to `cache`; a positional cache counts too)."""
    for value in (*kwargs.values(), *args):
        if isinstance(value, Cache):
            return value
    return None


class PositionsOnlyCacheLayer(DynamicLayer):
    """The KV-cache layer of an emptied attention block: zero heads, but it counts the positions seen.

    transformers reads the cache's length from layer 0 (`DynamicLayer.get_seq_length` answers 0 when
    its keys hold no element), so a model whose first attention is emptied would decode every new
    token at position 0. This layer answers with the positions it was given.
    """

    def __init__(self):
        super().__init__()
        self.positions = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        out = super().update(key_states, value_states, *args, **kwargs)
        self.positions += key_states.shape[-2]
        return out

    def get_seq_length(self) -> int:
        return self.positions

    def crop(self, length: int) -> None:
        """Keep the first `length` positions (length >= 0), or drop the last -length (length < 0).

        transformers before 5.24 passes either form; 5.24 passes only the negative one."""
        keep = length if length >= 0 else max(0, self.positions + length)
        if self.is_initialized:
            self.keys, self.values = self.keys[..., :keep, :], self.values[..., :keep, :]
        self.positions = keep

    def reset(self) -> None:
        self.positions = 0
        super().reset()


class EmptyBlock(nn.Module):
    """Stands in for an attention or MLP block with no units left: its output is zero.

    An emptied attention block still records zero-head keys/values in the KV cache, through a
    `PositionsOnlyCacheLayer`, so the cache keeps counting positions whichever layer it is asked.
    `bias` (None unless set, e.g. by reconstruction) is a constant the block adds to the residual stream.
    """

    def __init__(self, kind: str, layer_idx: int | None = None, head_dim: int | None = None):
        super().__init__()
        if kind not in ("attn", "mlp"):
            raise ValueError(f"kind={kind!r}: an emptied block is an 'attn' or an 'mlp' block")
        self.kind, self.layer_idx, self.head_dim = kind, layer_idx, head_dim
        self.bias: nn.Parameter | None = None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = torch.zeros_like(hidden_states)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        if self.kind == "mlp":
            return out
        cache = find_cache(args, kwargs)  # by type: transformers renamed the keyword (past_key_values -> cache)
        if cache is not None:  # zero heads, but the cache still advances by this many positions
            layers = getattr(cache, "layers", None)
            if layers is not None and type(layers[self.layer_idx]) is DynamicLayer:
                layers[self.layer_idx] = PositionsOnlyCacheLayer()
            b, s = hidden_states.shape[:2]
            empty = hidden_states.new_zeros(b, 0, s, self.head_dim)
            cache.update(empty, empty, self.layer_idx)
        return out, None

    def extra_repr(self) -> str:
        return f"kind={self.kind}, layer_idx={self.layer_idx}"


def _modeling(model_type: str):
    return importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")


def shape_from_per_layer_config(model: nn.Module, config) -> None:
    """Give every decoder layer of a dense-built `model` its own widths from `config.per_layer_config`:
    the family's attention and MLP built from the layer's config, `EmptyBlock` for a skipped block, and
    zero output biases where the layer records one (its weights then load over them)."""
    module = _modeling(config.model_type)
    prefix = FAMILIES[config.model_type]
    attention, mlp = getattr(module, f"{prefix}Attention"), getattr(module, f"{prefix}MLP")
    hidden, head_dim = config.hidden_size, config.head_dim
    for i, layer in enumerate(model.model.layers):
        lc = config.per_layer_config[i]
        skip = set(getattr(lc, "skip", None) or ())
        setattr(layer, ATTN, EmptyBlock("attn", i, head_dim) if ATTN in skip else attention(lc, i))
        setattr(layer, MLP, EmptyBlock("mlp", i, head_dim) if MLP in skip else mlp(lc))
        for block, name, proj in (("attn", ATTN, "o_proj"), ("mlp", MLP, "down_proj")):
            if getattr(lc, f"{block}_out_bias", False):
                owner = getattr(layer, name)
                owner = owner if isinstance(owner, EmptyBlock) else getattr(owner, proj)
                owner.bias = nn.Parameter(torch.zeros(hidden))


def _pruned_class(model_type: str) -> type:
    prefix = FAMILIES[model_type]
    base = getattr(_modeling(model_type), f"{prefix}ForCausalLM")

    def __init__(self, config):
        config.allow_global_per_layer_attribute_access = True  # the dense skeleton, then each layer's widths
        base.__init__(self, config)
        shape_from_per_layer_config(self, config)

    name = f"Pruned{prefix}ForCausalLM"
    return type(name, (base,), {"__init__": __init__, "__module__": __name__, "__qualname__": name})


PrunedLlamaForCausalLM = _pruned_class("llama")
PrunedMistralForCausalLM = _pruned_class("mistral")
PrunedQwen2ForCausalLM = _pruned_class("qwen2")
PrunedQwen3ForCausalLM = _pruned_class("qwen3")
