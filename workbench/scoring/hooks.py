"""The calibration pass's hooks, each only inside its context manager: input-norm sums through the tracer,
the squared gradients of the blocks' outputs, gradients only for prunable weights, per-window gradient taps,
and each parameter's gradient reduced to per-unit terms as soon as backward has accumulated it
(`param_terms`, eager or under `torch.compile`)."""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from workbench.core.registry import check_choice
from workbench.core.tracer import trace
from workbench.core.units import block_params, iter_blocks
from workbench.data.text import ACCUMULATIONS

# The traced input of each block's output projection (FLAP's fluctuation and the channel sums).
CHANNEL_SITES = {"attn": "attn_channels", "mlp": "mlp_channels"}
CHANNEL_BLOCKS = {site: block for block, site in CHANNEL_SITES.items()}  # the other way: traced site -> block


@contextlib.contextmanager
def input_sq_norms(model: nn.Module, when: Callable[[], bool] | None = None):
    """Accumulate Σ x² per input feature of the projections' inputs (and Σ x at the output projections' inputs).

    Yields {(layer, site): tensor[in_features]} for the sites attn_input, attn_channels, mlp_input,
    mlp_channels (Σ x²), and (layer, "sum:attn_channels") / (layer, "sum:mlp_channels") (Σ x, for FLAP's
    fluctuation), filled during forward passes. `when()` False skips a call: the recomputed forward of a
    gradient-checkpointed layer during backward must not count twice. Sums stay on the activations' device.
    """
    sums: dict[tuple[int, str], torch.Tensor] = {}

    def put(key, s) -> None:
        sums[key] = s if key not in sums else sums[key] + s

    def add(layer: int, site: str, x: torch.Tensor) -> None:
        if when is not None and not when():
            return
        x = x.detach().float().reshape(-1, x.shape[-1])
        put((layer, site), x.square().sum(0))
        if site in CHANNEL_SITES.values():
            put((layer, f"sum:{site}"), x.sum(0))

    with trace(model, ("attn_input", "attn_channels", "mlp_input", "mlp_channels"), add):
        yield sums


# The traced output of each block's output projection (the block's contribution to the residual stream).
OUTPUT_SITES = {"attn_output": "attn", "mlp_output": "mlp"}


@contextlib.contextmanager
def output_grad_squares(model: nn.Module, scale: Callable[[], float], when: Callable[[], bool] | None = None):
    """Accumulate Σ_tokens (scale()·∂loss/∂y)² per output dimension of every block's output projection y.

    Yields {(layer, block): tensor[hidden]} (float64, on the gradients' device), filled during backward by
    hooks on the output tensors of forward passes inside the block. `scale()` turns the loss's gradient into
    the gradient of the summed NLL (the number of predicted tokens the loss averages over); `when()` False
    skips a forward (a checkpointed layer's recomputation, whose tensors are not the graph's).
    """
    sums: dict[tuple[int, str], torch.Tensor] = {}

    def on_output(layer: int, site: str, y: torch.Tensor) -> None:
        if (when is not None and not when()) or not y.requires_grad:
            return
        key, factor = (layer, OUTPUT_SITES[site]), scale()

        def on_grad(g: torch.Tensor) -> None:
            s = (g.detach().float() * factor).square().reshape(-1, g.shape[-1]).sum(0).double()
            sums[key] = s if key not in sums else sums[key] + s

        y.register_hook(on_grad)

    with trace(model, tuple(OUTPUT_SITES), on_output):
        yield sums


@contextlib.contextmanager
def only_prunable_grads(model: nn.Module):
    """Gradients only for unit-indexed parameters (embeddings, norms, lm_head frozen) inside the block."""
    saved = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for _, block, parts in iter_blocks(model):
            for up in block_params(parts, block):
                up.param.requires_grad_(True)
        yield
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)


@contextlib.contextmanager
def gradient_taps(params: list[torch.Tensor], sink):
    """Call `sink(index, grad)` with each backward pass's own gradient of `params[index]` (before it is summed
    into `.grad`); the hooks are removed on exit."""
    handles = [p.register_hook(lambda g, k=k: sink(k, g)) for k, p in enumerate(params)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def param_terms(w: torch.Tensor, g: torch.Tensor, axis: int, n_units: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One parameter's share of one batch, in float32: per unit Σ_e |w_e·g_e| and Σ_e (w_e·g_e)², and the
    gradient's [Σ|g|, Σg², max|g|, number of zeros].

    w·g is the only temporary, reused in place (large fresh allocations cost more than the arithmetic on a
    CPU), and it is one function so `accumulation="compiled"` can hand it to `torch.compile` (one read of w, g).
    """
    g = g.float()
    prod = w.float() * g
    flat = g.reshape(-1)
    sq_sum, (low, high), nonzero = torch.dot(flat, flat), torch.aminmax(flat), torch.count_nonzero(flat)
    if prod.ndim == 2:
        dim = 1 - axis
        first = prod.abs_().sum(dim)
        fisher = prod.square_().sum(dim)
    else:  # a bias: one value per element
        first, fisher = prod.abs(), prod.square()
    abs_sum = prod.copy_(g).abs_().sum()
    stats = torch.stack([abs_sum, sq_sum, torch.maximum(-low, high), (g.numel() - nonzero).float()])
    return first.view(n_units, -1).sum(1), fisher.view(n_units, -1).sum(1), stats


_COMPILED: dict[str, Callable] = {}


def terms_fn(accumulation: str) -> Callable:
    """`param_terms`, eager or compiled (once per process), by `accumulation`."""
    check_choice("accumulation", accumulation, ACCUMULATIONS)
    if accumulation == "eager":
        return param_terms
    if "fn" not in _COMPILED:  # compiled once per process; shapes vary by module, hence dynamic
        _COMPILED["fn"] = torch.compile(param_terms, dynamic=True)
    return _COMPILED["fn"]


@contextlib.contextmanager
def accumulate_in_backward(params: list[torch.Tensor], sink):
    """Call `sink(index)` as soon as backward has accumulated `params[index].grad` (post-accumulate-grad hooks):
    each gradient is reduced and freed while backward goes on, so the gradients never all live at once."""
    handles = [p.register_post_accumulate_grad_hook(lambda _p, k=k: sink(k)) for k, p in enumerate(params)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
