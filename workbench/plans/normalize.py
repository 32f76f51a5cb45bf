"""Corrections applied to cached scores, with no new forward or backward pass.

Order of operations on the unit table (score = importance / cost):
  1. normalization within a level (`layer`: all units of a layer; `block`: a layer's attention or MLP),
     with a monotone map per level, so the order of units inside a level never changes;
  2. percentile clipping of the normalized scores to [P_low, P_high] (global percentiles);
  3. temperature T ∈ [0, 1]: block-corrected scores s_bc = s · |L_b| / Σ_{u∈b} s_u + (L_b − |L_b|) / n_b make
     each block's total equal its measured removal loss L_b (of any sign: removing a block can lower the loss)
     while keeping the within-block order and distribution (a negative L_b shifts the block's n_b units down
     by the same amount, it never reverses them); the normalized
     scores are rescaled by one positive constant to the mean |s_bc| and mixed:
     final = (1 − T)·normalized + T·s_bc. T = 0 is off;
  4. tau: every block whose removal loss L_b < tau is removed whole before width pruning (its
     parameters count against the budget). tau = None is off.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from workbench.core.registry import Registry, check_choice
from workbench.plans.selection import block_codes
from workbench.scoring.methods import IMPORTANCE_METHODS

LEVELS = ("layer", "block")


def _none(x: np.ndarray) -> np.ndarray:
    return x


def _log(x: np.ndarray) -> np.ndarray:
    if len(x) and x.min() < 0:
        raise ValueError(f"log normalization needs scores >= 0; the smallest is {x.min():.3g}")
    smallest = np.min(x, where=x > 0, initial=np.inf)
    out = x + (smallest * 1e-3 if np.isfinite(smallest) else 1.0)
    return np.log(out, out=out)


def _minmax(x: np.ndarray) -> np.ndarray:
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def _zscore(x: np.ndarray) -> np.ndarray:
    sd = x.std()
    return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)


def _sqrt(x: np.ndarray) -> np.ndarray:
    if (x < 0).any():
        raise ValueError(f"sqrt normalization needs scores >= 0; the smallest is {x.min():.3g}")
    return np.sqrt(x)


@dataclass(frozen=True)
class Normalizer:
    name: str
    description: str
    fn: Callable[[np.ndarray], np.ndarray]


NORMALIZERS: Registry[Normalizer] = Registry.of("normalization", [
    Normalizer("none", "scores as they are", _none),
    Normalizer("log", "log(s + 10⁻³·smallest positive s) within the level", _log),
    Normalizer("minmax", "(s − min) / (max − min) within the level", _minmax),
    Normalizer("zscore", "(s − mean) / std within the level", _zscore),
    Normalizer("sqrt", "√s within the level", _sqrt),
])


@dataclass(frozen=True)
class ScoringConfig:
    """How unit scores (importance / cost) are corrected before selection.

    Args:
        method: importance method (a key of `IMPORTANCE_METHODS`).
        normalization: a key of `NORMALIZERS`, applied within each level.
        level: "layer" (a layer's units together) or "block" (its attention and MLP apart).
        clip_low, clip_high: global percentiles the normalized scores are clipped to (0 and 100 = off).
        temperature: T in [0, 1]: mix with the block-removal-loss corrected score (0 = off).
        tau: blocks whose removal loss is below tau are removed whole first (None = off; otherwise a finite
            number >= 0).
        tau_over_budget: what happens when the blocks below tau own more parameters than the budget:
            "refuse" (an error naming the overshoot) or "cap" (remove whole only the lowest-loss blocks that fit
            the budget, with a warning; the others are pruned by width like any unit).
    """

    method: str = "taylor"
    normalization: str = "none"
    level: str = "layer"
    clip_low: float = 0.0  # percentile, 0 = off
    clip_high: float = 100.0  # percentile, 100 = off
    temperature: float = 0.0
    tau: float | None = None
    tau_over_budget: str = "refuse"

    def __post_init__(self):
        IMPORTANCE_METHODS.check(self.method)
        check_choice("normalization", self.normalization, NORMALIZERS)
        check_choice("level", self.level, LEVELS)
        if not 0.0 <= self.clip_low < self.clip_high <= 100.0:
            raise ValueError(f"clip_low={self.clip_low}, clip_high={self.clip_high}: need 0 <= low < high <= 100")
        if not 0.0 <= self.temperature <= 1.0:
            raise ValueError(f"temperature={self.temperature} must be in [0, 1]")
        if self.tau is not None and not (math.isfinite(self.tau) and self.tau >= 0):
            raise ValueError(f"tau={self.tau} must be None (off) or a finite number >= 0 (a block-removal loss)")
        check_choice("tau_over_budget", self.tau_over_budget, TAU_OVER_BUDGET)

    @property
    def needs_block_loss(self) -> bool:
        return self.temperature > 0 or self.tau is not None

    def to_dict(self) -> dict:
        return asdict(self)


TAU_OVER_BUDGET = ("refuse", "cap")

# The GAQ-Aware-Prune study's three global methods as named presets (widgets and tests read this registry).
PRESETS: Registry[ScoringConfig] = Registry("preset", {
    "taylor": ScoringConfig(method="taylor", normalization="none"),
    "layerwise": ScoringConfig(method="taylor", normalization="minmax", level="layer"),
    "blockwise": ScoringConfig(method="taylor", normalization="minmax", level="block"),
})


def normalize(scores: np.ndarray, codes: np.ndarray, name: str) -> np.ndarray:
    """Apply a registered normalizer within each level group.

    Tables from `build_table` hold each group in one contiguous run (or, per layer, two): the groups are then
    read as slices, without a sort; any other row order is grouped by one stable sort of the codes.
    """
    fn = NORMALIZERS[name].fn
    if name == "none":
        return scores.astype(np.float64, copy=True)
    starts = np.r_[0, np.flatnonzero(codes[1:] != codes[:-1]) + 1]
    ends = np.r_[starts[1:], len(codes)]
    out = np.empty_like(scores, dtype=np.float64)
    run_codes = codes[starts]
    if len(np.unique(run_codes)) == len(run_codes):  # every group is one run: slices
        for a, b in zip(starts.tolist(), ends.tolist()):
            out[a:b] = fn(scores[a:b].astype(np.float64))
        return out
    # small integer codes sort by radix (stable) in a few ms even for 10^6 units
    small = codes.astype(np.int16) if codes.max() < np.iinfo(np.int16).max else codes
    order = np.argsort(small, kind="stable")
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    for idx in np.split(order, bounds):
        out[idx] = fn(scores[idx].astype(np.float64))
    return out


def clip_percentiles(x: np.ndarray, low: float, high: float) -> np.ndarray:
    if low <= 0 and high >= 100:
        return x
    lo, hi = np.percentile(x, [low, high])
    return np.clip(x, lo, hi)


def block_corrected(scores: np.ndarray, codes: np.ndarray, block_loss: pd.DataFrame) -> np.ndarray:
    """s · |L_b| / Σ_b s + (L_b − |L_b|) / n_b: each block's scores sum to its removal loss L_b, order and
    spread inside the block kept whatever the sign of L_b (`codes`: each row's block, layer · 2 + (1 for MLP))."""
    loss = _block_loss_by_code(block_loss)
    totals = np.bincount(codes, weights=scores)
    present = np.bincount(codes, minlength=len(totals)) > 0
    if (totals[present] <= 0).any():
        raise ValueError("block correction needs positive score totals per block; use method scores >= 0")
    if len(loss) < len(totals) or np.isnan(loss[: len(totals)][present]).any():
        raise ValueError("the block removal loss lacks blocks the table scores; measure it on the same model")
    counts = np.bincount(codes, minlength=len(totals))
    loss = loss[: len(totals)]
    with np.errstate(divide="ignore", invalid="ignore"):  # codes of no row: never read
        factor = np.abs(loss) / totals
        shift = (loss - np.abs(loss)) / counts  # 0 for L_b >= 0; 2 L_b / n_b below zero
    return scores * factor[codes] + shift[codes]


def _block_loss_by_code(block_loss: pd.DataFrame) -> np.ndarray:
    codes = block_loss["layer"].to_numpy() * 2 + (block_loss["block"].astype(str).to_numpy() == "mlp")
    out = np.full(codes.max() + 1, np.nan)
    out[codes] = block_loss["removal_loss"].to_numpy()
    return out


def score_table(table: pd.DataFrame, cfg: ScoringConfig, block_loss: pd.DataFrame | None = None) -> pd.DataFrame:
    """A copy of `table` with `final_score` (and `forced` for tau) after every correction of `cfg`.

    >>> import pandas as pd
    >>> table = pd.DataFrame(dict(layer=[0, 0, 1, 1], block=["attn", "mlp"] * 2, unit=[0, 0, 0, 0],
    ...                           score=[1.0, 2.0, 100.0, 300.0], cost=[1, 1, 1, 1]))
    >>> score_table(table, ScoringConfig(normalization="minmax", level="layer"))["final_score"].tolist()
    [0.0, 1.0, 0.0, 1.0]
    """
    if cfg.needs_block_loss and block_loss is None:
        raise ValueError(f"temperature={cfg.temperature}, tau={cfg.tau} need the measured block removal loss "
                         "(workbench.scoring.removal.block_removal_loss)")
    out = table.copy(deep=False)  # new columns only: the cached table is never written (pandas copy-on-write)
    raw = out["score"].to_numpy(dtype=np.float64)
    layer = out["layer"].to_numpy()
    block = layer * 2 + block_codes(out).astype(layer.dtype)  # each row's block (layer · 2 + MLP), read once
    s = normalize(raw, layer if cfg.level == "layer" else block, cfg.normalization)
    s = clip_percentiles(s, cfg.clip_low, cfg.clip_high)
    if cfg.temperature > 0:
        bc = block_corrected(raw, block, block_loss)
        scale = np.abs(bc).mean() / max(np.abs(s).mean(), 1e-300)
        s = s * ((1 - cfg.temperature) * scale)  # a new array: s may still be the caller's
        s += cfg.temperature * bc
    out["final_score"] = s
    forced = np.zeros(len(out), dtype=bool)
    if cfg.tau is not None:
        loss = _block_loss_by_code(block_loss)[block]
        forced = loss < cfg.tau
        out["forced_loss"] = np.where(forced, loss, np.nan)  # the order in which "cap" keeps forced blocks
    out["forced"] = forced
    out.attrs["tau"], out.attrs["tau_over_budget"] = cfg.tau, cfg.tau_over_budget
    return out


def standard_settings(method: str = "taylor") -> dict[str, ScoringConfig]:
    """The settings notebook 03 compares: none, every normalization × level, log/block + clip 1–99, T = 0.5, T = 1."""
    settings = {"none": ScoringConfig(method=method)}
    settings |= {f"{n}/{lvl}": ScoringConfig(method=method, normalization=n, level=lvl)
                 for n in NORMALIZERS if n != "none" for lvl in LEVELS}
    settings |= {"log/block + clip 1-99": ScoringConfig(method=method, normalization="log", level="block",
                                                        clip_low=1, clip_high=99),
                 "T=0.5": ScoringConfig(method=method, temperature=0.5),
                 "T=1": ScoringConfig(method=method, temperature=1.0)}
    return settings
