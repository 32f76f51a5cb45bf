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
- `one_shot` (default): every block's Gram matrix from the dense model's own activations. The blocks of the
  first layers whose (width + 1)² float64 matrices fit in half the free memory (all of them on SmolLM2: 0.6 GB)
  are summed in one dense pass; if some do not fit (every pruned block of a Llama-3-8B shape: ≈ 57 GB), that pass
  also records the layers' inputs and the other layers are replayed one at a time, each layer's matrices solved
  and freed before the next (≈ 1.8 GB for one 8B layer). The sums are the same either way; the replay costs
  at most one more forward pass.
- `sequential`: layer by layer, the dense block is run on the pruned model's input (the output of the
  already reconstructed earlier layers, as in SparseGPT-style methods), attention first, then the MLP of the
  same layer on the corrected attention's output. One block's matrix at a time; about 2× one_shot's time
  (each layer is replayed 3–4 times).

The ridge: one λ for every block (`damping`, pulling toward `toward`), or each block's own, chosen by K-fold
cross-validation over the calibration batches (`cv_folds`, among `cv_ridges`): batch b's tokens go to fold b mod K,
each fold keeps its own Gram matrix (K× the memory of the sums above), and for each candidate the kept columns are
re-fitted on all folds but one and measured on the one left out, by the dense block's output error
tr(Dᵀ G_fold D) (no activations needed). The chosen ridge is then fitted on all tokens; the added time is
K · len(cv_ridges) solves of the kept columns' system per block. On the default model with 64 × 128 calibration
tokens most blocks choose a pull of 0.1–1 toward the dense weights: at 20 %, 26.96 → 26.49 in domain and
136.15 → 127.57 out of it for the re-fit score's plan, of which one pull of 0.1–0.3 for every block gives most
and the per-block choice 0.5–0.9 % more (README).

Measured on SmolLM2-135M, 20 % of all parameters, global Taylor plan, 128 × 128 calibration tokens
(`benchmarks/reconstruction.py`): PPL 35.39 → 27.91 one_shot (49 s), 27.77 sequential (110 s), dense 22.77;
λ = 1e-4 beat 1e-3 (28.62), 1e-2 and above (worse than no reconstruction at 1).

The solved weights are cached (`workbench.core.cache`, kind `reconstruction`) by the dense model, the plan, the
samples and the settings, so re-applying them costs no forward pass. A layer the plan removes whole has no
block left to carry a correction.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from collections import Counter
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
from workbench.scoring.refit import (
    NormalEquations,
    Recorded,
    augmented,
    call_layer,
    gram_sums,
    recorded_inputs,
    recording,
    replayed_grams,
    solve_ridge,
)
from workbench.surgery.prune import PruneReport, add_output_bias, apply_plan, check_plan

