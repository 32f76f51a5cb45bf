"""Reconstruction-aware unit scores: what removing a unit costs once the kept units are re-fitted.

A block's output is `y = W h + b` (W = o_proj over the heads' context, or down_proj over the MLP channels).
After pruning, reconstruction (`workbench.surgery.reconstruct`) re-fits the kept columns of W, and b, by ridge
least squares to the dense output. A unit whose output the kept units can reproduce then costs little, which
first-order Taylor cannot see. This module scores units by the error that remains after that optimal re-fit.

The Gram matrix G = Σ_tokens h̃ h̃ᵀ of h̃ = [h, 1] (`NormalEquations`, the one the reconstruction streams)
gives everything. With G̃ = G + λ·mean(diag G)·I on the h part (the constant is never damped), the kept
columns S (the constant always among them), P = G̃_S⁻¹ and W* the optimal re-fitted weights on S, removing a
unit Q ⊂ S (a KV group's head columns, or one MLP channel) increases the row-weighted residual error by

    ΔE_Q = Σ_r f_r · W*_{r,Q} (P_QQ)⁻¹ W*_{r,Q}ᵀ                                  (Schur complement)

after which the re-fit and the inverse are updated in closed form: W*_R −= W*_Q P_QQ⁻¹ P_Q,R and
P_RR −= P_R,Q P_QQ⁻¹ P_Q,R. This is Optimal Brain Surgeon's update (Hassibi & Stork, 1993) with a group of
columns at a time, as SlimGPT (Ling et al., 2024) does for heads; `tests/scoring/test_refit.py` checks it
against an explicit ridge re-fit of every prefix.

What the ridge pulls toward (`toward`): "zero" is plain ridge, λ‖W'‖². "dense" is λ‖W' − W‖² with the
removed columns' λ‖W_Q‖² counted as error: the damping acts as pseudo-tokens √λ·e_j whose targets are the
dense weights' own outputs, so every formula above holds with the cross term taken from G̃ instead of G. A
block that loses nothing is then left exactly as it was, and a large λ keeps the re-fit near the dense weights
instead of shrinking them; measured on the default model, that carries better out of the calibration domain.

Across layers: the row weights f_r are the mean over calibration tokens of (∂ΣNLL/∂y_r)², the diagonal of the
empirical Fisher of the block's output (read by tensor hooks during the importance pass). ½·ΔE/N is then the
second-order increase of the mean calibration loss, in the same units for every block, so one global knapsack
(score = loss increase / exact parameter cost, `plans.selection`) allocates the budget across layers.

Per block the units are removed greedily, `REFIT_STEPS` batches of the lowest ΔE (one KV group at a time),
the scores updated after each batch; a batch's exact ΔE is shared among its units in proportion to their
own. The marginal losses along that order are pooled to be non-decreasing (pool-adjacent-violators), so the
global selection of the lowest scores takes a prefix of each block's order.

Streaming: the dense model is replayed one decoder layer at a time from the layer inputs the importance pass
recorded during its own forward passes (`recording`), so one layer's Gram matrices live at a time:
(d_attn + 1)² + (d_mlp + 1)² float64 values, plus the hidden states of the calibration samples (N·T·hidden).
Llama-3-8B: 4097² + 14337² doubles ≈ 1.8 GB; 64 × 128 tokens of 4096 floats ≈ 134 MB. Time: one forward pass
for the replay and the Grams (their products: N·T·(d_attn² + d_mlp²) per layer) plus the greedy updates,
≈ REFIT_STEPS·(d + 1)² per block (`benchmarks/refit.py` measures both).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from workbench.core.arch import BLOCKS, decoder_layers, geometry, get_spec, layer_parts
from workbench.core.models import eval_mode
from workbench.core.registry import check_choice
from workbench.core.tracer import layer_calls, trace
from workbench.core.units import block_units
from workbench.data.text import REFIT_DAMPING, REFIT_TOWARD
from workbench.scoring.hooks import CHANNEL_BLOCKS, CHANNEL_SITES

REFIT_STEPS = 64  # greedy batches per MLP block (attention: one KV group at a time)


# ----------------------------------------------------------------------------------------------
# Normal equations (shared with the reconstruction)


class NormalEquations:
    """Streaming Gram matrix G = Σ x̃ x̃ᵀ of one block's full activations, x̃ = [x, 1]; float64 sums of float32
    per-batch products.

    With targets y = W x + b from the dense weights, both sides of every least-squares problem on a subset
    of x's columns follow from G: Σ x̃_S x̃_Sᵀ = G[S, S] and Σ x̃_S yᵀ = G[S, :] [W, b]ᵀ.
    """

    def __init__(self, n_in: int, device: torch.device | str = "cpu"):
        self.gram = torch.zeros(n_in + 1, n_in + 1, dtype=torch.float64, device=device)

    @property
    def tokens(self) -> int:
        return int(self.gram[-1, -1])

    def add(self, x: torch.Tensor) -> None:
        """Add tokens x [..., n_in]."""
        x = x.reshape(-1, x.shape[-1])
        x = x.float() if x.dtype != torch.float64 else x  # one batch's product in float32, the sum in float64
        xt = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)
        self.gram += (xt.T @ xt).double()

    def check(self) -> None:
        if self.tokens == 0:
            raise ValueError("no tokens were accumulated for this block")
        if not bool(torch.isfinite(self.gram).all()):
            raise FloatingPointError(
                "the calibration activations entering this block's output projection hold inf/NaN: the model "
                "overflows on these samples (e.g. in float16) or its weights hold NaN. No damping fixes that: "
                "check the model, or use float32 / bfloat16")

    def solve(self, weight: torch.Tensor, bias: torch.Tensor | None, kept: torch.Tensor, *, damping: float,
              fit_bias: bool = True, fit_weights: bool = True, toward: str = "zero") -> dict:
        """Solve for the kept columns `kept` of the output projection (weight [n_out, n_in], bias or None); the
        ridge term pulls the weights toward `toward`: "zero" or "dense" (their own dense values).

        Returns {"weight": [n_out, len(kept)] or None (unchanged), "bias": [n_out] or None (unchanged)}.
        """
        check_choice("toward", toward, REFIT_TOWARD)
        n = self.gram.shape[0] - 1
        self.check()
        w_aug = augmented(weight, bias)
        kept = kept.to(self.gram.device)
        const = torch.tensor([n], device=self.gram.device)
        if not len(kept) or not fit_weights:  # the bias alone: b' = mean(y) − W_kept·mean(x_kept)
            mean = self.gram[n] / self.tokens
            w_kept = w_aug[kept] if len(kept) else None
            b = mean @ w_aug - (mean[kept] @ w_kept if w_kept is not None else 0)
            return dict(weight=None, bias=b.float().cpu() if fit_bias else None)
        idx = torch.cat([kept, const]) if fit_bias else kept
        gram = self.gram[idx][:, idx]
        # λ is scaled by the block's whole Gram (not the kept columns'): the same ridge whatever is kept, as the
        # re-fit scores assume; toward the dense weights, the cross term comes from the damped Gram
        scale = float(torch.diagonal(self.gram)[:n].mean().clamp_min(1e-12))
        source = damped(self.gram, damping, n, scale) if toward == "dense" else self.gram
        cross = source[idx] @ w_aug if fit_bias else source[idx][:, :n] @ w_aug[:n]  # no bias: b stays
        sol_w, sol_b = solve_ridge(gram, cross, damping, fit_bias, scale)
        return dict(weight=sol_w.float().cpu(), bias=sol_b.float().cpu() if sol_b is not None else None)


def augmented(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[Wᵀ; bᵀ] in float64 ([n_in + 1, n_out]; a zero bias when there is none)."""
    b = bias.detach().double() if bias is not None else weight.new_zeros(weight.shape[0], dtype=torch.float64)
    return torch.cat([weight.detach().double().T, b[None]], dim=0)


