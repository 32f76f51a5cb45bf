"""One calibration pass that feeds every importance method, with a cache.

A single loop over calibration batches (forward + backward on the LM loss) accumulates, per unit
and in float32 whatever the model's dtype:
  first  = mean over batches of Σ_e |w_e·g_e|          (first-order Taylor)
  fisher = Σ_e w_e² · F_e, F_e = mean over batches of g_e²  (Fisher diagonal, second-order term)
and, with fisher="sequence", the empirical Fisher over sequences (each window's own backward pass, the
gradients read by tensor hooks before they are summed into the batch gradient):
  fisher_seq = Σ_e w_e² · mean over sequences of g_{s,e}²
and, through forward hooks, the squared input-activation norm of every prunable linear layer
(Wanda). Σ_e runs over the parameters the unit owns (`workbench.core.units`). Gradient statistics per
layer, block and module are gathered in the same pass for the diagnosis. Methods are then cheap
functions of these accumulators, so switching methods never re-runs the model.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import asdict

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from workbench.core.arch import BLOCKS, geometry, layer_widths
from workbench.core.cache import cached, lookup, make_key, read_entry, store, write_entry
from workbench.core.models import check_token_ids, checkpointed_layers, eval_mode
from workbench.core.registry import check_choice
from workbench.core.tracer import trace
from workbench.core.units import block_params, block_units, iter_blocks, reduce_to_units
from workbench.data.text import ACCUMULATIONS, FISHER_MODES
from workbench.scoring.methods import Accumulators, Importance

CACHE_KIND = "importance"
CACHE_FORMAT = 4  # 3: FLAP fluctuation added to the accumulators; 4: per-sequence Fisher (optional)


# ----------------------------------------------------------------------------------------------
# Hooks (only inside context managers)


# Which traced input feeds each unit-indexed weight (Wanda's ‖x‖ per input feature).
_WANDA_SITE = {"q.weight": "attn_input", "k.weight": "attn_input", "v.weight": "attn_input",
               "o.weight": "attn_channels", "gate.weight": "mlp_input", "up.weight": "mlp_input",
               "down.weight": "mlp_channels"}


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
        if site in _FLAP_SITE.values():
            put((layer, f"sum:{site}"), x.sum(0))

    with trace(model, ("attn_input", "attn_channels", "mlp_input", "mlp_channels"), add):
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


# ----------------------------------------------------------------------------------------------
# The pass


def _wanda_scores(model: nn.Module, norms: dict[tuple[int, str], torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Σ_e |w_e|·‖x_j(e)‖₂ per unit, from accumulated squared input norms."""
    geo = geometry(model.config)
    out: dict[str, list[torch.Tensor]] = {b: [] for b in BLOCKS}
    for i, block, parts in iter_blocks(model):
        n = block_units(parts, block, geo.head_dim)
        total = torch.zeros(n, dtype=torch.float32)
        if n:
            for up in block_params(parts, block):
                if up.name not in _WANDA_SITE:  # biases see no input
                    continue
                xnorm = norms[(i, _WANDA_SITE[up.name])].sqrt().to(up.param.device)
                w = up.param.detach().float().abs()
                total += reduce_to_units(w * xnorm[None, :], up.axis, n).cpu()
        out[block].append(total)
    return out


_FLAP_SITE = {"attn": "attn_channels", "mlp": "mlp_channels"}


def _fluctuation_scores(model: nn.Module, norms: dict[tuple[int, str], torch.Tensor],
                        tokens: int) -> dict[str, list[torch.Tensor]]:
    """FLAP's fluctuation metric (An et al., 2024) per unit: Σ_j Var(x_j)·‖W[:, j]‖² over the unit's input
    columns j of o_proj / down_proj (how much the output moves when the column is replaced by its mean)."""
    geo = geometry(model.config)
    out: dict[str, list[torch.Tensor]] = {b: [] for b in BLOCKS}
    for i, block, parts in iter_blocks(model):
        n = block_units(parts, block, geo.head_dim)
        if not n:
            out[block].append(torch.zeros(0))
            continue
        site = _FLAP_SITE[block]
        mean = norms[(i, f"sum:{site}")].double() / tokens
        var = (norms[(i, site)].double() / tokens - mean.square()).clamp_min(0)
        w = parts.out_proj(block).weight.detach().double()
        per_column = var.to(w.device) * w.square().sum(0)
        out[block].append(per_column.reshape(n, -1).sum(1).float().cpu())
    return out


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


