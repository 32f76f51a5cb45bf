"""Recovery without training: re-fit each pruned block's output projection to the dense block's output.

After a plan removes units, a block's output `y = W h + b` (W = o_proj or down_proj, h its input: the
heads' context or the MLP channels) loses the removed columns of W. Reconstruction solves, per block and in
closed form, the ridge-regularised least squares

    min over W', b'  Σ_tokens ‖ (W h + b) − (W' h_kept + b') ‖²  +  λ · mean(diag G) · ‖W'‖²,

with G = Σ h_kept h_keptᵀ. The target is the dense block's own weights on the full activations, so one
streaming Gram matrix of [h, 1] per block (float64 sums; activations are never all held) gives both sides of
the normal equations. `bias=True` fits b' (mean compensation); `weights=False` keeps W' = W_kept and fits
only b' = mean(y) − W_kept·mean(h_kept), the bias compensation of FLAP (An et al., 2024). An emptied block
gets only b' = mean(y). This is the least-squares update of the structured-pruning literature (SlimGPT,
ZipLM; Bonsai's and SliceGPT's lineage), here on GQA groups and MLP channels.

Where the activations h come from is the mode:
- `one_shot` (default): one pass of the dense model; every block's Gram matrix from the dense model's own
  activations. Memory: every pruned block's (width + 1)² float64 matrix at once (SmolLM2: 0.6 GB; a
  Llama-3-8B shape: ≈ 57 GB, so use `sequential` there).
- `sequential`: layer by layer, the dense block is run on the pruned model's input (the output of the
  already reconstructed earlier layers, as in SparseGPT-style methods), attention first, then the MLP of the
  same layer on the corrected attention's output. One block's matrix at a time; about 2× one_shot's time
  (each layer is replayed 3–4 times).

Measured on SmolLM2-135M, 20 % of all parameters, global Taylor plan, 128 × 128 calibration tokens
(`benchmarks/reconstruction.py`): PPL 35.39 → 27.91 one_shot (49 s), 27.77 sequential (110 s), dense 22.77;
λ = 1e-4 beat 1e-3 (28.62), 1e-2 and above (worse than no reconstruction at 1).

The solved weights are cached (`workbench.core.cache`, kind `reconstruction`) by the dense model, the plan, the
samples and the settings, so re-applying them costs no forward pass. A layer the plan removes whole has no
block left to carry a correction.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from workbench.core.arch import BLOCKS, decoder_layers, geometry, get_spec, layer_parts, layer_widths
from workbench.core.cache import cached, make_key
from workbench.core.models import check_token_ids, eval_mode
from workbench.core.registry import check_choice
from workbench.core.tracer import trace
from workbench.core.units import unit_rows
from workbench.data.text import REFIT_DAMPING, REFIT_TOWARD
from workbench.plans.plan import Plan
from workbench.scoring.hooks import CHANNEL_SITES
from workbench.scoring.refit import NormalEquations, call_layer, gram_sums, recorded_inputs
from workbench.surgery.prune import PruneReport, add_output_bias, apply_plan, check_plan

MODES = ("sequential", "one_shot")
CACHE_FORMAT = 2


@dataclass(frozen=True)
class ReconstructConfig:
    """Closed-form reconstruction settings.

    Args:
        mode: "sequential" (the dense blocks run on the reconstructed pruned model's inputs, layer by layer)
            or "one_shot" (everything from one dense pass).
        damping: λ >= 0, added to the diagonal of the normal equations times their mean diagonal (ridge).
        toward: what the ridge pulls the re-fitted weights toward: "zero" (plain ridge) or "dense" (their dense
            values: a block that lost nothing is left exactly as it was, and a large λ keeps the re-fit near the
            dense model, which on the default model carries better out of the calibration domain).
        bias: also fit an output bias (mean compensation); emptied blocks then add their mean output.
        weights: re-fit the output projection's kept columns; False keeps them and fits only the bias (FLAP).
        blocks: which output projections to re-fit: "attn" (o_proj), "mlp" (down_proj), or both.
        num_samples: how many of the given calibration samples to use (None: all).
        batch_size: samples per forward pass.
    """

    mode: str = "one_shot"
    damping: float = REFIT_DAMPING
    toward: str = "zero"
    bias: bool = True
    weights: bool = True
    blocks: tuple[str, ...] = BLOCKS
    num_samples: int | None = None
    batch_size: int = 4

    def __post_init__(self):
        check_choice("mode", self.mode, MODES)
        if isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)) or not self.damping >= 0 \
                or not math.isfinite(self.damping):
            raise ValueError(f"damping={self.damping!r} must be a finite number >= 0")
        check_choice("toward", self.toward, REFIT_TOWARD)
        for name in ("bias", "weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        if not self.bias and not self.weights:
            raise ValueError("bias=False with weights=False fits nothing: enable at least one")
        if isinstance(self.blocks, str) or not self.blocks or any(b not in BLOCKS for b in self.blocks):
            raise ValueError(f"blocks={self.blocks!r}: give a tuple of one or both of {list(BLOCKS)}")
        if self.num_samples is not None and (not isinstance(self.num_samples, int) or self.num_samples < 1):
            raise ValueError(f"num_samples={self.num_samples!r} must be a positive integer or None (all)")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size!r} must be a positive integer")


# ----------------------------------------------------------------------------------------------
# Mapping the plan onto the two models


def _kept_columns(plan: Plan, dense_layer: int, block: str, dense_in: int) -> torch.Tensor:
    """Input columns of the dense output projection that the pruned block keeps, in the pruned order."""
    n_units = plan.widths[dense_layer][BLOCKS.index(block)]
    kept = torch.tensor(plan.kept(block, dense_layer), dtype=torch.long)
    return unit_rows(kept, dense_in, n_units) if len(kept) else kept


def _layer_map(plan: Plan) -> list[tuple[int, int]]:
    """(dense layer, pruned layer) for every layer the plan keeps."""
    removed = set(plan.removed_layers())
    kept = [i for i in range(plan.n_layers) if i not in removed]
    return list(zip(kept, range(len(kept))))


def _wanted(plan: Plan, cfg: ReconstructConfig, layer: int) -> list[str]:
    return [b for b in BLOCKS if b in cfg.blocks and plan.removed[b][layer]]


def _out_proj(layer: nn.Module, spec, block: str) -> nn.Linear:
    proj = layer_parts(layer, spec).out_proj(block)
    if proj is None:
        raise ValueError(f"the {block} block of this layer is emptied: it has no output projection to re-fit")
    return proj


def _solve(ne: NormalEquations, dense_layer: nn.Module, spec, plan: Plan, layer: int, block: str,
           cfg: ReconstructConfig) -> dict:
    proj = _out_proj(dense_layer, spec, block)
    try:
        return ne.solve(proj.weight, proj.bias, _kept_columns(plan, layer, block, proj.in_features),
                        damping=cfg.damping, fit_bias=cfg.bias, fit_weights=cfg.weights, toward=cfg.toward)
    except FloatingPointError as e:
        raise FloatingPointError(f"layer {layer} {block}: {e}") from None


# ----------------------------------------------------------------------------------------------
# The two modes


@torch.no_grad()
def _one_shot(dense: nn.Module, plan: Plan, samples: torch.Tensor, cfg: ReconstructConfig,
              progress: bool) -> dict[tuple[int, str], dict]:
    spec = get_spec(dense)
    device = next(dense.parameters()).device
    layers = decoder_layers(dense, spec)
    wanted = [(i, b) for i, _ in _layer_map(plan) for b in _wanted(plan, cfg, i)]
    with eval_mode(dense), gram_sums(dense, cfg.blocks, lambda layer, block: (layer, block) in wanted) as sums:
        for s in tqdm(range(0, len(samples), cfg.batch_size), desc="reconstruction (dense pass)",
                      disable=not progress, leave=False):
            dense(input_ids=samples[s : s + cfg.batch_size].to(device), use_cache=False)
    return {(i, b): _solve(sums[i, b], layers[i], spec, plan, i, b, cfg) for i, b in wanted}


@torch.no_grad()
def _sequential(dense: nn.Module, pruned: nn.Module, plan: Plan, samples: torch.Tensor, cfg: ReconstructConfig,
                progress: bool) -> dict[tuple[int, str], dict]:
    spec, geo = get_spec(dense), geometry(dense.config)
    device = next(dense.parameters()).device
    dense_layers, pruned_layers = decoder_layers(dense, spec), decoder_layers(pruned, spec)
    hidden, calls = recorded_inputs(dense, samples, cfg.batch_size)  # the pruned model's stream, from its first layer
    with eval_mode(dense), eval_mode(pruned):
        out: dict[tuple[int, str], dict] = {}
        for i, j in tqdm(_layer_map(plan), desc="reconstruction (layer by layer)", disable=not progress,
                         leave=False):
            dense_layer, layer = dense_layers[i], pruned_layers[j]
            for block in _wanted(plan, cfg, i):
                ne = NormalEquations(_out_proj(dense_layer, spec, block).in_features, device)
                add = lambda l, s, x, ne=ne: ne.add(x) if l == i else None  # noqa: E731
                for h, kw in zip(hidden, (c[i] for c in calls)):
                    if block == "attn":  # the dense layer on the pruned stream: its full attention heads
                        with trace(dense, [CHANNEL_SITES[block]], add):
                            call_layer(dense_layer, h, kw)
                    else:  # the dense MLP on the pruned layer's (reconstructed) MLP input
                        got = []
                        with trace(pruned, ["mlp_block"], lambda l, s, x: got.append(x) if l == j else None):
                            call_layer(layer, h, kw)
                        with trace(dense, [CHANNEL_SITES[block]], add):
                            layer_parts(dense_layer, spec).mlp(got[0])
                out[(i, block)] = _solve(ne, dense_layer, spec, plan, i, block, cfg)
                _apply_block(layer, spec, block, out[(i, block)], geo.hidden)
            hidden = [call_layer(layer, h, c[i]) for h, c in zip(hidden, calls)]
    return out


def _apply_block(layer: nn.Module, spec, block: str, sol: dict, hidden: int) -> None:
    if sol["weight"] is not None:
        proj = _out_proj(layer, spec, block)
        proj.weight.data.copy_(sol["weight"].to(proj.weight.device, proj.weight.dtype))
    if sol["bias"] is not None:
        b = add_output_bias(layer, spec, block, hidden)
        b.data.copy_(sol["bias"].to(b.device, b.dtype))


# ----------------------------------------------------------------------------------------------
# The public call


@dataclass
class Reconstruction:
    """Solved output projections per (dense layer, block), and how they were made."""

    solutions: dict[tuple[int, str], dict]
    config: dict
    seconds: float
    tokens: int
    key: str = ""


def solve_reconstruction(dense: nn.Module, plan: Plan, samples: torch.Tensor,
                         cfg: ReconstructConfig = ReconstructConfig(), *, cache: bool | str | os.PathLike = True,
                         progress: bool = True) -> Reconstruction:
    """The solved output projections of `plan` applied to `dense` (cached; `dense` is left unchanged).

    `sequential` works on a pruned copy of `dense` made here (twice the model's memory); `one_shot` needs none,
    so the model can be pruned in place afterwards (`prune_and_reconstruct`).
    """
    check_plan(dense, plan, "`dense`")
    if not isinstance(samples, torch.Tensor) or samples.ndim != 2 or samples.numel() == 0:
        raise ValueError(f"samples must be a non-empty [num_samples, seq_len] tensor of token ids, got "
                         f"{tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__}")
    check_token_ids(samples, dense, "calibration token ids")
    samples = samples[: cfg.num_samples] if cfg.num_samples is not None else samples
    settings = asdict(cfg)
    if cfg.toward == "zero":  # the default keeps the key it had before `toward` existed
        del settings["toward"]
    key = make_key(model=dense, data=samples, settings=dict(plan=plan.removed, **settings))

    def compute() -> Reconstruction:
        t0 = time.perf_counter()
        if cfg.mode == "one_shot":
            sol = _one_shot(dense, plan, samples, cfg, progress)
        else:
            pruned = copy.deepcopy(dense)
            apply_plan(pruned, plan)
            sol = _sequential(dense, pruned, plan, samples, cfg, progress)
            del pruned
        return Reconstruction(sol, asdict(cfg), time.perf_counter() - t0, samples.numel(), key)

    return cached("reconstruction", key, compute, cache=cache, version=CACHE_FORMAT,
                  encode=lambda r: dict(solutions=r.solutions, config=r.config, seconds=r.seconds, tokens=r.tokens,
                                        key=r.key),
                  decode=lambda d: Reconstruction(**d))


def reconstruct(dense: nn.Module, pruned: nn.Module, plan: Plan, samples: torch.Tensor,
                cfg: ReconstructConfig = ReconstructConfig(), *, cache: bool | str | os.PathLike = True,
                progress: bool = True) -> Reconstruction:
    """Re-fit the output projections of `pruned` (= `apply_plan(copy of dense, plan)`, modified in place).

    `dense` is left unchanged. Returns the solutions (cached; a second call applies them without a pass).
    """
    check_plan(dense, plan, "`dense`")
    _check_pruned(dense, pruned, plan)
    rec = solve_reconstruction(dense, plan, samples, cfg, cache=cache, progress=progress)
    apply_reconstruction(pruned, plan, rec)
    return rec


def _check_pruned(dense: nn.Module | None, pruned: nn.Module, plan: Plan) -> None:
    if pruned is dense or layer_widths(pruned) != [tuple(w) for w in plan.kept_widths()]:
        raise ValueError("`pruned` must be a copy of `dense` with the plan applied (apply_plan) and nothing else")


def apply_reconstruction(pruned: nn.Module, plan: Plan, rec: Reconstruction) -> None:
    """Write solved output projections (and biases) into the pruned model; idempotent."""
    _check_pruned(None, pruned, plan)
    spec, geo = get_spec(pruned), geometry(pruned.config)
    layers = decoder_layers(pruned, spec)
    for i, j in _layer_map(plan):
        for block in BLOCKS:
            if (i, block) in rec.solutions:
                _apply_block(layers[j], spec, block, rec.solutions[(i, block)], geo.hidden)


def prune_and_reconstruct(model: nn.Module, plan: Plan, samples: torch.Tensor,
                          cfg: ReconstructConfig | None = ReconstructConfig(), *,
                          progress: bool = True) -> tuple[PruneReport, Reconstruction | None]:
    """Prune `model` in place by `plan`, then (cfg not None) re-fit its output projections in closed form.

    The reconstruction's statistics come from `model` before it is pruned, so no copy is held in one_shot mode.
    """
    rec = solve_reconstruction(model, plan, samples, cfg, progress=progress) if cfg is not None else None
    report = apply_plan(model, plan)
    if rec is not None:
        apply_reconstruction(model, plan, rec)
    return report, rec
