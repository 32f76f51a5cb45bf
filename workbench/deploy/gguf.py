"""Export a (pruned) model as a GGUF file that llama.cpp runs, per-layer shapes included.

Written with the `gguf` package's writer. Which llama.cpp architecture the file uses:

* every layer the same widths, no emptied block → the family's own architecture (`llama` for Llama
  and Mistral, `qwen2`, `qwen3`);
* anything else (per-layer query / KV heads and MLP widths, emptied blocks) → llama.cpp's `deci`
  architecture (made for NVIDIA's pruned Llama-3.1-Nemotron models), which reads per-layer
  `head_count`, `head_count_kv` and `feed_forward_length` arrays. An emptied attention block is a
  layer with zero heads (llama.cpp skips it). An emptied MLP is written as one channel whose weights
  are zero (llama.cpp's zero-width FFN path drops the layer's attention output too, so we never use it);
  an emptied block that carries a constant (a reconstruction / FLAP bias) keeps one zero-weight unit
  whose output bias is that constant, and so does an emptied attention in the first layer (llama.cpp
  reads the head size only when layer 0 has heads). All are exact: the unit's output is 0 (+ bias).

Removed layers are simply absent. Llama-style rotary q/k rows are permuted to llama.cpp's layout.
What llama.cpp cannot express raises `ExportError` before anything is written; the file is written
under a temporary name and renamed at the end, so no partial file is ever left behind.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from workbench.core.arch import BLOCKS, decoder_layers, geometry, get_spec, layer_parts, layer_widths
from workbench.core.paths import atomic_path, clean_staging, confined
from workbench.core.registry import check_choice
from workbench.deploy.gguf_tokenizer import ExportError, copy_gguf_tokenizer, write_hf_tokenizer
from workbench.plans.plan import Plan
from workbench.surgery.checkpoints import PLAN_FILE, load_model, load_plan
from workbench.surgery.prune import output_bias

GGUF_DTYPES = ("f32", "f16", "q8_0")
#: llama.cpp architecture for a uniformly shaped model of each family.
UNIFORM_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
PER_LAYER_ARCH = "deci"
_FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7}  # llama.cpp's LLAMA_FTYPE_ALL_F32 / MOSTLY_F16 / MOSTLY_Q8_0
_ROTARY_PERMUTED = {"llama", "deci"}  # architectures whose rotary embedding pairs adjacent values


@dataclass(frozen=True)
class GGUFLayout:
    """What the GGUF file will say about each layer.

    Args:
        arch: llama.cpp architecture name.
        n_head, n_head_kv, n_ff: per layer, as written (stub units included).
        attn_stub, mlp_stub: per layer, whether an emptied block is written as one zero-weight unit.
    """

    arch: str
    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]
    n_ff: tuple[int, ...]
    attn_stub: tuple[bool, ...]
    mlp_stub: tuple[bool, ...]

    @property
    def uniform(self) -> bool:
        return self.arch != PER_LAYER_ARCH


@dataclass(frozen=True)
class ExportReport:
    """What `export_gguf` wrote."""

    path: Path
    arch: str
    dtype: str
    size_bytes: int
    n_tensors: int
    n_layers: int
    tokenizer_source: str
    notes: tuple[str, ...] = field(default=())


def _rope(config) -> dict:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.pop("type", "default"))
    return params


def active_sliding_window(config) -> int | None:
    """The sliding window this config's attention really uses (None: full attention everywhere). Mistral uses
    `sliding_window` when set; Qwen2 only on the layers `layer_types` marks "sliding_attention". A window
    no shorter than the context changes nothing."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if window is None or (types is not None and "sliding_attention" not in types):
        return None
    return int(window) if window < config.max_position_embeddings else None


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def gguf_layout(model: nn.Module, ff_multiple: int = 1) -> GGUFLayout:
    """Decide the llama.cpp architecture and per-layer head / channel counts, or raise `ExportError`.

    ff_multiple: MLP widths are padded with zero channels (exact) up to a multiple of this, so a
    block-quantized type (q8_0: blocks of 32) applies to the down projection too.
    """
    spec, geo = get_spec(model), geometry(model.config)
    widths = layer_widths(model)
    ratio = geo.gqa_ratio
    layers = decoder_layers(model, spec)
    if not widths:
        raise ExportError("the model has no decoder layers left; llama.cpp needs at least one")
    uniform = len(set(widths)) == 1 and widths[0][0] > 0 and widths[0][1] > 0
    rope = _rope(model.config)
    if (window := active_sliding_window(model.config)) is not None:
        raise ExportError(
            f"this {spec.family} model attends within a sliding window of {window} tokens (context "
            f"{model.config.max_position_embeddings}); llama.cpp's {UNIFORM_ARCH[spec.family]} and deci architectures "
            f"have no sliding window, so past {window} tokens the GGUF file would compute something else. Export "
            "a model whose config has sliding_window=None (full attention) if that is what you want")
    if rope["rope_type"] not in ("default", "llama3", "linear"):
        raise ExportError(f"rope_type={rope['rope_type']!r} has no GGUF export here; allowed: default, llama3, linear")
    out_bias = any(output_bias(layer, spec, block) is not None for layer in layers for block in BLOCKS)
    full_attention = all(g == geo.n_kv_heads for g, _ in widths) and geo.n_heads * geo.head_dim == geo.hidden
    if uniform and not (out_bias and spec.family in ("qwen2", "qwen3")):
        arch = UNIFORM_ARCH[spec.family]
        g, c = widths[0]
        if (arch == "qwen2" or geo.qkv_bias) and g * ratio * geo.head_dim != geo.hidden:
            raise ExportError(
                f"llama.cpp's {arch} architecture with q/k/v biases needs query width = hidden size; this model has "
                f"{g * ratio} heads × {geo.head_dim} = {g * ratio * geo.head_dim} against hidden {geo.hidden} "
                f"(a Qwen2 plan that prunes only MLP channels exports)")
        n = len(widths)
        c = _round_up(c, ff_multiple)
        return GGUFLayout(arch, (g * ratio,) * n, (g,) * n, (c,) * n, (False,) * n, (False,) * n)
    if spec.family == "qwen3":
        raise ExportError("this Qwen3 model cannot be exported: llama.cpp's per-layer architecture (deci) has no "
                          "per-head q/k norms and its qwen3 has no output biases; only uniform Qwen3 plans without "
                          "reconstruction / FLAP biases export (as qwen3)")
    if geo.qkv_bias and not full_attention:
        raise ExportError(f"this {spec.family} model (q/k/v biases) cannot be exported with pruned attention: "
                          "llama.cpp's qwen2 needs every query head and its per-layer architecture (deci) reads "
                          "q/k/v biases only at the full width; a plan that prunes only MLP channels exports")
    heads, kv, ff, a_stub, m_stub = [], [], [], [], []
    for (g, c), layer in zip(widths, layers):
        # llama.cpp reads the head size only when layer 0 has heads, so an emptied first attention is a stub too
        a_stub.append(g == 0 and (output_bias(layer, spec, "attn") is not None or not heads))
        m_stub.append(c == 0)  # an FFN-less layer would lose its attention output in llama.cpp
        g = 1 if a_stub[-1] else g
        heads.append(g * ratio)
        kv.append(g)
        ff.append(_round_up(max(c, 1), ff_multiple))
    return GGUFLayout(PER_LAYER_ARCH, tuple(heads), tuple(kv), tuple(ff), tuple(a_stub), tuple(m_stub))


