"""One calibration pass that feeds every importance method, with a cache.

A single loop over calibration batches (forward + backward on the LM loss) accumulates, per unit
and in float32 whatever the model's dtype:
  first  = mean over batches of Σ_e |w_e·g_e|          (first-order Taylor)
  fisher = Σ_e w_e² · F_e, F_e = mean over batches of g_e²  (Fisher diagonal, second-order term)
and, through forward hooks, the squared input-activation norm of every prunable linear layer
(Wanda). Σ_e runs over the parameters the unit owns (`workbench.units`). Gradient statistics per
layer, block and module are gathered in the same pass for the diagnosis. Methods are then cheap
functions of these accumulators, so switching methods never re-runs the model.
"""
from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from workbench.models import DATA_CACHE, decoder_layers, geometry, get_spec, layer_parts, layer_widths
from workbench.units import BLOCKS, block_params, block_units, iter_blocks, reduce_to_units

IMPORTANCE_CACHE = DATA_CACHE / "importance"
CACHE_FORMAT = 1


@dataclass
class Accumulators:
    """Per-unit sums of one calibration pass; every importance method is a function of these."""

    first: dict[str, list[torch.Tensor]]  # block -> per layer [units]: Σ_batches Σ_e |w·g|
    fisher: dict[str, list[torch.Tensor]]  # block -> per layer [units]: Σ_batches Σ_e (w·g)²
    magnitude: dict[str, list[torch.Tensor]]  # block -> per layer [units]: Σ_e |w|
    wanda: dict[str, list[torch.Tensor]]  # block -> per layer [units]: Σ_e |w|·‖x_in(e)‖₂
    batches: int
    tokens: int


@dataclass
class Importance:
    """Cached result of one calibration pass: accumulators, gradient statistics and provenance."""

    acc: Accumulators
    grad_stats: pd.DataFrame
    widths: list[tuple[int, int]]
    model: str
    calibration: dict = field(default_factory=dict)
    seconds: float = 0.0
    key: str = ""

    def scores(self, method: str) -> dict[str, list[torch.Tensor]]:
        """Per-unit importance of one registered method: block -> per-layer tensors."""
        if method not in IMPORTANCE_METHODS:
            raise ValueError(f"importance method {method!r} is not registered; allowed: {list(IMPORTANCE_METHODS)}")
        return IMPORTANCE_METHODS[method].fn(self.acc)


# ----------------------------------------------------------------------------------------------
# The registry of methods (widgets' dropdowns and tests read it)


@dataclass(frozen=True)
class ImportanceMethod:
    name: str
    description: str
    fn: Callable[[Accumulators], dict[str, list[torch.Tensor]]]


def _per_block(fn) -> Callable[[Accumulators], dict[str, list[torch.Tensor]]]:
    def apply(acc: Accumulators) -> dict[str, list[torch.Tensor]]:
        return {b: [fn(acc, b, i) for i in range(len(acc.first[b]))] for b in BLOCKS}

    return apply


IMPORTANCE_METHODS: dict[str, ImportanceMethod] = {
    m.name: m
    for m in [
        ImportanceMethod(
            "taylor", "first-order Taylor: mean over batches of Σ|w·g| over the unit's parameters",
            _per_block(lambda a, b, i: a.first[b][i] / a.batches),
        ),
        ImportanceMethod(
            "taylor2", "second-order Taylor: Σ(|w·g| + ½·w²·F), F = Fisher diagonal (mean of g²)",
            _per_block(lambda a, b, i: a.first[b][i] / a.batches + 0.5 * a.fisher[b][i] / a.batches),
        ),
        ImportanceMethod(
            "wanda", "Wanda: Σ|w|·‖x‖₂ with ‖x‖₂ the input-activation norm over calibration tokens",
            _per_block(lambda a, b, i: a.wanda[b][i]),
        ),
        ImportanceMethod(
            "magnitude", "weight magnitude Σ|w| (baseline; no data needed)",
            _per_block(lambda a, b, i: a.magnitude[b][i]),
        ),
    ]
}


# ----------------------------------------------------------------------------------------------
# Hooks (only inside context managers)