MODES = ("sequential", "one_shot")
CACHE_FORMAT = 2
# the ridges cross-validation chooses among (`ReconstructConfig.cv_folds`): the default one, and pulls toward the
# dense weights from light to strong (measured on the default model: most blocks choose 0.1–1 toward dense)
CV_RIDGES: tuple[tuple[str, float], ...] = (("zero", REFIT_DAMPING), ("dense", 1e-3), ("dense", 1e-2),
                                            ("dense", 0.03), ("dense", 0.1), ("dense", 0.3), ("dense", 1.0),
                                            ("dense", 3.0))


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
        cv_folds: 0: every block is re-fitted with `damping` / `toward`. K >= 2: each block chooses its own ridge
            among `cv_ridges` by K-fold cross-validation over the calibration batches (batch b in fold b mod K;
            the held-out error of the block's output against the dense block's), then is re-fitted on all of
            them with the one chosen; `damping` / `toward` are then not used and must stay at their defaults.
        cv_ridges: the (toward, λ) pairs cross-validation chooses among.
    """

    mode: str = "one_shot"
    damping: float = REFIT_DAMPING
    toward: str = "zero"
    bias: bool = True
    weights: bool = True
    blocks: tuple[str, ...] = BLOCKS
    num_samples: int | None = None
    batch_size: int = 4
    cv_folds: int = 0
    cv_ridges: tuple[tuple[str, float], ...] = CV_RIDGES

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
        if isinstance(self.cv_folds, bool) or not isinstance(self.cv_folds, int) or self.cv_folds < 0 \
                or self.cv_folds == 1:
            raise ValueError(f"cv_folds={self.cv_folds!r} must be 0 (the fixed damping / toward) or an integer >= 2")
        _check_ridges(self.cv_ridges)
        if self.cv_folds:
            if not self.weights:
                raise ValueError(f"cv_folds={self.cv_folds} chooses the ridge of the weights' re-fit, but "
                                 "weights=False fits only the bias (no ridge): set cv_folds=0")
            if (self.damping, self.toward) != (REFIT_DAMPING, "zero"):
                raise ValueError(f"with cv_folds={self.cv_folds} each block's ridge is chosen among cv_ridges, so "
                                 f"damping={self.damping!r} / toward={self.toward!r} would not be used: leave them at "
                                 f"their defaults ({REFIT_DAMPING}, 'zero'), put the ridges to try in cv_ridges, or "
                                 "set cv_folds=0")


def check_folds(cfg: ReconstructConfig, num_samples: int) -> None:
    """Refuse cross-validation folds that `num_samples` calibration samples cannot fill (the folds are batches)."""
    batches = -(-min(num_samples, cfg.num_samples or num_samples) // cfg.batch_size)
    if cfg.cv_folds > batches:
        raise ValueError(f"cv_folds={cfg.cv_folds} needs at least {cfg.cv_folds} calibration batches (the folds are "
                         f"batches), but {min(num_samples, cfg.num_samples or num_samples)} samples in batches of "
                         f"batch_size={cfg.batch_size} make {batches}: use fewer folds, a smaller batch_size or more "
                         "samples")


def _check_ridges(ridges) -> None:
    if isinstance(ridges, (str, bytes)) or not isinstance(ridges, (tuple, list)) or not ridges:
        raise ValueError(f"cv_ridges={ridges!r} must be a non-empty list of (toward, λ) pairs, e.g. "
                         f"[['zero', 1e-4], ['dense', 0.1]]")
    for r in ridges:
        if not isinstance(r, (tuple, list)) or len(r) != 2 or r[0] not in REFIT_TOWARD \
                or isinstance(r[1], bool) or not isinstance(r[1], (int, float)) or not math.isfinite(r[1]) \
                or not r[1] >= 0:
            raise ValueError(f"cv_ridges: {r!r} is not a (toward, λ) pair with toward one of {list(REFIT_TOWARD)} "
                             f"and λ a finite number >= 0")
    if len({(t, float(v)) for t, v in ridges}) != len(ridges):
        raise ValueError(f"cv_ridges={ridges!r} lists a ridge twice")


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


def refit_blocks(plan: Plan, cfg: ReconstructConfig) -> list[tuple[int, str]]:
    """(dense layer, block) of every block the re-fit solves: the blocks of `cfg.blocks` that lose units, in the
    layers the plan keeps."""
    return [(i, b) for i, _ in _layer_map(plan) for b in _wanted(plan, cfg, i)]


def _out_proj(layer: nn.Module, spec, block: str) -> nn.Linear:
    proj = layer_parts(layer, spec).out_proj(block)
    if proj is None:
        raise ValueError(f"the {block} block of this layer is emptied: it has no output projection to re-fit")
    return proj


def _solve(folds: list[NormalEquations], dense_layer: nn.Module, spec, plan: Plan, layer: int, block: str,
           cfg: ReconstructConfig) -> dict:
    """The re-fit of one block from its Grams (one per cross-validation fold, or the one of all tokens)."""
    proj = _out_proj(dense_layer, spec, block)
    kept = _kept_columns(plan, layer, block, proj.in_features)
    total = _summed(folds)
    try:
        chosen = cfg.cv_folds and len(kept)  # an emptied block gets only its mean output: no ridge to choose
        ridge: dict = choose_ridge(folds, proj.weight, proj.bias, kept, cfg, total) if chosen \
            else dict(toward=cfg.toward, damping=cfg.damping)
        out = total.solve(proj.weight, proj.bias, kept, damping=float(ridge["damping"]), fit_bias=cfg.bias,
                          fit_weights=cfg.weights, toward=str(ridge["toward"]))
    except FloatingPointError as e:
        raise FloatingPointError(f"layer {layer} {block}: {e}") from None
    return dict(out, ridge=ridge) if chosen else out


def _summed(folds: list[NormalEquations]) -> NormalEquations:
    if len(folds) == 1:
        return folds[0]
    total = NormalEquations(folds[0].gram.shape[0] - 1, folds[0].gram.device)
    for ne in folds:
        total.gram += ne.gram
    return total


def cv_errors(folds: list[NormalEquations], weight: torch.Tensor, bias: torch.Tensor | None, kept: torch.Tensor,
              ridges: tuple[tuple[str, float], ...], fit_bias: bool = True, total: NormalEquations | None = None
              ) -> dict[tuple[str, float], float]:
    """{(toward, λ): the held-out squared error of the block's output, summed over the folds}: each fold left out
    in turn, the kept columns re-fitted on the others (K-fold cross-validation over the calibration batches), as
    `NormalEquations.solve` re-fits them (λ scaled by the training folds' mean diagonal; the constant undamped).

    The held-out error needs no activations: with D = [W, b]ᵀ − [W', b']ᵀ (the removed columns' rows are the
    dense weights themselves), a fold's squared output error against the dense block is tr(Dᵀ G_fold D). Per fold,
    what every ridge shares is computed once; per ridge, one solve of the kept columns' system (`solve_ridge`).
    `total`: the folds' sum, when the caller holds it already.
    """
    for k, ne in enumerate(folds):
        if ne.tokens == 0:
            raise ValueError(f"cross-validation fold {k} holds no tokens: use fewer cv_folds than calibration batches")
    total = total if total is not None else _summed(folds)
    n, device = total.gram.shape[0] - 1, total.gram.device
    for toward, _ in ridges:
        check_choice("toward", toward, REFIT_TOWARD)
    target = augmented(weight, bias).to(device)
    if not fit_bias:  # the bias is kept: it cancels from the error, and nothing is fitted for the constant
        target[n] = 0
    kept = kept.to(device)
    idx = torch.cat([kept, torch.tensor([n], device=device)]) if fit_bias else kept
    errors = {(toward, float(damping)): 0.0 for toward, damping in ridges}
    for ne in folds:
        train = total.gram - ne.gram
        scale = float(torch.diagonal(train)[:n].mean().clamp_min(1e-12))
        system, cross = train[idx][:, idx], train[idx] @ target
        held_cross, held_system = ne.gram[idx] @ target, ne.gram[idx][:, idx]
        held_dense = float((target * (ne.gram @ target)).sum())
        for toward, damping in ridges:
            c = cross
            if toward == "dense":  # the pseudo-tokens' targets: the dense weights of the kept columns
                c = cross.clone()
                c[: len(kept)] += damping * scale * target[kept]
            w, b = solve_ridge(system, c, damping, fit_bias, scale)
            fit = torch.cat([w.T, b[None]]) if b is not None else w.T
            errors[(toward, float(damping))] += held_dense - 2 * float((fit * held_cross).sum()) \
                + float((fit * (held_system @ fit)).sum())
    return errors


def choose_ridge(folds: list[NormalEquations], weight: torch.Tensor, bias: torch.Tensor | None, kept: torch.Tensor,
                 cfg: ReconstructConfig, total: NormalEquations | None = None) -> dict:
    """The ridge of `cfg.cv_ridges` with the lowest held-out error (`cv_errors`): {"toward", "damping",
    "cv_error": its error over the default ridge's (λ = REFIT_DAMPING toward zero), or over the first ridge's when
    the default is not among them}."""
    errors = cv_errors(folds, weight, bias, kept, cfg.cv_ridges, cfg.bias, total)
    best = min(errors, key=lambda r: errors[r])
    reference = errors.get(("zero", REFIT_DAMPING), next(iter(errors.values())))
    return dict(toward=best[0], damping=best[1], cv_error=errors[best] / reference if reference > 0 else 1.0)


# ----------------------------------------------------------------------------------------------
# The two modes


def free_bytes(device: torch.device) -> int:
    """The memory free for new tensors on `device`: the GPU's free memory, else the machine's available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil  # deferred: only the one-shot re-fit's memory plan reads it

    return int(psutil.virtual_memory().available)


def held_layers(dense: nn.Module, spec, wanted: list[tuple[int, str]], folds: int, budget: int) -> set[int]:
    """The first layers (in order) whose blocks' Gram matrices, `folds` of each, fit together in `budget` bytes."""
    layers = decoder_layers(dense, spec)
    held: set[int] = set()
    used = 0
    for i in sorted({i for i, _ in wanted}):
        size = sum(8 * folds * (_out_proj(layers[i], spec, b).in_features + 1) ** 2 for j, b in wanted if j == i)
        if used + size > budget:
            break
        held.add(i)
        used += size
    return held


@torch.no_grad()
def _one_shot(dense: nn.Module, plan: Plan, samples: torch.Tensor, cfg: ReconstructConfig,
              progress: bool) -> dict[tuple[int, str], dict]:
    """Every pruned block's Gram matrices from the dense model's own activations. Those of the first layers that
    fit in half the free memory come from one dense pass; when some do not fit, that pass also records the layers'
    inputs and the rest are replayed one layer at a time (`scoring.refit.recording`), each layer's Grams solved and
    freed before the next: the same sums, with one layer's Grams at a time beyond the first ones."""
    spec = get_spec(dense)
    device = next(dense.parameters()).device
    layers = decoder_layers(dense, spec)
    wanted = refit_blocks(plan, cfg)
    k = max(cfg.cv_folds, 1)
    held = held_layers(dense, spec, wanted, k, free_bytes(device) // 2)
    first = [(i, b) for i, b in wanted if i in held]
    rest = [(i, b) for i, b in wanted if i not in held]
    folds: list[dict[tuple[int, str], NormalEquations]] = [{} for _ in range(k)]
    record: contextlib.AbstractContextManager[Recorded] = recording(dense) if rest else contextlib.nullcontext(([], []))
    with eval_mode(dense), record as (hidden, calls):
        for n, s in enumerate(tqdm(range(0, len(samples), cfg.batch_size), desc="reconstruction (dense pass)",
                                   disable=not progress, leave=False)):
            with gram_sums(dense, cfg.blocks, lambda layer, block: (layer, block) in first, into=folds[n % k]):
                dense(input_ids=samples[s : s + cfg.batch_size].to(device), use_cache=False)
    out = {(i, b): _solve([f[i, b] for f in folds], layers[i], spec, plan, i, b, cfg) for i, b in first}
    del folds
    last = max((i for i, _ in rest), default=-1) + 1
    for i, layer_folds in replayed_grams(dense, (hidden, calls), lambda layer, block: (layer, block) in rest, last,
                                         folds=k, progress=progress, desc="reconstruction (layer by layer)"):
        for b in layer_folds[0]:
            out[(i, b)] = _solve([f[b] for f in layer_folds], layers[i], spec, plan, i, b, cfg)
    return {key: out[key] for key in wanted}


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
                folds = [NormalEquations(_out_proj(dense_layer, spec, block).in_features, device)
                         for _ in range(max(cfg.cv_folds, 1))]
                for n, (h, kw) in enumerate(zip(hidden, (c[i] for c in calls))):
                    add = lambda l, s, x, ne=folds[n % len(folds)]: ne.add(x) if l == i else None  # noqa: E731
                    if block == "attn":  # the dense layer on the pruned stream: its full attention heads
                        with trace(dense, [CHANNEL_SITES[block]], add):
                            call_layer(dense_layer, h, kw)
                    else:  # the dense MLP on the pruned layer's (reconstructed) MLP input
                        got = []
                        with trace(pruned, ["mlp_block"], lambda l, s, x: got.append(x) if l == j else None):
                            call_layer(layer, h, kw)
                        with trace(dense, [CHANNEL_SITES[block]], add):
                            layer_parts(dense_layer, spec).mlp(got[0])
                out[(i, block)] = _solve(folds, dense_layer, spec, plan, i, block, cfg)
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

    def summary(self) -> dict:
        """What the re-fit did, for a run's record: blocks, tokens, seconds, the ridge asked and, when
        cross-validation chose it, each block's choice (layer, block, toward, damping, cv_error: its held-out error
        over the default ridge's)."""
        c = self.config
        ridge = dict(cv_folds=c["cv_folds"], cv_ridges=[list(r) for r in c["cv_ridges"]]) if c.get("cv_folds") \
            else dict(damping=c.get("damping"), toward=c.get("toward"))
        out = dict(blocks=len(self.solutions), tokens=self.tokens, seconds=round(self.seconds, 3), mode=c.get("mode"),
                   ridge=ridge)
        chosen = [dict(layer=i, block=b, **sol["ridge"]) for (i, b), sol in sorted(self.solutions.items())
                  if "ridge" in sol]
        if chosen:
            out["chosen_ridges"] = chosen
        return out

    def ridge_counts(self) -> str:
        """How many blocks chose each ridge, e.g. "dense 0.3: 20, dense 1: 6, zero 0.0001: 1" ("" without
        cross-validation)."""
        counts = Counter((sol["ridge"]["toward"], sol["ridge"]["damping"]) for sol in self.solutions.values()
                         if "ridge" in sol)
        return ", ".join(f"{t} {d:g}: {n}" for (t, d), n in counts.most_common())


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
    check_folds(cfg, len(samples))
    settings = asdict(cfg)
    if cfg.toward == "zero":  # the default keeps the key it had before `toward` existed
        del settings["toward"]
    if not cfg.cv_folds:  # and the fixed ridge the key it had before cross-validation existed
        del settings["cv_folds"], settings["cv_ridges"]
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