def _terms_fn(accumulation: str) -> Callable:
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


def compute_importance(
    model: nn.Module,
    samples: torch.Tensor,
    *,
    batch_size: int = 4,
    fisher: str = "batch",
    progress: bool = True,
    calibration: dict | None = None,
    data_parallel: bool = False,
    gradient_checkpointing: bool = False,
    accumulation: str = "eager",
) -> Importance:
    """Run one forward+backward pass over `samples` ([N, seq_len] token ids) and accumulate everything.

    fisher="sequence" runs each window forward and backward on its own (the batch gradient is their mean, so
    every other accumulator is the same as with "batch") and adds the per-sequence Fisher.

    Each parameter's gradient is reduced to per-unit sums the moment backward has produced it, then freed.
    Accumulators live on their parameter's device, so a model dispatched over several devices
    (accelerate's `device_map`) is accumulated where its weights are.

    data_parallel=True (inside an initialised `torch.distributed` process group, e.g. under torchrun): every
    process passes the same `samples` and model, takes batches rank, rank + world, ... of them, and the
    accumulators, gradient statistics and Wanda / FLAP input sums are all-reduced at the end, so every
    process returns the result one process would compute (up to summation order). gloo on CPUs, NCCL on GPUs.

    gradient_checkpointing=True recomputes each decoder layer's forward during backward (activations of one
    layer at a time: bigger batches in less memory); the results are the same. accumulation="compiled" runs
    the per-parameter reduction under `torch.compile` (worth it on GPUs; the first batch pays the compile).
    """
    if samples.ndim != 2 or samples.numel() == 0:
        raise ValueError(f"samples must be a non-empty [num_samples, seq_len] tensor, got shape {tuple(samples.shape)}")
    if samples.shape[1] < 2:
        raise ValueError(f"samples have seq_len={samples.shape[1]}: at least 2 tokens are needed, since the loss "
                         "predicts each token from the ones before it")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be a positive integer")
    check_choice("fisher", fisher, FISHER_MODES)
    terms = _terms_fn(accumulation)
    check_token_ids(samples, model, "calibration token ids")
    rank, world = _rank_and_world(data_parallel)
    n_batches_total = -(-len(samples) // batch_size)
    if n_batches_total < world:
        raise ValueError(f"{n_batches_total} batches of {batch_size} cannot feed {world} processes; "
                         f"use at least {world * batch_size} samples or a smaller batch_size")
    geo = geometry(model.config)
    device = model.get_input_embeddings().weight.device  # where the token ids go in
    blocks = list(iter_blocks(model))
    n_units = {(i, b): block_units(parts, b, geo.head_dim) for i, b, parts in blocks}
    taps = [(i, b, up) for i, b, parts in blocks for up in block_params(parts, b)]
    home = {(i, b): torch.device("cpu") for i, b, _ in blocks}  # each block's accumulators: its weights' device
    home.update({(i, b): up.param.device for i, b, up in taps})
    zeros = lambda i, b: torch.zeros(n_units[(i, b)], dtype=torch.float32, device=home[(i, b)])  # noqa: E731
    first = {(i, b): zeros(i, b) for i, b, _ in blocks}
    fisher_b = {(i, b): zeros(i, b) for i, b, _ in blocks}
    per_seq = fisher == "sequence"
    fisher_s = {(i, b): zeros(i, b) for i, b, _ in blocks} if per_seq else None
    scale = [1.0]  # 1 / (the current window's share of its batch's loss)
    in_forward = [False]  # the input sums skip a checkpointed layer's recomputation during backward
    last_part = [True]  # with fisher="sequence", .grad is complete only after a batch's last window

    def tap(k: int, g: torch.Tensor) -> None:
        i, b, up = taps[k]
        prod = up.param.detach().float() * (g.float() * scale[0])
        fisher_s[(i, b)] += reduce_to_units(prod.square(), up.axis, n_units[(i, b)])

    stat_keys = [(i, b, up.name) for i, b, up in taps]
    # abs_sum, sq_sum, max_abs, zeros per module, accumulated on the device
    stats = torch.zeros(len(stat_keys), 4, dtype=torch.float64, device=device)
    batch_stats: list[torch.Tensor | None] = [None] * len(taps)

    def reduce_grad(k: int) -> None:
        if not last_part[0]:
            return
        i, b, up = taps[k]
        f, s, st = terms(up.param.detach(), up.param.grad, up.axis, n_units[(i, b)])
        first[(i, b)] += f
        fisher_b[(i, b)] += s
        batch_stats[k] = st
        up.param.grad = None

    n_batches, n_tokens = 0, 0
    t0 = time.perf_counter()
    params = [up.param for _, _, up in taps]
    taps_on = gradient_taps(params, tap) if per_seq else contextlib.nullcontext()
    try:
        with (eval_mode(model), only_prunable_grads(model), checkpointed_layers(model, gradient_checkpointing),
              input_sq_norms(model, when=lambda: in_forward[0]) as norms, taps_on,
              accumulate_in_backward(params, reduce_grad)):
            starts = range(rank * batch_size, len(samples), world * batch_size)  # this process's share
            for start in tqdm(starts, desc="importance", disable=not progress or rank != 0, leave=False):
                batch = samples[start : start + batch_size].to(device)
                # one window at a time with fisher="sequence": each loss / len(batch), so .grad sums to the batch's
                windows = batch.split(1) if per_seq else (batch,)
                for w, part in enumerate(windows):
                    in_forward[0] = True
                    loss = model(input_ids=part, labels=part, use_cache=False).loss
                    in_forward[0] = False
                    if not torch.isfinite(loss):
                        raise FloatingPointError(_locate_nonfinite_forward(model, part, n_batches))
                    scale[0] = len(batch) / len(part)
                    last_part[0] = w == len(windows) - 1
                    (loss * (len(part) / len(batch))).backward()
                missing = [stat_keys[k] for k, st in enumerate(batch_stats) if st is None]
                if missing:
                    where = ", ".join(f"layer {i} {b}.{name}" for i, b, name in missing[:5])
                    raise RuntimeError(f"no gradient reached {len(missing)} prunable parameter(s) ({where}); "
                                       "every prunable weight must take part in the loss")
                this_batch = torch.stack([st.to(device) for st in batch_stats]).double()
                batch_stats[:] = [None] * len(taps)
                _check_finite(this_batch, stat_keys)
                stats[:, :3] = torch.stack([stats[:, 0] + this_batch[:, 0], stats[:, 1] + this_batch[:, 1],
                                            torch.maximum(stats[:, 2], this_batch[:, 2])], dim=1)
                stats[:, 3] += this_batch[:, 3]
                n_batches += 1
                n_tokens += batch.numel()
            if world > 1:
                n_batches, n_tokens = _all_reduce_parts(first, fisher_b, fisher_s, stats, norms, n_batches, n_tokens)
        wanda = _wanda_scores(model, norms)
        fluctuation = _fluctuation_scores(model, norms, n_tokens)
    finally:
        model.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0

    magnitude: dict[str, list[torch.Tensor]] = {b: [] for b in BLOCKS}
    for i, b, parts in blocks:
        n = n_units[(i, b)]
        m = torch.zeros(n, dtype=torch.float32)
        for up in block_params(parts, b):
            m += reduce_to_units(up.param.detach().float().abs(), up.axis, n).cpu()
        magnitude[b].append(m)

    numel = {(i, b, up.name): up.param.numel() for i, b, parts in blocks for up in block_params(parts, b)}
    s = stats.cpu()
    grad_stats = pd.DataFrame([
        dict(layer=i, block=b, module=name, numel=numel[(i, b, name)],
             abs_sum=float(s[k, 0]), sq_sum=float(s[k, 1]), max_abs=float(s[k, 2]), zeros=float(s[k, 3]))
        for k, (i, b, name) in enumerate(stat_keys)
    ])
    grad_stats.attrs["batches"] = n_batches
    acc = Accumulators(
        first={b: [first[(i, b)].cpu() for i, bb, _ in blocks if bb == b] for b in BLOCKS},
        fisher={b: [fisher_b[(i, b)].cpu() for i, bb, _ in blocks if bb == b] for b in BLOCKS},
        magnitude=magnitude,
        wanda=wanda,
        fluctuation=fluctuation,
        batches=n_batches,
        tokens=n_tokens,
        fisher_seq=({b: [fisher_s[(i, b)].cpu() for i, bb, _ in blocks if bb == b] for b in BLOCKS}
                    if per_seq else None),
        sequences=len(samples) if per_seq else 0,
    )
    return Importance(
        acc=acc, grad_stats=grad_stats, widths=layer_widths(model),
        model=str(getattr(model.config, "name_or_path", "")), calibration=dict(calibration or {}), seconds=seconds,
    )


def _on_every_rank(flag: bool) -> bool:
    """Whether `flag` holds in every process of the group (one all-reduce; NCCL reduces on the GPU)."""
    import torch.distributed as dist  # deferred: only data-parallel calibration needs it

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _rank_and_world(data_parallel: bool) -> tuple[int, int]:
    if not data_parallel:
        return 0, 1
    import torch.distributed as dist  # deferred: only data-parallel calibration needs it

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("data_parallel=True needs an initialised torch.distributed process group "
                           "(run under torchrun, or call torch.distributed.init_process_group first)")
    return dist.get_rank(), dist.get_world_size()


@torch.no_grad()
def _all_reduce_parts(first: dict, fisher_b: dict, fisher_s: dict | None, stats: torch.Tensor, norms: dict,
                      n_batches: int, n_tokens: int) -> tuple[int, int]:
    """Sum every process's accumulators in place (the max of the gradient maxima); return the total counts."""
    import torch.distributed as dist  # deferred: only data-parallel calibration needs it

    tensors = [*first.values(), *fisher_b.values(), *(fisher_s or {}).values(),
               *(norms[k] for k in sorted(norms, key=str))]
    flat = torch.cat([t.reshape(-1).double().to(stats.device) for t in tensors]
                     + [stats[:, [0, 1, 3]].reshape(-1), stats.new_tensor([n_batches, n_tokens])])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    maxima = stats[:, 2].clone()
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t).to(t.dtype))
        offset += t.numel()
    n = stats.shape[0]
    stats[:, [0, 1, 3]] = flat[offset : offset + 3 * n].view(n, 3)
    stats[:, 2] = maxima
    return int(flat[-2]), int(flat[-1])