@contextlib.contextmanager
def input_sq_norms(model: nn.Module):
    """Accumulate Σ x² per input feature of q, o, gate and down projections while inside the block.

    Yields {(layer, "q"|"o"|"gate"|"down"): tensor[in_features]} filled during forward passes.
    """
    spec = get_spec(model)
    sums: dict[tuple[int, str], torch.Tensor] = {}
    handles = []

    def hook_for(key):
        def hook(module, args):
            x = args[0].detach()
            s = x.float().square().reshape(-1, x.shape[-1]).sum(0)
            sums[key] = s if key not in sums else sums[key] + s

        return hook

    try:
        for i, layer in enumerate(decoder_layers(model, spec)):
            p = layer_parts(layer, spec)
            for name, mod in (("q", p.q), ("o", p.o), ("gate", p.gate), ("down", p.down)):
                if mod is not None:
                    handles.append(mod.register_forward_pre_hook(hook_for((i, name))))
        yield sums
    finally:
        for h in handles:
            h.remove()


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
            feeds = {"q.weight": "q", "k.weight": "q", "v.weight": "q", "o.weight": "o",
                     "gate.weight": "gate", "up.weight": "gate", "down.weight": "down"}
            for up in block_params(parts, block):
                if up.name not in feeds:  # biases see no input
                    continue
                xnorm = norms[(i, feeds[up.name])].sqrt().to(up.param.device)
                w = up.param.detach().float().abs()
                total += reduce_to_units(w * xnorm[None, :], up.axis, n).cpu()
        out[block].append(total)
    return out


def compute_importance(
    model: nn.Module,
    samples: torch.Tensor,
    *,
    batch_size: int = 4,
    progress: bool = True,
    calibration: dict | None = None,
) -> Importance:
    """Run one forward+backward pass over `samples` ([N, seq_len] token ids) and accumulate everything."""
    if samples.ndim != 2 or samples.numel() == 0:
        raise ValueError(f"samples must be a non-empty [num_samples, seq_len] tensor, got shape {tuple(samples.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be a positive integer")
    geo = geometry(model.config)
    device = next(model.parameters()).device
    blocks = list(iter_blocks(model))
    n_units = {(i, b): block_units(parts, b, geo.head_dim) for i, b, parts in blocks}
    zeros = lambda i, b: torch.zeros(n_units[(i, b)], dtype=torch.float32, device=device)  # noqa: E731
    first = {(i, b): zeros(i, b) for i, b, _ in blocks}
    fisher = {(i, b): zeros(i, b) for i, b, _ in blocks}
    stat_keys = [(i, b, up.name) for i, b, parts in blocks for up in block_params(parts, b)]
    # abs_sum, sq_sum, max_abs, zeros per module, accumulated on the device
    stats = torch.zeros(len(stat_keys), 4, dtype=torch.float64, device=device)

    was_training = model.training
    model.eval()
    n_batches, n_tokens = 0, 0
    t0 = time.perf_counter()
    try:
        with only_prunable_grads(model), input_sq_norms(model) as norms:
            for start in tqdm(range(0, len(samples), batch_size), desc="importance", disable=not progress, leave=False):
                batch = samples[start : start + batch_size].to(device)
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(_locate_nonfinite_forward(model, batch, n_batches))
                loss.backward()
                batch_stats = []
                for i, b, parts in blocks:
                    n = n_units[(i, b)]
                    for up in block_params(parts, b):
                        g = up.param.grad.float()
                        prod = up.param.detach().float() * g
                        first[(i, b)] += reduce_to_units(prod.abs(), up.axis, n)
                        fisher[(i, b)] += reduce_to_units(prod.square(), up.axis, n)
                        ga = g.abs()
                        batch_stats.append(torch.stack([ga.sum(), g.square().sum(), ga.max(), (g == 0).sum().float()]))
                        up.param.grad = None
                batch_stats = torch.stack(batch_stats).double()
                _check_finite(batch_stats, stat_keys)
                stats[:, :3] = torch.stack([stats[:, 0] + batch_stats[:, 0], stats[:, 1] + batch_stats[:, 1],
                                            torch.maximum(stats[:, 2], batch_stats[:, 2])], dim=1)
                stats[:, 3] += batch_stats[:, 3]
                n_batches += 1
                n_tokens += batch.numel()
        wanda = _wanda_scores(model, norms)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
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
        fisher={b: [fisher[(i, b)].cpu() for i, bb, _ in blocks if bb == b] for b in BLOCKS},
        magnitude=magnitude,
        wanda=wanda,
        batches=n_batches,
        tokens=n_tokens,
    )
    return Importance(
        acc=acc, grad_stats=grad_stats, widths=layer_widths(model),
        model=str(getattr(model.config, "name_or_path", "")), calibration=dict(calibration or {}), seconds=seconds,
    )