def _permute_rotary(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """HF's rotate-half row order → llama.cpp's adjacent pairs, per head (weights [rows, cols] or biases)."""
    shape = w.shape
    return w.reshape(n_heads, 2, head_dim // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).contiguous().numpy()


def _add_tensor(writer, name: str, t: torch.Tensor, dtype: str) -> None:
    import gguf  # deferred: only exports need the GGUF writer

    a = _np(t)
    if a.ndim == 1 or dtype == "f32":
        writer.add_tensor(name, a)
    elif dtype == "q8_0" and a.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:  # f16, or a q8_0 row length that is not a multiple of 32 (llama.cpp's converter does the same)
        writer.add_tensor(name, a.astype(np.float16))


def _layer_tensors(layer: nn.Module, spec, geo, i: int, layout: GGUFLayout) -> dict[str, torch.Tensor]:
    """GGUF name → tensor for one layer, stubs for emptied blocks included."""
    parts = layer_parts(layer, spec)
    out: dict[str, torch.Tensor] = {}
    hidden, hd = geo.hidden, geo.head_dim
    permute = layout.arch in _ROTARY_PERMUTED
    norms = {"attn_norm": getattr(layer, spec.input_norm).weight, "ffn_norm": getattr(layer, spec.post_attn_norm).weight}
    if parts.q is not None:
        q, k = parts.q.weight, parts.k.weight
        qb, kb = parts.q.bias, parts.k.bias
        nq, nk = q.shape[0] // hd, k.shape[0] // hd
        if permute:
            q, k = _permute_rotary(q, nq, hd), _permute_rotary(k, nk, hd)
            qb = None if qb is None else _permute_rotary(qb, nq, hd)
            kb = None if kb is None else _permute_rotary(kb, nk, hd)
        out.update({"attn_norm.weight": norms["attn_norm"], "attn_q.weight": q, "attn_k.weight": k,
                    "attn_v.weight": parts.v.weight, "attn_output.weight": parts.o.weight})
        for name, b in (("attn_q.bias", qb), ("attn_k.bias", kb), ("attn_v.bias", parts.v.bias),
                        ("attn_output.bias", parts.o.bias)):
            if b is not None:
                out[name] = b
        for norm in spec.head_norms:
            out[f"attn_{norm[0]}_norm.weight"] = getattr(parts.attn, norm).weight
    elif layout.attn_stub[i]:
        nq, nk = layout.n_head[i], layout.n_head_kv[i]
        zeros = norms["attn_norm"].new_zeros
        out.update({"attn_norm.weight": norms["attn_norm"], "attn_q.weight": zeros(nq * hd, hidden),
                    "attn_k.weight": zeros(nk * hd, hidden), "attn_v.weight": zeros(nk * hd, hidden),
                    "attn_output.weight": zeros(hidden, nq * hd)})
        if parts.attn.bias is not None:
            out["attn_output.bias"] = parts.attn.bias
    if parts.gate is not None:
        pad = layout.n_ff[i] - parts.gate.out_features  # zero channels: silu(0) * 0 adds nothing
        rows = lambda t: F.pad(t, (0, 0, 0, pad) if t.ndim == 2 else (0, pad)) if pad and t is not None else t  # noqa: E731
        out.update({"ffn_norm.weight": norms["ffn_norm"], "ffn_gate.weight": rows(parts.gate.weight),
                    "ffn_up.weight": rows(parts.up.weight),
                    "ffn_down.weight": F.pad(parts.down.weight, (0, pad)) if pad else parts.down.weight})
        for name, b in (("ffn_gate.bias", rows(parts.gate.bias)), ("ffn_up.bias", rows(parts.up.bias)),
                        ("ffn_down.bias", parts.down.bias)):
            if b is not None:
                out[name] = b
    elif layout.mlp_stub[i]:
        zeros, c = norms["ffn_norm"].new_zeros, layout.n_ff[i]
        out.update({"ffn_norm.weight": norms["ffn_norm"], "ffn_gate.weight": zeros(c, hidden),
                    "ffn_up.weight": zeros(c, hidden), "ffn_down.weight": zeros(hidden, c)})
        if parts.mlp.bias is not None:
            out["ffn_down.bias"] = parts.mlp.bias
    if parts.q is None and not layout.attn_stub[i] and parts.gate is None and not layout.mlp_stub[i]:
        raise ExportError(f"layer {i} has neither attention nor MLP; remove it from the model (apply_plan does)")
    return out


def _rope_freqs(config) -> torch.Tensor:
    """Llama-3 rope scaling as llama.cpp reads it: per-frequency divisors (default inv_freq / scaled inv_freq)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # deferred: transformers loads in seconds

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    geo = geometry(config)
    base = _rope(config)["rope_theta"]
    plain = 1.0 / (base ** (torch.arange(0, geo.head_dim, 2, dtype=torch.float64) / geo.head_dim))
    return (plain / scaled.double()).float()


# ----------------------------------------------------------------------------------------------
# Export


def _plan_summary(plan: Plan | None) -> str:
    if plan is None:
        return "exported by prune-workbench"
    n = f"{plan.denominator:,}"
    of = {"total": f"all {n} parameters", "prunable": f"{n} attention + MLP parameters"}.get(
        str(plan.provenance.selection.get("ratio_of")), f"{n} parameters (the plan's denominator)")
    return f"pruned by prune-workbench: {plan.provenance.description}, {plan.achieved_ratio:.1%} of {of} removed"


def export_gguf(
    model: nn.Module | str | os.PathLike,
    path: str | os.PathLike,
    *,
    dtype: str = "f16",
    tokenizer=None,
    tokenizer_gguf: str | os.PathLike | None = None,
    plan: Plan | None = None,
    name: str | None = None,
    pad_ff_to: int = 32,
    overwrite: bool = False,
) -> ExportReport:
    """Write `model` (a model, or a checkpoint folder / hub id `load_model` reads) as a GGUF file at `path`.

    dtype: "f32", "f16" or "q8_0" for 2-D weights (norms and biases stay float32).
    tokenizer_gguf: a GGUF file whose tokenizer (and chat template) is carried over unchanged; by default
        the one the model was loaded from (`config.gguf_source`), else `tokenizer` (a HF fast tokenizer).
    plan: its method and ratio go into `general.description` (read from a checkpoint folder's plan file).
    pad_ff_to: MLP widths are padded with zero channels (exact) to a multiple of this. llama.cpp's CPU
        kernels want it: on the default model's 20 % plan, prefill ran at 505 tokens/s unpadded and 730
        padded to 32 (dense: 592); q8_0 needs a multiple of 32 to quantize the down projections at all.
        1 writes the widths as they are.
    """
    import gguf  # deferred: only exports need the GGUF writer

    check_choice("dtype", dtype, GGUF_DTYPES, ExportError)
    target = Path(path)
    if target.suffix != ".gguf":
        raise ExportError(f"path {target} must end in .gguf")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"folder {target.parent} does not exist; create it first")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    if not isinstance(model, nn.Module):
        source = Path(model)
        model, loaded_tok = load_model(source)  # a pruned checkpoint's own tokenizer when it was saved with one
        tokenizer = tokenizer or loaded_tok
        if plan is None and (source / PLAN_FILE).is_file():
            plan = load_plan(source)
    spec, geo, config = get_spec(model), geometry(model.config), model.config
    q_block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    if not isinstance(pad_ff_to, int) or pad_ff_to < 1 or (dtype == "q8_0" and pad_ff_to % q_block):
        raise ExportError(f"pad_ff_to={pad_ff_to!r} must be a positive integer"
                          + (f", a multiple of {q_block} for q8_0" if dtype == "q8_0" else ""))
    layout = gguf_layout(model, ff_multiple=pad_ff_to)
    notes: list[str] = []
    if tokenizer_gguf is not None and not Path(tokenizer_gguf).is_file():
        raise FileNotFoundError(f"tokenizer_gguf={tokenizer_gguf} does not exist")
    source_gguf = getattr(config, "gguf_source", None)
    if tokenizer_gguf is None and source_gguf is not None:
        if Path(source_gguf).is_file():
            tokenizer_gguf = source_gguf
        elif tokenizer is not None:
            notes.append(f"the model's source GGUF {source_gguf} is gone: its tokenizer is written from the HF "
                         "tokenizer saved with the model")
        else:
            raise ExportError(f"the model's tokenizer came from {source_gguf}, which no longer exists, and no other "
                              "tokenizer was given: pass tokenizer= (CLI: --tokenizer) a HF tokenizer folder or the "
                              "moved GGUF file")
    if tokenizer_gguf is None and tokenizer is None:
        raise ExportError("no tokenizer: the model was saved without one; pass tokenizer= (a HF fast tokenizer; "
                          "CLI: --tokenizer FOLDER) or tokenizer_gguf= (a GGUF file; CLI: --tokenizer FILE.gguf)")
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    n_vocab = embed.shape[0]
    rope = _rope(config)

    clean_staging(target.parent)  # what a killed export left here
    with atomic_path(target) as tmp:
        arch = layout.arch
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_type("model")
        writer.add_name(name or str(getattr(config, "name_or_path", "") or spec.family))
        writer.add_description(_plan_summary(plan))
        if plan is not None:
            writer.add_string("prune_workbench.method", plan.provenance.description)
            writer.add_float32("prune_workbench.removed_share", plan.achieved_ratio)
            writer.add_string("prune_workbench.provenance", json.dumps(plan.provenance.to_dict(), default=str,
                                                                       sort_keys=True))
        writer.add_file_type(_FILE_TYPE[dtype])
        writer.add_context_length(int(config.max_position_embeddings))
        writer.add_embedding_length(geo.hidden)
        writer.add_block_count(len(layout.n_head))
        per_layer = (lambda v: list(v)) if not layout.uniform else (lambda v: v[0])
        writer.add_feed_forward_length(per_layer(layout.n_ff))
        writer.add_head_count(per_layer(layout.n_head))
        writer.add_head_count_kv(per_layer(layout.n_head_kv))
        writer.add_key_length(geo.head_dim)
        writer.add_value_length(geo.head_dim)
        writer.add_rope_dimension_count(geo.head_dim)
        writer.add_rope_freq_base(float(rope["rope_theta"]))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(n_vocab)
        if rope["rope_type"] == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["factor"]))
        if tokenizer_gguf is not None:
            copy_gguf_tokenizer(writer, Path(tokenizer_gguf), n_vocab)
            tok_source = f"carried over from {Path(tokenizer_gguf).name}"
        else:
            notes += write_hf_tokenizer(writer, tokenizer, n_vocab)
            tok_source = f"written from the HF tokenizer ({type(tokenizer).__name__})"

        tensors: dict[str, torch.Tensor] = {"token_embd.weight": embed}
        if rope["rope_type"] == "llama3":
            tensors["rope_freqs.weight"] = _rope_freqs(config)
        for i, layer in enumerate(decoder_layers(model, spec)):
            for key, t in _layer_tensors(layer, spec, geo, i, layout).items():
                tensors[f"blk.{i}.{key}"] = t
        tensors["output_norm.weight"] = model.get_submodule(spec.layers.rpartition(".")[0]).norm.weight
        if head.data_ptr() != embed.data_ptr():
            tensors["output.weight"] = head
        with torch.no_grad():
            for tname, t in tensors.items():
                _add_tensor(writer, tname, t, "f32" if tname == "rope_freqs.weight" else dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    if any(layout.attn_stub) or any(layout.mlp_stub):
        notes.append(f"{sum(layout.attn_stub)} emptied attention and {sum(layout.mlp_stub)} emptied MLP blocks are "
                     "written as one zero-weight unit each (exact; llama.cpp has no other form for them)")
    padded = sum(n - c for n, (_, c) in zip(layout.n_ff, layer_widths(model)) if c)
    if padded:
        notes.append(f"{padded} zero MLP channels pad the widths to multiples of {pad_ff_to} (exact; faster in "
                     "llama.cpp, and q8_0 then covers every matrix)")
    return ExportReport(path=target, arch=layout.arch, dtype=dtype, size_bytes=target.stat().st_size,
                        n_tensors=len(tensors), n_layers=len(layout.n_head), tokenizer_source=tok_source,
                        notes=tuple(notes))


def export_models(models: dict[str, nn.Module], tokenizer, folder: str | os.PathLike, *, dtype: str = "f16",
                  checkpoints: dict[str, str] | None = None) -> dict[str, Path]:
    """Export each model to `folder/<name>-<dtype>.gguf` (replacing an earlier export of that name), with the
    plan of its checkpoint folder (`checkpoints[name]`) in the metadata when it has one: name -> file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, model in models.items():
        ckpt = (checkpoints or {}).get(name)
        plan = load_plan(ckpt) if ckpt and (Path(ckpt) / PLAN_FILE).is_file() else None
        report = export_gguf(model, confined(folder, f"{name}-{dtype}.gguf"), dtype=dtype, tokenizer=tokenizer,
                             plan=plan, overwrite=True)
        files[name] = report.path
    return files