@torch.no_grad()
def _locate_nonfinite_forward(model: nn.Module, batch: torch.Tensor, batch_index: int) -> str:
    """Re-run a failing batch with hooks (only on failure) to name the first module whose output is inf/NaN."""
    found: list[str] = []

    def check(layer: int, site: str, t: torch.Tensor) -> None:
        if not found and not bool(torch.isfinite(t).all()):
            found.append(f"layer {layer} {site.removeprefix('output:')}")

    with trace(model, ("outputs",), check):
        model(input_ids=batch, use_cache=False)
    where = found[0] if found else "the embeddings or the LM head"
    return (f"non-finite loss at calibration batch {batch_index}: the first inf/NaN output comes from {where}. "
            "Check the weights there, or use float32/bfloat16 instead of float16.")


def _check_finite(batch_stats: torch.Tensor, keys: list[tuple[int, str, str]]) -> None:
    finite = torch.isfinite(batch_stats[:, :3]).all(dim=1)
    if not bool(finite.all()):
        bad = [keys[k] for k in torch.nonzero(~finite).flatten().tolist()]
        where = ", ".join(f"layer {i} {b}.{name}" for i, b, name in bad[:5])
        raise FloatingPointError(
            f"non-finite gradients (inf/NaN) in {len(bad)} module(s): {where}"
            + (" …" if len(bad) > 5 else "")
            + ". Try float32 or bfloat16 instead of float16, or shorter sequences."
        )