@torch.no_grad()
def _locate_nonfinite_forward(model: nn.Module, batch: torch.Tensor, batch_index: int) -> str:
    """Re-run a failing batch with hooks (only on failure) to name the first module whose output is inf/NaN."""
    spec = get_spec(model)
    found: list[str] = []
    handles = []

    def hook_for(name):
        def hook(module, args, out):
            t = out[0] if isinstance(out, tuple) else out
            if not found and isinstance(t, torch.Tensor) and not torch.isfinite(t).all():
                found.append(name)

        return hook

    try:
        for i, layer in enumerate(decoder_layers(model, spec)):
            for name, mod in layer.named_modules():
                if name and not list(mod.children()):
                    handles.append(mod.register_forward_hook(hook_for(f"layer {i} {name}")))
        model(input_ids=batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
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


def model_fingerprint(model: nn.Module) -> str:
    """Cheap content hash: name, shapes and a strided sample of every parameter."""
    h = hashlib.sha1(str(getattr(model.config, "name_or_path", "")).encode())
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        sample = p.detach().reshape(-1)[:: max(1, p.numel() // 4096)].float().cpu().numpy()
        h.update(sample.tobytes())
    return h.hexdigest()[:16]


def cache_key(model: nn.Module, samples: torch.Tensor, batch_size: int) -> str:
    from workbench.data import fingerprint

    parts = [model_fingerprint(model), fingerprint(samples), str(tuple(samples.shape)), str(batch_size),
             str(CACHE_FORMAT)]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:20]


def save_importance(imp: Importance, path: Path) -> None:
    from workbench.experiments import torch_save_atomic

    payload = dict(
        acc=asdict(imp.acc), grad_stats=imp.grad_stats.to_dict("list"), grad_batches=imp.grad_stats.attrs.get("batches"),
        widths=imp.widths, model=imp.model, calibration=imp.calibration, seconds=imp.seconds, key=imp.key,
        format=CACHE_FORMAT,
    )
    torch_save_atomic(payload, path)


def load_importance(path: Path) -> Importance:
    d = torch.load(path, weights_only=False)
    if d.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path} has cache format {d.get('format')}, expected {CACHE_FORMAT}")
    gs = pd.DataFrame(d["grad_stats"])
    gs.attrs["batches"] = d["grad_batches"]
    return Importance(acc=Accumulators(**d["acc"]), grad_stats=gs, widths=[tuple(w) for w in d["widths"]],
                      model=d["model"], calibration=d["calibration"], seconds=d["seconds"], key=d["key"])


_MEMORY_CACHE: dict[str, Importance] = {}


def importance_cached(
    model: nn.Module,
    samples: torch.Tensor,
    *,
    batch_size: int = 4,
    cache_dir: Path | str | None = IMPORTANCE_CACHE,
    progress: bool = True,
    calibration: dict | None = None,
) -> Importance:
    """`compute_importance`, memoised in memory and (unless cache_dir=None) on disk by model + data + settings."""
    key = cache_key(model, samples, batch_size)
    if key in _MEMORY_CACHE:
        return _MEMORY_CACHE[key]
    path = Path(cache_dir) / f"{key}.pt" if cache_dir is not None else None
    if path is not None and path.exists():
        imp = load_importance(path)
    else:
        imp = compute_importance(model, samples, batch_size=batch_size, progress=progress, calibration=calibration)
        imp.key = key
        if path is not None:
            save_importance(imp, path)
    _MEMORY_CACHE[key] = imp
    return imp
