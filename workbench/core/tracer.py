"""The one way the workbench looks inside a forward pass: hooks on named sites, only inside a `with`.

Sites are named from the family's `ArchSpec`, so no caller touches module paths or hook handles:

    residual        the input hidden states of each decoder layer (the residual stream)
    layer_output    the output hidden states of each decoder layer
    attn_input      the input of the query projection (what q, k and v read)
    attn_channels   the input of o_proj (the concatenated heads)
    mlp_input       the input of the gate projection (what gate and up read)
    mlp_block       the input of the MLP block itself (the same tensor; also there for an emptied MLP)
    mlp_channels    the input of down_proj (the intermediate channels)
    attn_output     the output of o_proj (the attention block's contribution to the residual stream)
    mlp_output      the output of down_proj (the MLP block's contribution to the residual stream)
    outputs         the output of every leaf module of every layer, reported as "output:<module path>"

`layer_calls(model, fn)` hands over what each decoder layer is called with (its positional and keyword
arguments), so a layer can be replayed on its own.

Inside `trace(model, sites, fn)` every forward pass calls `fn(layer, site, tensor)`; the hooks are
removed on exit, also when the block raises. An emptied block has no projection sites.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from workbench.core.arch import decoder_layers, get_spec, layer_parts

SITES = ("residual", "layer_output", "attn_input", "attn_channels", "mlp_input", "mlp_block", "mlp_channels",
         "attn_output", "mlp_output", "outputs")
_PROJECTION_OF = {"attn_input": "q", "attn_channels": "o", "mlp_input": "gate", "mlp_channels": "down"}
_OUTPUT_OF = {"attn_output": "o", "mlp_output": "down"}

Callback = Callable[[int, str, torch.Tensor], None]


def _input_hook(fn: Callback, layer: int, site: str):
    def hook(_module, args, kwargs=None):
        x = args[0] if args else (kwargs or {}).get("hidden_states")
        fn(layer, site, x)

    return hook


def _output_hook(fn: Callback, layer: int, site: str):
    def hook(_module, _args, out):
        t = out[0] if isinstance(out, tuple) else out
        if isinstance(t, torch.Tensor):
            fn(layer, site, t)

    return hook


@contextlib.contextmanager
def trace(model: nn.Module, sites: Iterable[str], fn: Callback) -> Iterator[None]:
    """Call `fn(layer, site, tensor)` at the given sites during every forward pass inside the block."""
    sites = tuple(sites)
    bad = [s for s in sites if s not in SITES]
    if bad:
        raise ValueError(f"sites {bad} are not traceable; allowed: {list(SITES)}")
    spec = get_spec(model)
    handles = []
    try:
        for i, layer in enumerate(decoder_layers(model, spec)):
            parts = layer_parts(layer, spec)
            for site in sites:
                if site == "residual":
                    handles.append(layer.register_forward_pre_hook(_input_hook(fn, i, site), with_kwargs=True))
                elif site == "layer_output":
                    handles.append(layer.register_forward_hook(_output_hook(fn, i, site)))
                elif site == "mlp_block":
                    handles.append(parts.mlp.register_forward_pre_hook(_input_hook(fn, i, site), with_kwargs=True))
                elif site == "outputs":
                    for name, mod in layer.named_modules():
                        if name and not list(mod.children()):
                            handles.append(mod.register_forward_hook(_output_hook(fn, i, f"output:{name}")))
                elif site in _OUTPUT_OF:
                    module = getattr(parts, _OUTPUT_OF[site])
                    if module is not None:
                        handles.append(module.register_forward_hook(_output_hook(fn, i, site)))
                else:
                    module = getattr(parts, _PROJECTION_OF[site])
                    if module is not None:
                        handles.append(module.register_forward_pre_hook(_input_hook(fn, i, site)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def layer_calls(model: nn.Module, fn: Callable[[int, tuple, dict], None]) -> Iterator[None]:
    """Call `fn(layer, args, kwargs)` with what every decoder layer is called with, inside the block.

    Used to replay layers one at a time (layer-wise reconstruction).
    """
    spec = get_spec(model)
    handles = []

    def hook_for(i):
        def hook(_module, args, kwargs):
            fn(i, args, kwargs)

        return hook

    try:
        for i, layer in enumerate(decoder_layers(model, spec)):
            handles.append(layer.register_forward_pre_hook(hook_for(i), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
