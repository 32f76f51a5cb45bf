"""Architectures as data, the parts of a decoder layer and the block that stands in for an emptied one.

Each supported family is one frozen `ArchSpec` that says where the layers, projections and norms live.
Pruning code asks the spec, never the model, where things are; a model outside the registry, or a config
feature the pruner cannot honour, is refused by name. An emptied attention or MLP is replaced by an
`EmptyBlock` that adds nothing to the residual stream (an emptied attention still counts positions in the
KV cache, `PositionsOnlyCacheLayer`).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from workbench.core.hf_modeling import EmptyBlock
from workbench.core.registry import Registry

BLOCKS = ("attn", "mlp")  # the two prunable blocks of a decoder layer, in this order everywhere


@dataclass(frozen=True)
class ArchSpec:
    """Where the prunable parts of one model family live (attribute paths relative to a layer).

    Args:
        family: the family's name in `ARCH_SPECS`.
        model_types: `config.model_type` values this spec serves.
        layers: path from the model to its `ModuleList` of decoder layers.
        attn, mlp: attribute names of a layer's attention and MLP blocks.
        q, k, v, o: attribute names of the attention projections.
        gate, up, down: attribute names of the MLP projections.
        input_norm, post_attn_norm: attribute names of a layer's two norms.
        head_norms: per-head norms whose weight all heads share (Qwen3's q_norm/k_norm); they stay whole.
        qkv_bias_attr: config attribute that says q/k/v carry biases (None: never from the config).
        qkv_bias_always: the family always has q/k/v biases (Qwen2).
        o_bias_follows_qkv: o_proj has a bias whenever q/k/v do (Llama's `attention_bias`).
        mlp_bias_attr: config attribute that says the MLP projections carry biases.
    """

    family: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    attn: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    mlp: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    input_norm: str = "input_layernorm"
    post_attn_norm: str = "post_attention_layernorm"
    head_norms: tuple[str, ...] = ()  # per-head norms shared by all heads (Qwen3 q_norm/k_norm)
    qkv_bias_attr: str | None = "attention_bias"  # config attribute saying q/k/v carry biases
    qkv_bias_always: bool = False  # family always has q/k/v biases (Qwen2)
    o_bias_follows_qkv: bool = True  # o_proj has a bias whenever q/k/v do (Llama's attention_bias)
    mlp_bias_attr: str | None = "mlp_bias"


ARCH_SPECS: Registry[ArchSpec] = Registry("family", {
    "llama": ArchSpec(family="llama", model_types=("llama",)),
    "mistral": ArchSpec(family="mistral", model_types=("mistral",), qkv_bias_attr=None, mlp_bias_attr=None),
    "qwen2": ArchSpec(
        family="qwen2", model_types=("qwen2",), qkv_bias_attr=None, qkv_bias_always=True,
        o_bias_follows_qkv=False, mlp_bias_attr=None,
    ),
    "qwen3": ArchSpec(family="qwen3", model_types=("qwen3",), head_norms=("q_norm", "k_norm"), mlp_bias_attr=None),
})


_REFUSED_CONFIG_FEATURES = {
    "num_experts": "mixture-of-experts layers",
    "num_local_experts": "mixture-of-experts layers",
    "n_routed_experts": "mixture-of-experts layers",
    "kv_lora_rank": "multi-head latent attention",
}


class UnsupportedModelError(ValueError):
    """The model's architecture or config is outside what the pruner can honour."""


def spec_for_config(config) -> ArchSpec:
    """The spec of a config's family; refuses unknown families and unsupported features by name."""
    model_type = getattr(config, "model_type", None)
    for spec in ARCH_SPECS.values():
        if model_type in spec.model_types:
            break
    else:
        allowed = sorted(t for s in ARCH_SPECS.values() for t in s.model_types)
        raise UnsupportedModelError(
            f"unsupported architecture model_type={model_type!r} "
            f"({type(config).__name__}); supported model types: {allowed}"
        )
    for attr, what in _REFUSED_CONFIG_FEATURES.items():
        value = getattr(config, attr, None)
        if value:
            raise UnsupportedModelError(
                f"{model_type}: config.{attr}={value!r} means {what}, which the pruner cannot honour"
            )
    return spec


def get_spec(model: nn.Module) -> ArchSpec:
    return spec_for_config(model.config)


def _resolve(root: nn.Module, path: str, what: str) -> nn.Module:
    obj = root
    for part in path.split("."):
        if not hasattr(obj, part):
            raise UnsupportedModelError(
                f"{type(root).__name__} has no attribute {path!r} ({what}); "
                f"the architecture does not match its spec (fused projections are not supported)"
            )
        obj = getattr(obj, part)
    return obj


def decoder_layers(model: nn.Module, spec: ArchSpec | None = None) -> nn.ModuleList:
    spec = spec or get_spec(model)
    return _resolve(model, spec.layers, "decoder layers")


@dataclass(frozen=True)
class LayerParts:
    """The modules of one decoder layer that pruning touches (None for an emptied block)."""

    attn: nn.Module
    mlp: nn.Module
    q: nn.Linear | None
    k: nn.Linear | None
    v: nn.Linear | None
    o: nn.Linear | None
    gate: nn.Linear | None
    up: nn.Linear | None
    down: nn.Linear | None

    def block(self, block: str) -> nn.Module:
        """The attention or MLP module (an `EmptyBlock` when emptied)."""
        return self.attn if block == "attn" else self.mlp

    def out_proj(self, block: str) -> nn.Linear | None:
        """The block's output projection: o_proj or down_proj (None when emptied)."""
        return self.o if block == "attn" else self.down


def layer_parts(layer: nn.Module, spec: ArchSpec) -> LayerParts:
    attn = _resolve(layer, spec.attn, "attention block")
    mlp = _resolve(layer, spec.mlp, "MLP block")
    if isinstance(attn, EmptyBlock):
        q = k = v = o = None
    else:
        q, k, v, o = (_resolve(attn, name, f"{name} projection") for name in (spec.q, spec.k, spec.v, spec.o))
    if isinstance(mlp, EmptyBlock):
        gate = up = down = None
    else:
        gate, up, down = (_resolve(mlp, name, f"{name} projection") for name in (spec.gate, spec.up, spec.down))
    return LayerParts(attn, mlp, q, k, v, o, gate, up, down)


@dataclass(frozen=True)
class Geometry:
    """Global shape facts of a model family instance (per-layer widths may differ after pruning)."""

    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool

    @property
    def gqa_ratio(self) -> int:
        return self.n_heads // self.n_kv_heads


def geometry(config) -> Geometry:
    spec = spec_for_config(config)
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    if n_heads % n_kv:
        raise UnsupportedModelError(f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    qkv_bias = spec.qkv_bias_always or bool(spec.qkv_bias_attr and getattr(config, spec.qkv_bias_attr, False))
    return Geometry(
        n_layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        intermediate=config.intermediate_size,
        qkv_bias=qkv_bias,
        o_bias=qkv_bias and spec.o_bias_follows_qkv,
        mlp_bias=bool(spec.mlp_bias_attr and getattr(config, spec.mlp_bias_attr, False)),
    )


def kv_groups(parts: LayerParts, head_dim: int) -> int:
    """How many GQA groups (KV heads, each with its query heads) a layer's attention has now."""
    return 0 if parts.k is None else parts.k.out_features // head_dim


def mlp_channels(parts: LayerParts) -> int:
    """How many intermediate channels a layer's MLP has now."""
    return 0 if parts.gate is None else parts.gate.out_features


def layer_widths(model: nn.Module) -> list[tuple[int, int]]:
    """Per layer: (KV groups, MLP channels) as they are in the modules now."""
    spec = get_spec(model)
    head_dim = geometry(model.config).head_dim
    return [(kv_groups(p, head_dim), mlp_channels(p))
            for p in (layer_parts(layer, spec) for layer in decoder_layers(model, spec))]