# ----------------------------------------------------------------------------------------------
# Cache


def _encode(imp: Importance) -> dict:
    return dict(acc=asdict(imp.acc), grad_stats=imp.grad_stats.to_dict("list"), grad_batches=imp.grad_stats.attrs.get("batches"),
                widths=imp.widths, model=imp.model, calibration=imp.calibration, seconds=imp.seconds, key=imp.key)


def _decode(d: dict) -> Importance:
    gs = pd.DataFrame(d["grad_stats"])
    gs.attrs["batches"] = d["grad_batches"]
    return Importance(acc=Accumulators(**d["acc"]), grad_stats=gs, widths=[tuple(w) for w in d["widths"]],
                      model=d["model"], calibration=d["calibration"], seconds=d["seconds"], key=d["key"])


def save_importance(imp: Importance, path: str | os.PathLike) -> None:
    """Write an importance result to a file of its own (the cache's format), atomically."""
    write_entry(path, CACHE_KIND, imp.key, CACHE_FORMAT, _encode(imp))


def load_importance(path: str | os.PathLike) -> Importance:
    """Read a file written by `save_importance` or the cache; a clear error naming the file if it is damaged."""
    return _decode(read_entry(path, CACHE_KIND, CACHE_FORMAT))


def importance_cached(
    model: nn.Module,
    samples: torch.Tensor,
    *,
    batch_size: int = 4,
    fisher: str = "batch",
    cache: bool | str | os.PathLike = True,
    progress: bool = True,
    calibration: dict | None = None,
    data_parallel: bool = False,
    gradient_checkpointing: bool = False,
    accumulation: str = "eager",
) -> Importance:
    """`compute_importance`, cached (`workbench.core.cache`) by the model's content, the samples, the batch size and
    the Fisher mode (not by the number of processes, gradient checkpointing or the accumulation: they give the
    same result).

    `cache=True`: memory + `data_cache/importance/`; a folder: memory + that folder; False: always computed.
    With `data_parallel=True` every process reads the cache and only rank 0 writes it.
    """
    key = make_key(model=model, data=samples, settings=dict(batch_size=batch_size, fisher=fisher))
    rank, _ = _rank_and_world(data_parallel)

    def compute() -> Importance:
        imp = compute_importance(model, samples, batch_size=batch_size, fisher=fisher, progress=progress,
                                 calibration=calibration, data_parallel=data_parallel,
                                 gradient_checkpointing=gradient_checkpointing, accumulation=accumulation)
        imp.key = key
        return imp

    if not data_parallel:
        return cached(CACHE_KIND, key, compute, cache=cache, encode=_encode, decode=_decode, version=CACHE_FORMAT)
    # every rank must take the same road: with per-node caches one rank may hold the entry and another not, and
    # a rank that returned early would leave the others waiting in the pass's all-reduce
    found = lookup(CACHE_KIND, key, cache=cache, decode=_decode, version=CACHE_FORMAT)
    if _on_every_rank(found is not None):
        return found
    return store(CACHE_KIND, key, compute(), cache=cache, encode=_encode, version=CACHE_FORMAT, write=rank == 0)
