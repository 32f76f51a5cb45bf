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
functions of these accumulators, so switching methods never re-runs the model. With refit=True the pass
also reads the squared gradient of every block's output, then replays the dense model layer by layer for the
reconstruction-aware scores (`workbench.scoring.refit`).
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
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
from workbench.data.text import FISHER_MODES
from workbench.scoring.hooks import (
    CHANNEL_SITES,
    accumulate_in_backward,
    gradient_taps,
    input_sq_norms,
    only_prunable_grads,
    output_grad_squares,
    terms_fn,
)
from workbench.scoring.methods import Accumulators, Importance
from workbench.scoring.refit import REFIT_DAMPING, Recorded, recording, refit_scores

CACHE_KIND = "importance"
# 3: FLAP fluctuation; 4: per-sequence Fisher (optional); 6: FLAP's and Wanda-sp's own statistics; 7: re-fit scores
CACHE_FORMAT = 7


# ----------------------------------------------------------------------------------------------
# Hooks (only inside context managers)


# Which traced input feeds each unit-indexed weight (Wanda's ‖x‖ per input feature).
_WANDA_SITE = {"q.weight": "attn_input", "k.weight": "attn_input", "v.weight": "attn_input",
               "o.weight": "attn_channels", "gate.weight": "mlp_input", "up.weight": "mlp_input",
               "down.weight": "mlp_channels"}


# ----------------------------------------------------------------------------------------------
# The pass


def _wanda_scores(model: nn.Module, norms: dict[tuple[int, str], torch.Tensor]
                  ) -> tuple[dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]]]:
    """Σ_e |w_e|·‖x_j(e)‖₂ per unit over all of its weights, from accumulated squared input norms; and Wanda-sp's
    own statistic (An et al., 2024, its code's `prune_wanda_sp`): the output projection's columns only, each
    column's |w|·‖x‖ averaged over its rows, summed over the unit's columns."""
    geo = geometry(model.config)
    out: dict[str, list[torch.Tensor]] = {b: [] for b in BLOCKS}
    out_proj: dict[str, list[torch.Tensor]] = {b: [] for b in BLOCKS}
    for i, block, parts in iter_blocks(model):
        n = block_units(parts, block, geo.head_dim)
        total = torch.zeros(n, dtype=torch.float32)
        columns = torch.zeros(n, dtype=torch.float32)
        if n:
            for up in block_params(parts, block):
                if up.name not in _WANDA_SITE:  # biases see no input
                    continue
                xnorm = norms[(i, _WANDA_SITE[up.name])].sqrt().to(up.param.device)
                terms = up.param.detach().float().abs() * xnorm[None, :]  # one product for both statistics
                total += reduce_to_units(terms, up.axis, n).cpu()
                if up.name in ("o.weight", "down.weight"):
                    columns = terms.mean(0).reshape(n, -1).sum(1).cpu()
        out[block].append(total)
        out_proj[block].append(columns)
    return out, out_proj


def _fluctuation_scores(model: nn.Module, norms: dict[tuple[int, str], torch.Tensor],
                        tokens: int) -> tuple[dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]]]:
    """FLAP's fluctuation metric (An et al., 2024) per unit: Σ_j Var(x_j)·‖W[:, j]‖² over the unit's input
    columns j of o_proj / down_proj (how much the output moves when the column is replaced by its mean); and
    FLAP's own unit statistic from the same columns (`_flap_units`)."""
    geo = geometry(model.config)
    out: dict[str, list[torch.Tensor]] = {b: [] for b in BLOCKS}
    flap: dict[str, list[torch.Tensor]] = {b: [] for b in BLOCKS}
    for i, block, parts in iter_blocks(model):
        n = block_units(parts, block, geo.head_dim)
        if not n:
            out[block].append(torch.zeros(0))
            flap[block].append(torch.zeros(0))
            continue
        site = CHANNEL_SITES[block]
        mean = norms[(i, f"sum:{site}")].double() / tokens
        var = (norms[(i, site)].double() / tokens - mean.square()).clamp_min(0)
        w = parts.out_proj(block).weight.detach().double()
        per_column = var.to(w.device) * w.square().sum(0)
        out[block].append(per_column.reshape(n, -1).sum(1).float().cpu())
        flap[block].append(_flap_units(per_column, n, block).float().cpu())
    return out, flap