def damped(gram: torch.Tensor, damping: float, n: int, scale: float | None = None) -> torch.Tensor:
    """A copy of `gram` with λ·scale added to its first n diagonal entries (the constant is not damped); the
    scale is the mean of those entries unless given (a block's full Gram's, when `gram` is a subset of it)."""
    if isinstance(damping, bool) or not damping >= 0 or not math.isfinite(damping):
        raise ValueError(f"damping={damping!r} must be a finite number >= 0")
    g = gram.clone()
    if n:
        diag = torch.diagonal(g)[:n]
        diag += damping * (float(diag.mean().clamp_min(1e-12)) if scale is None else scale)
    return g


def solve_ridge(gram: torch.Tensor, cross: torch.Tensor, damping: float,
                bias: bool, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Solve (G + λ·s·I) W̃ = C, s = mean(diag G) unless `scale` is given; with `bias` the last row/column is
    the constant, never damped.

    Returns (W' [n_out, n], b' [n_out] or None).
    """
    n = gram.shape[0] - (1 if bias else 0)
    g = damped(gram, damping, n, scale)
    try:
        w = torch.linalg.solve(g, cross)
    except RuntimeError:  # singular without damping: the least-norm solution
        w = torch.linalg.lstsq(g.cpu(), cross.cpu(), driver="gelsd").solution.to(g.device)
    if not bool(torch.isfinite(w).all()):
        raise FloatingPointError(f"the reconstruction solve gave inf/NaN (damping={damping}); raise the damping")
    return w[:n].T.contiguous(), (w[n].contiguous() if bias else None)


# ----------------------------------------------------------------------------------------------
# Replaying a model one decoder layer at a time


Recorded = tuple[list[torch.Tensor], list[list[dict]]]  # per forward call: layer 0's hidden states, every layer's kwargs


@contextlib.contextmanager
def recording(model: nn.Module, when: Callable[[], bool] = lambda: True) -> Iterator[Recorded]:
    """Inside: each forward call (while `when()`) records the first decoder layer's hidden states and what every
    layer is called with besides them (masks and positions: a layer's mask may depend on its attention type),
    detached, so the layers can then be replayed one at a time. The importance pass records its own forward
    calls this way, so the re-fit scores need no forward pass of their own."""
    hidden: list[torch.Tensor] = []
    calls: list[list[dict]] = []

    def record(i: int, args: tuple, kw: dict) -> None:
        if not when():  # e.g. a checkpointed layer recomputed during backward
            return
        if i == 0:
            hidden.append((args[0] if args else kw["hidden_states"]).detach())
            calls.append([])
        calls[-1].append({k: _detached(v) for k, v in kw.items() if k != "hidden_states"})

    with layer_calls(model, record):
        yield hidden, calls


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):  # e.g. the rotary (cos, sin)
        return tuple(_detached(v) for v in value)
    return value


@torch.no_grad()
def recorded_inputs(model: nn.Module, samples: torch.Tensor, batch_size: int) -> Recorded:
    """One forward pass over `samples` in batches, recorded (`recording`)."""
    device = next(model.parameters()).device
    with eval_mode(model), recording(model) as recorded:
        for s in range(0, len(samples), batch_size):
            model(input_ids=samples[s : s + batch_size].to(device), use_cache=False)
    return recorded


def call_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """A decoder layer's output hidden states (whatever the layer returns around them)."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def layer_grams(model: nn.Module, samples: torch.Tensor | None, batch_size: int = 4, *, progress: bool = True,
                recorded: Recorded | None = None) -> Iterator[tuple[int, dict[str, NormalEquations]]]:
    """(layer, {block: Gram of its output projection's input}) of the dense model, one layer at a time: the
    layer is replayed on the recorded inputs (`recorded`, else one forward pass over `samples`), its Grams
    yielded, then its outputs feed the next layer."""
    spec = get_spec(model)
    layers = decoder_layers(model, spec)
    if recorded is None:
        if samples is None:
            raise ValueError("layer_grams needs the samples or their recorded inputs")
        recorded = recorded_inputs(model, samples, batch_size)
    for i, folds in replayed_grams(model, recorded, lambda layer, block: True, len(layers), progress=progress,
                                   desc="re-fit scores (layer by layer)"):
        yield i, folds[0]


@torch.no_grad()
def replayed_grams(model: nn.Module, recorded: Recorded, wanted: Callable[[int, str], bool], n_layers: int, *,
                   folds: int = 1, progress: bool = True, desc: str = "layer by layer"
                   ) -> Iterator[tuple[int, list[dict[str, NormalEquations]]]]:
    """(layer, per fold {block: Gram}) for the first `n_layers` decoder layers, replayed one at a time on the
    recorded inputs (`recording`); forward call n goes to fold n mod `folds`, and only the blocks `wanted(layer,
    block)` accepts are summed. Each layer's Grams are yielded before the next layer runs, so the caller can
    solve and free them: one layer's Grams live at a time."""
    layers = decoder_layers(model, get_spec(model))
    hidden, calls = recorded
    with eval_mode(model):
        for i in tqdm(range(n_layers), desc=desc, disable=not progress, leave=False):
            sums: list[dict[tuple[int, str], NormalEquations]] = [{} for _ in range(folds)]
            replayed = []
            for n, (h, c) in enumerate(zip(hidden, calls)):
                with gram_sums(model, BLOCKS, lambda layer, block, i=i: layer == i and wanted(layer, block),
                               into=sums[n % folds]):
                    replayed.append(call_layer(layers[i], h, c[i]))
            hidden = replayed
            out = [{block: ne for (_, block), ne in fold.items()} for fold in sums]
            del sums
            yield i, out
            for fold in out:  # the caller is done with this layer: its Grams go before the next layer's are made
                fold.clear()


@contextlib.contextmanager
def gram_sums(model: nn.Module, blocks: tuple[str, ...] | list[str], wanted: Callable[[int, str], bool],
              into: dict[tuple[int, str], NormalEquations] | None = None
              ) -> Iterator[dict[tuple[int, str], NormalEquations]]:
    """Inside: every forward pass adds the inputs of the output projections of `blocks` to the Gram matrix of
    each (layer, block) that `wanted(layer, block)` accepts; yields {(layer, block): NormalEquations} (`into`:
    adds to these sums, e.g. one cross-validation fold's, instead of new ones)."""
    device = next(model.parameters()).device
    sums: dict[tuple[int, str], NormalEquations] = {} if into is None else into

    def add(layer: int, site: str, x: torch.Tensor) -> None:
        key = (layer, CHANNEL_BLOCKS[site])
        if wanted(*key):
            if key not in sums:
                sums[key] = NormalEquations(x.shape[-1], device)
            sums[key].add(x)

    with trace(model, [CHANNEL_SITES[b] for b in blocks], add):
        yield sums


# ----------------------------------------------------------------------------------------------
# The greedy removal order of one block


@torch.no_grad()
def removal_order(gram: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, row_weights: torch.Tensor,
                  n_units: int, *, damping: float = REFIT_DAMPING, steps: int = REFIT_STEPS, toward: str = "zero"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every unit of one block in greedy removal order, and the increase of the row-weighted re-fit error
    Σ_r f_r Σ_tokens (y_r − y'_r)² that each removal adds (see the module's docstring; `toward`: what the ridge
    pulls the re-fitted weights toward, "zero" or "dense").

    gram: [n_in + 1, n_in + 1] Gram of [h, 1]; weight: [n_out, n_in]; row_weights: f [n_out]; n_units divides
    n_in (a unit owns n_in / n_units consecutive columns). Units of one column go `ceil(n_units / steps)` at a
    time; wider units (KV groups) one at a time. Returns (order [n_units], marginal [n_units], float64).
    """
    check_choice("toward", toward, REFIT_TOWARD)
    n = gram.shape[0] - 1
    if n % n_units:
        raise ValueError(f"{n} input columns do not split into {n_units} units")
    width = n // n_units
    g = damped(gram.double(), damping, n)
    p = _inverse(g)
    source = g if toward == "dense" else gram.double()  # the cross term's Gram (see the module's docstring)
    w = (p @ (source @ augmented(weight, bias).to(gram.device))).T.contiguous()  # [n_out, n + 1]: the full re-fit
    f = row_weights.double().to(gram.device)[:, None]
    # the units in p's and w's column order; a removed unit's rows and columns are zero until the next compaction
    units = torch.arange(n_units, device=gram.device)
    dead = torch.zeros(n_units, dtype=torch.bool, device=gram.device)
    cols = torch.arange(n, device=gram.device).reshape(n_units, width)
    per_step = max(1, -(-n_units // steps)) if width == 1 else 1
    order, marginal = [], []
    left = n_units
    while left:
        if width == 1:
            own = (f * w[:, :-1].square()).sum(0) / torch.diagonal(p)[:-1].clamp_min(1e-300)
        else:
            own = torch.stack([_group_loss(w, p, f, c) if not dead[u] else w.new_tensor(0.0)
                               for u, c in enumerate(cols)])
        own = own.masked_fill(dead, math.inf)
        pick = torch.argsort(own, stable=True)[: min(per_step, left)]
        q = cols[pick].reshape(-1)
        total = _group_loss(w, p, f, q)
        share = own[pick].clamp_min(0)
        share = share / share.sum() if float(share.sum()) > 0 else torch.full_like(share, 1 / len(share))
        order.append(units[pick])
        marginal.append(share * total)
        # the closed-form update (in place); the removed columns come out zero, and are set exactly so
        inv_qq = _inverse(p[q][:, q])
        w.addmm_(w[:, q] @ inv_qq, p[q], alpha=-1)
        p.addmm_(p[:, q] @ inv_qq, p[q], alpha=-1)
        w[:, q] = 0
        p[q] = 0
        p[:, q] = 0
        dead[pick] = True
        left -= len(pick)
        if left and int(dead.sum()) * 4 >= len(units):  # drop the removed columns once a quarter of them is gone
            keep = ~dead
            kept_cols = torch.cat([cols[keep].reshape(-1), torch.tensor([p.shape[0] - 1], device=gram.device)])
            p, w = p[kept_cols][:, kept_cols], w[:, kept_cols]
            units, dead = units[keep], dead[keep]
            cols = torch.arange(len(units) * width, device=gram.device).reshape(len(units), width)
    return torch.cat(order).cpu(), torch.cat(marginal).cpu()


def _inverse(m: torch.Tensor) -> torch.Tensor:
    """The inverse of a symmetric positive definite matrix (a damped Gram, or a block of its inverse): by Cholesky,
    else (e.g. a dead channel and no damping) the general inverse, else the pseudo-inverse."""
    chol, info = torch.linalg.cholesky_ex(m)
    if not int(info):
        return torch.cholesky_inverse(chol)
    try:
        return torch.linalg.inv(m)
    except RuntimeError:
        return torch.linalg.pinv(m)


def _group_loss(w: torch.Tensor, p: torch.Tensor, f: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Σ_r f_r W_{r,Q} (P_QQ)⁻¹ W_{r,Q}ᵀ: the error added by removing the columns q together."""
    wq = w[:, q]
    return (f * (wq @ _inverse(p[q][:, q])) * wq).sum()


def pooled(order: torch.Tensor, marginal: torch.Tensor) -> torch.Tensor:
    """Per-unit scores (indexed by unit) from a removal order and its marginal losses: the marginals pooled to be
    non-decreasing along the order (pool-adjacent-violators, each unit weighted equally: a block's units cost
    the same), then made strictly increasing by a relative 1e-9 ramp, so that selecting the lowest scores of
    a block always takes a prefix of its order.

    >>> pooled(torch.tensor([2, 0, 1]), torch.tensor([1.0, 3.0, 2.0])).tolist()  # doctest: +ELLIPSIS
    [2.5..., 2.5..., 1.0]
    """
    values: list[float] = []
    counts: list[int] = []
    for v in marginal.double().tolist():
        values.append(v)
        counts.append(1)
        while len(values) > 1 and values[-2] > values[-1]:
            v2, c2, v1, c1 = values.pop(), counts.pop(), values.pop(), counts.pop()
            values.append((v1 * c1 + v2 * c2) / (c1 + c2))
            counts.append(c1 + c2)
    flat = np.repeat(values, counts)
    flat = flat + 1e-9 * max(float(np.abs(flat).max(initial=0.0)), 1e-300) * np.arange(len(flat)) / max(len(flat), 1)
    out = torch.empty(len(order), dtype=torch.float64)
    out[order] = torch.from_numpy(flat)
    return out


# ----------------------------------------------------------------------------------------------
# All blocks


def refit_scores(model: nn.Module, samples: torch.Tensor | None, output_fisher: dict[tuple[int, str], torch.Tensor],
                 tokens: int, *, batch_size: int = 4, damping: float = REFIT_DAMPING, toward: str = "zero",
                 progress: bool = True, reduce: Callable[[torch.Tensor], None] | None = None,
                 recorded: Recorded | None = None) -> tuple[dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]]]:
    """The reconstruction-aware loss increase of every unit, in mean-calibration-loss units: (pooled per-unit
    scores, raw marginals along the greedy order), each block -> per-layer tensors. `damping` / `toward`: the
    ridge of the re-fit the scores assume (the reconstruction's `damping` / `toward`).

    `output_fisher[(layer, block)]`: Σ over the calibration tokens of (∂ΣNLL/∂y)² per output dimension of the
    block's output projection (the importance pass accumulates it); `tokens`: how many tokens those sums hold.
    `reduce`: sums each layer's Gram matrices in place over the processes of a data-parallel pass (each process
    gives its own share of the samples; every process then computes the same orders). `recorded`: the samples'
    recorded layer inputs (`recording`), instead of a forward pass over `samples`.
    """
    spec, head_dim = get_spec(model), geometry(model.config).head_dim
    layers = decoder_layers(model, spec)
    scores: dict[str, list[torch.Tensor]] = {b: [torch.zeros(0)] * len(layers) for b in BLOCKS}
    raw: dict[str, list[torch.Tensor]] = {b: [torch.zeros(0)] * len(layers) for b in BLOCKS}
    for i, grams in layer_grams(model, samples, batch_size, progress=progress, recorded=recorded):
        if reduce is not None:
            for block in sorted(grams):  # the same order on every process
                reduce(grams[block].gram)
        parts = layer_parts(layers[i], spec)
        for block in BLOCKS:
            proj, n_units = parts.out_proj(block), block_units(parts, block, head_dim)
            if proj is None or not n_units:  # an emptied block has no units
                continue
            ne = grams[block]
            try:
                ne.check()
            except (ValueError, FloatingPointError) as e:
                raise type(e)(f"layer {i} {block}: {e}") from None
            f = output_fisher[(i, block)].double() / tokens
            order, marginal = removal_order(ne.gram, proj.weight, proj.bias, f, n_units, damping=damping, toward=toward)
            per_unit = torch.empty(n_units, dtype=torch.float64)
            per_unit[order] = marginal
            scale = 0.5 / ne.tokens  # ½ΔE summed over tokens -> the mean loss's increase
            scores[block][i] = (pooled(order, marginal) * scale).float()
            raw[block][i] = (per_unit * scale).float()
            del ne  # with the generator's dicts cleared, nothing holds this layer's Grams into the next
    return scores, raw
