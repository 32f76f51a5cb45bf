"""What the workbench does with a loaded decoder model beyond its architecture (`core.arch`): the cached-decoding
self-check, eval mode and gradient checkpointing as context managers, input checks (token ids, context length,
dtypes), and its anatomy (parameters per layer and block, a summary)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial

import pandas as pd
import torch
from torch import nn

from workbench.core.arch import (
    UnsupportedModelError,
    decoder_layers,
    geometry,
    get_spec,
    kv_groups,
    layer_parts,
    layer_widths,
    mlp_channels,
)
from workbench.core.compat import check_cached_decoding
from workbench.core.registry import check_choice

# Config attributes that describe structure the pruner cannot honour, with the reason.


def decoding_touch_points(model: nn.Module) -> list[str]:
    """What this model's cached decoding relies on beyond transformers' stock layers: emptied attention
    blocks (zero-head cache layers) and per-layer KV heads. Empty for a dense or uniformly pruned model."""
    widths = layer_widths(model)
    emptied = [i for i, (g, _) in enumerate(widths) if g == 0]
    points = [f"an emptied attention in layer{'s' if len(emptied) > 1 else ''} {', '.join(map(str, emptied))}"
              ] if emptied else []
    if len({g for g, _ in widths if g}) > 1:
        points.append("per-layer KV heads")
    return points


def verify_decoding(model: nn.Module, extra: list[str] | None = None) -> None:
    """Check once that cached decoding matches a full pass when the model relies on a touch point with
    transformers internals (`compat.check_cached_decoding`; raises `DecodingCheckError`). A few short
    forward passes: well under a second on the default model."""
    points = decoding_touch_points(model) + list(extra or [])
    if points:
        check_cached_decoding(model, why=" and ".join(points))


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model is in eval mode; its training flag is restored on exit, whatever happens."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def checkpointed_layers(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Inside the block every decoder layer recomputes its forward during backward (gradient checkpointing,
    non-reentrant), whether or not the model is in training mode; everything is restored on exit.

    transformers checkpoints a layer only when the layer's own `training` flag is set, so only that flag is
    set, never its children's: attention and dropout stay in eval mode and the numbers do not change.
    """
    if not enabled:
        yield
        return
    from torch.utils.checkpoint import checkpoint  # deferred: only a checkpointed pass needs it
    from transformers.modeling_layers import GradientCheckpointingLayer  # deferred: transformers loads in seconds

    layers = list(decoder_layers(model))
    odd = sorted({type(layer).__name__ for layer in layers if not isinstance(layer, GradientCheckpointingLayer)})
    if odd:
        raise UnsupportedModelError(f"gradient checkpointing needs transformers' checkpointable decoder layers; "
                                    f"{odd} are not")
    saved = [(layer.training, layer.gradient_checkpointing, layer.__dict__.get("_gradient_checkpointing_func"))
             for layer in layers]
    try:
        for layer in layers:
            layer.gradient_checkpointing = True
            layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
            layer.training = True
        yield
    finally:
        for layer, (training, flag, fn) in zip(layers, saved):
            layer.training, layer.gradient_checkpointing = training, flag
            if fn is None:
                layer.__dict__.pop("_gradient_checkpointing_func", None)
            else:
                layer._gradient_checkpointing_func = fn


def check_context(model: nn.Module, seq_len: int, what: str = "seq_len") -> None:
    """Refuse sequences longer than the model's context (`max_position_embeddings`): positions it never saw
    give numbers that mean nothing (and cost the time of a full run before anyone notices)."""
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and seq_len > context:
        raise ValueError(f"{what}={seq_len} is longer than the model's context of {context} tokens "
                         "(max_position_embeddings); use at most that")


def check_token_ids(ids: torch.Tensor, model: nn.Module, what: str = "token ids") -> None:
    """Refuse token ids the model's embedding cannot look up (negative, >= vocab, not integers), by value, and
    sequences longer than its context."""
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"{what} must be an integer tensor, got {ids.dtype}")
    if ids.numel() == 0:
        return
    if ids.dim() >= 2:
        check_context(model, ids.shape[-1], f"the length of {what}")
    vocab = model.get_input_embeddings().num_embeddings
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"{what} must lie in [0, {vocab}) (the model's vocabulary); found min {lo}, max {hi}. "
                         "Were they made with another tokenizer?")


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from its name ("float32", "float16", "bfloat16") or itself; anything else is refused."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype={dtype} is not a floating-point dtype; allowed: {sorted(_DTYPES)} or torch.float64")
        return dtype
    check_choice("dtype", dtype, sorted(_DTYPES))
    return _DTYPES[dtype]


# ----------------------------------------------------------------------------------------------
# Anatomy


def anatomy(model: nn.Module) -> pd.DataFrame:
    """One row per layer and block: heads, KV heads, MLP width and parameter counts."""
    spec = get_spec(model)
    geo = geometry(model.config)
    rows = []
    for i, layer in enumerate(decoder_layers(model, spec)):
        p = layer_parts(layer, spec)
        groups = kv_groups(p, geo.head_dim)
        rows.append(dict(
            layer=i, block="attn", query_heads=groups * geo.gqa_ratio, kv_heads=groups, mlp_width=None,
            params=sum(t.numel() for t in p.attn.parameters()),
        ))
        rows.append(dict(
            layer=i, block="mlp", query_heads=None, kv_heads=None,
            mlp_width=mlp_channels(p),
            params=sum(t.numel() for t in p.mlp.parameters()),
        ))
        norms = sum(t.numel() for n, t in layer.named_parameters()
                    if not n.startswith((spec.attn + ".", spec.mlp + ".")))
        rows.append(dict(layer=i, block="norms", query_heads=None, kv_heads=None, mlp_width=None, params=norms))
    df = pd.DataFrame(rows)
    for col in ("query_heads", "kv_heads", "mlp_width"):
        df[col] = df[col].astype("Int64")
    return df


def parameter_count(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def model_summary(model: nn.Module) -> dict:
    geo = geometry(model.config)
    return dict(
        name=str(getattr(model.config, "name_or_path", "")),
        family=get_spec(model).family,
        parameters=parameter_count(model),
        layers=len(decoder_layers(model)),
        hidden=geo.hidden,
        query_heads=geo.n_heads,
        kv_heads=geo.n_kv_heads,
        gqa_ratio=geo.gqa_ratio,
        head_dim=geo.head_dim,
        mlp_width=geo.intermediate,
        tied_embeddings=bool(getattr(model.config, "tie_word_embeddings", False)),
    )