def _flap_units(per_column: torch.Tensor, n: int, block: str) -> torch.Tensor:
    """FLAP's adaptive-structure statistic of a layer's units, as its code computes it (`prune_flap`, structure
    AL-AM): the attention columns' fluctuation squared, each layer's columns standardized (mean 0, unbiased std
    1; all of a layer's attention columns together, its MLP channels together), a head's (here: a KV group's)
    columns averaged. Comparable across layers and blocks, as FLAP ranks them in one list."""
    col = per_column.square() if block == "attn" else per_column
    std = col.std() if col.numel() > 1 else col.new_zeros(())
    z = (col - col.mean()) / std if std > 0 else torch.zeros_like(col)
    return z.reshape(n, -1).mean(1)


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
    refit: bool = False,
    refit_damping: float = REFIT_DAMPING,
    refit_toward: str = "zero",
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

    refit=True adds the reconstruction-aware scores (the `refit` importance method): the pass also sums the
    squared gradient of every block's output, then the dense model is replayed one layer at a time for the
    Gram matrices and the greedy re-fit order (`workbench.scoring.refit`), for a re-fit with ridge
    `refit_damping` pulling toward `refit_toward` ("zero" or "dense"). Data-parallel, each process replays its
    own share of the samples and every layer's Grams are all-reduced before the (identical) greedy orders.
    """
    if samples.ndim != 2 or samples.numel() == 0:
        raise ValueError(f"samples must be a non-empty [num_samples, seq_len] tensor, got shape {tuple(samples.shape)}")
    if samples.shape[1] < 2:
        raise ValueError(f"samples have seq_len={samples.shape[1]}: at least 2 tokens are needed, since the loss "
                         "predicts each token from the ones before it")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be a positive integer")
    check_choice("fisher", fisher, FISHER_MODES)
    if not isinstance(refit, bool):
        raise TypeError(f"refit={refit!r} must be True or False")
    terms = terms_fn(accumulation)
    check_token_ids(samples, model, "calibration token ids")
    rank, world = _rank_and_world(data_parallel)
    n_batches_total = -(-len(samples) // batch_size)
    if n_batches_total < world:
        raise ValueError(f"{n_batches_total} batches of {batch_size} cannot feed {world} processes; "
                         f"use at least {world * batch_size} samples or a smaller batch_size")
    run = ImportancePass(model, per_sequence=fisher == "sequence", terms=terms, outputs=refit)
    t0 = time.perf_counter()
    try:
        with run.hooks(gradient_checkpointing) as norms:
            starts = range(rank * batch_size, len(samples), world * batch_size)  # this process's share
            for start in tqdm(starts, desc="importance", disable=not progress or rank != 0, leave=False):
                run.batch(samples[start : start + batch_size])
            if world > 1:
                outputs = [run.output_sums[k] for k in sorted(run.output_sums, key=str)]
                run.n_batches, run.n_tokens = _all_reduce_parts(run.first, run.fisher_b, run.fisher_s, run.stats,
                                                                norms, run.n_batches, run.n_tokens, outputs)
        wanda, wanda_sp = _wanda_scores(model, norms)
        fluctuation, flap = _fluctuation_scores(model, norms, run.n_tokens)
    finally:
        model.zero_grad(set_to_none=True)
    refitted = None
    if refit:  # each process replays the layer inputs its share recorded; each layer's Grams summed over processes
        refitted = (*refit_scores(model, None, run.checked_output_sums(), run.n_tokens, batch_size=batch_size,
                                  damping=refit_damping, toward=refit_toward, progress=progress and rank == 0,
                                  reduce=_all_reduce_sum if world > 1 else None, recorded=run.recorded),
                    dict(damping=refit_damping, toward=refit_toward))
        run.recorded = None
    return run.result(wanda, wanda_sp, fluctuation, flap, seconds=time.perf_counter() - t0, calibration=calibration,
                      sequences=len(samples), refit=refitted)


class ImportancePass:
    """The state of one calibration pass: per-block accumulators on their weights' devices, the gradient
    statistics, and the hooks that fill them (each gradient reduced to per-unit sums as backward produces it).

    `compute_importance` is the way to run one; this class holds what its hooks share between batches.
    """

    def __init__(self, model: nn.Module, *, per_sequence: bool, terms: Callable, outputs: bool = False):
        self.model, self.per_sequence, self.terms, self.outputs = model, per_sequence, terms, outputs
        self.output_sums: dict[tuple[int, str], torch.Tensor] = {}  # Σ (∂ΣNLL/∂y)² per block output (outputs=True)
        self.recorded: Recorded | None = None  # the layers' inputs of every forward call (outputs=True), for the replay
        self.predicted = 1  # tokens the current batch's loss averages over
        geo = geometry(model.config)
        self.device = model.get_input_embeddings().weight.device  # where the token ids go in
        self.blocks = list(iter_blocks(model))
        self.n_units = {(i, b): block_units(parts, b, geo.head_dim) for i, b, parts in self.blocks}
        self.taps = [(i, b, up) for i, b, parts in self.blocks for up in block_params(parts, b)]
        home = {(i, b): torch.device("cpu") for i, b, _ in self.blocks}  # each block's accumulators: its weights'
        home.update({(i, b): up.param.device for i, b, up in self.taps})
        self.home = home
        self.first = {(i, b): self._zeros(i, b) for i, b, _ in self.blocks}
        self.fisher_b = {(i, b): self._zeros(i, b) for i, b, _ in self.blocks}
        self.fisher_s = {(i, b): self._zeros(i, b) for i, b, _ in self.blocks} if per_sequence else None
        self.scale = 1.0  # 1 / (the current window's share of its batch's loss)
        self.in_forward = False  # the input sums skip a checkpointed layer's recomputation during backward
        self.last_part = True  # with fisher="sequence", .grad is complete only after a batch's last window
        self.stat_keys = [(i, b, up.name) for i, b, up in self.taps]
        # abs_sum, sq_sum, max_abs, zeros per module, accumulated on the device
        self.stats = torch.zeros(len(self.stat_keys), 4, dtype=torch.float64, device=self.device)
        self.batch_stats: list[torch.Tensor | None] = [None] * len(self.taps)
        self.n_batches, self.n_tokens = 0, 0

    def _zeros(self, i: int, b: str) -> torch.Tensor:
        return torch.zeros(self.n_units[(i, b)], dtype=torch.float32, device=self.home[(i, b)])

    def _tap(self, k: int, g: torch.Tensor) -> None:
        """Per-sequence Fisher: one window's gradient of one parameter, squared per unit."""
        assert self.fisher_s is not None
        i, b, up = self.taps[k]
        prod = up.param.detach().float() * (g.float() * self.scale)
        self.fisher_s[(i, b)] += reduce_to_units(prod.square(), up.axis, self.n_units[(i, b)])

    def _reduce_grad(self, k: int) -> None:
        """A parameter's batch gradient is complete: add its per-unit terms and statistics, then free it."""
        if not self.last_part:
            return
        i, b, up = self.taps[k]
        f, s, st = self.terms(up.param.detach(), up.param.grad, up.axis, self.n_units[(i, b)])
        self.first[(i, b)] += f
        self.fisher_b[(i, b)] += s
        self.batch_stats[k] = st
        up.param.grad = None

    @contextlib.contextmanager
    def hooks(self, gradient_checkpointing: bool = False) -> Iterator[dict]:
        """Inside: eval mode, gradients only for prunable weights, the input-norm sums (yielded) and the
        gradient hooks; everything is removed on exit."""
        params = [up.param for _, _, up in self.taps]
        taps_on = gradient_taps(params, self._tap) if self.per_sequence else contextlib.nullcontext()
        outputs_on = (output_grad_squares(self.model, lambda: self.predicted, when=lambda: self.in_forward)
                      if self.outputs else contextlib.nullcontext({}))
        # with the output gradients (the re-fit scores), the layers' inputs are recorded for their replay
        recording_on = (recording(self.model, when=lambda: self.in_forward) if self.outputs
                        else contextlib.nullcontext(None))
        with (eval_mode(self.model), only_prunable_grads(self.model),
              checkpointed_layers(self.model, gradient_checkpointing),
              input_sq_norms(self.model, when=lambda: self.in_forward) as norms, taps_on,
              outputs_on as self.output_sums, recording_on as self.recorded,
              accumulate_in_backward(params, self._reduce_grad)):
            yield norms

    def checked_output_sums(self) -> dict[tuple[int, str], torch.Tensor]:
        """The blocks' squared output gradients, each block's present (a clear error when one never got any)."""
        missing = [f"layer {i} {b}" for i, b, parts in self.blocks
                   if self.n_units[(i, b)] and (i, b) not in self.output_sums]
        if missing:
            raise RuntimeError(f"no gradient reached the output of {len(missing)} block(s) ({', '.join(missing[:5])}); "
                               "the re-fit scores need every block's output gradient")
        return {k: v.cpu() for k, v in self.output_sums.items()}

    def batch(self, batch: torch.Tensor) -> None:
        """Forward and backward over one batch of token windows (inside `hooks`)."""
        batch = batch.to(self.device)
        # one window at a time with fisher="sequence": each loss / len(batch), so .grad sums to the batch's
        windows = batch.split(1) if self.per_sequence else (batch,)
        # the loss of a window averages over its predicted tokens and is weighted by its share of the batch: the
        # gradient of the batch's summed NLL is the loss's times the batch's predicted tokens
        self.predicted = len(batch) * (batch.shape[1] - 1)
        for w, part in enumerate(windows):
            self.in_forward = True
            loss = self.model(input_ids=part, labels=part, use_cache=False).loss
            self.in_forward = False
            if not torch.isfinite(loss):
                raise FloatingPointError(_locate_nonfinite_forward(self.model, part, self.n_batches))
            self.scale = len(batch) / len(part)
            self.last_part = w == len(windows) - 1
            (loss * (len(part) / len(batch))).backward()
        missing = [self.stat_keys[k] for k, st in enumerate(self.batch_stats) if st is None]
        if missing:
            where = ", ".join(f"layer {i} {b}.{name}" for i, b, name in missing[:5])
            raise RuntimeError(f"no gradient reached {len(missing)} prunable parameter(s) ({where}); "
                               "every prunable weight must take part in the loss")
        this_batch = torch.stack([st.to(self.device) for st in self.batch_stats if st is not None]).double()
        self.batch_stats[:] = [None] * len(self.taps)
        _check_finite(this_batch, self.stat_keys)
        stats = self.stats
        stats[:, :3] = torch.stack([stats[:, 0] + this_batch[:, 0], stats[:, 1] + this_batch[:, 1],
                                    torch.maximum(stats[:, 2], this_batch[:, 2])], dim=1)
        stats[:, 3] += this_batch[:, 3]
        self.n_batches += 1
        self.n_tokens += batch.numel()

    def result(self, wanda: dict, wanda_sp: dict, fluctuation: dict, flap: dict, *, seconds: float, calibration: dict | None,
               sequences: int, refit: tuple[dict, dict, dict] | None = None) -> Importance:
        """The accumulated pass as an `Importance` (accumulators on the CPU, the gradient-statistics table)."""
        blocks, n_units = self.blocks, self.n_units
        magnitude: dict[str, list[torch.Tensor]] = {b: [] for b in BLOCKS}
        for i, b, parts in blocks:
            m = torch.zeros(n_units[(i, b)], dtype=torch.float32)
            for up in block_params(parts, b):
                m += reduce_to_units(up.param.detach().float().abs(), up.axis, n_units[(i, b)]).cpu()
            magnitude[b].append(m)
        numel = {(i, b, up.name): up.param.numel() for i, b, parts in blocks for up in block_params(parts, b)}
        s = self.stats.cpu()
        grad_stats = pd.DataFrame([
            dict(layer=i, block=b, module=name, numel=numel[(i, b, name)],
                 abs_sum=float(s[k, 0]), sq_sum=float(s[k, 1]), max_abs=float(s[k, 2]), zeros=float(s[k, 3]))
            for k, (i, b, name) in enumerate(self.stat_keys)
        ])
        grad_stats.attrs["batches"] = self.n_batches

        def per_block(acc: dict) -> dict[str, list[torch.Tensor]]:
            return {b: [acc[(i, b)].cpu() for i, bb, _ in blocks if bb == b] for b in BLOCKS}

        acc = Accumulators(
            first=per_block(self.first), fisher=per_block(self.fisher_b), magnitude=magnitude, wanda=wanda, wanda_sp=wanda_sp,
            fluctuation=fluctuation, flap=flap, batches=self.n_batches, tokens=self.n_tokens,
            fisher_seq=per_block(self.fisher_s) if self.fisher_s is not None else None,
            sequences=sequences if self.per_sequence else 0,
            refit=refit[0] if refit is not None else None, refit_raw=refit[1] if refit is not None else None,
            refit_ridge=refit[2] if refit is not None else None,
        )
        return Importance(
            acc=acc, grad_stats=grad_stats, widths=layer_widths(self.model),
            model=str(getattr(self.model.config, "name_or_path", "")), calibration=dict(calibration or {}),
            seconds=seconds,
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


def _all_reduce_sum(t: torch.Tensor) -> None:
    """Sum a tensor over the processes, in place."""
    import torch.distributed as dist  # deferred: only data-parallel calibration needs it

    dist.all_reduce(t, op=dist.ReduceOp.SUM)


@torch.no_grad()
def _all_reduce_parts(first: dict, fisher_b: dict, fisher_s: dict | None, stats: torch.Tensor, norms: dict,
                      n_batches: int, n_tokens: int, more: Sequence[torch.Tensor] = ()) -> tuple[int, int]:
    """Sum every process's accumulators (and the tensors `more`) in place (the max of the gradient maxima);
    return the total counts."""
    import torch.distributed as dist  # deferred: only data-parallel calibration needs it

    tensors = [*first.values(), *fisher_b.values(), *(fisher_s or {}).values(),
               *(norms[k] for k in sorted(norms, key=str)), *more]
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
    refit: bool = False,
    refit_damping: float = REFIT_DAMPING,
    refit_toward: str = "zero",
) -> Importance:
    """`compute_importance`, cached (`workbench.core.cache`) by the model's content, the samples, the batch size,
    the Fisher mode and `refit` with its ridge (not by the number of processes, gradient checkpointing or the
    accumulation: they give the same result).

    `cache=True`: memory + `data_cache/importance/`; a folder: memory + that folder; False: always computed.
    With `data_parallel=True` every process reads the cache and only rank 0 writes it.
    """
    settings: dict = dict(batch_size=batch_size, fisher=fisher, refit=refit)
    if refit and (refit_damping, refit_toward) != (REFIT_DAMPING, "zero"):  # the default ridge keeps its earlier key
        settings.update(refit_damping=refit_damping, refit_toward=refit_toward)
    key = make_key(model=model, data=samples, settings=settings)
    rank, _ = _rank_and_world(data_parallel)

    def compute() -> Importance:
        imp = compute_importance(model, samples, batch_size=batch_size, fisher=fisher, progress=progress,
                                 calibration=calibration, data_parallel=data_parallel,
                                 gradient_checkpointing=gradient_checkpointing, accumulation=accumulation,
                                 refit=refit, refit_damping=refit_damping, refit_toward=refit_toward)
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
