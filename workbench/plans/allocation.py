"""Per-layer allocation: how much of the budget each layer gives, and plans built from per-layer targets.

- The GAQ-Aware-Prune study's layer-wise (v1.0) strategies (`ALLOCATIONS`): `uniform`, `inverse` (important
  layers pruned less: weight ∝ 1 / (n + ε)^α, n = min-max normalized layer importance) and `proportional`
  (weight ∝ (n + ε)^α); `freeze_top_n` keeps the n most important layers whole. Ratios r_i = min(c·w_i,
  max_layer_ratio) with c found so that Σ r_i·P_i equals the budget (P_i the layer's attention + MLP
  parameters): a layer that would exceed its maximum is clipped and its excess goes to the others.
- `layerwise_plan`: units per layer from those targets, with the study's Attention:MLP distribution x:y.
  Budget rule: with x:y, attention groups are counted across layers by largest remainder up to (never
  beyond) their share, then MLP channels fill the rest: the removed parameters reach the target and
  overshoot it by less than one MLP channel (one group when y = 0 or the MLP runs out); without x:y, each layer takes
  its lowest-score units until its own
  target (each layer overshoots by less than one unit).
- `uniform_plan`: every pruned layer keeps the same widths (the deployable shape).
- OWL (Yin et al., 2024): `layer_outlier_ratio` (share of Wanda scores |w|·‖x‖ above M × the layer mean)
  and `owl_ratios` (per-layer ratios within ratio ± λ whose mean is the ratio, for
  `SelectionConfig(layer_ratios=...)`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd

from workbench.core.arch import BLOCKS
from workbench.core.registry import Registry, check_choice
from workbench.plans.normalize import NORMALIZERS
from workbench.plans.plan import Plan, PlanProvenance, check_achieved
from workbench.plans.selection import (
    RATIO_OF,
    Budget,
    SelectionConfig,
    check_attn_mlp,
    check_table_widths,
    select,
    stable_argsort,
)
from workbench.scoring.layer_importance import check_layer_values


def owl_ratios(outlier_ratio: np.ndarray, ratio: float, lam: float = 0.08) -> np.ndarray:
    """Per-layer ratios in [ratio − λ, ratio + λ], lower where outliers are more frequent, mean = ratio."""
    d = np.asarray(outlier_ratio, dtype=np.float64)
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio={ratio} must be in [0, 1)")
    if not 0 <= lam or ratio - lam < 0 or ratio + lam >= 1:
        raise ValueError(f"lam={lam}: ratio ± lam = [{ratio - lam:.3f}, {ratio + lam:.3f}] must stay in [0, 1)")
    span = d.max() - d.min()
    a = (d - d.min()) / span if span > 0 else np.full_like(d, 0.5)
    base = ratio + lam - 2 * lam * a
    lo, hi = -2 * lam, 2 * lam  # shift c so that mean(clip(base + c)) = ratio (monotone in c: bisection)
    for _ in range(100):
        c = (lo + hi) / 2
        if np.clip(base + c, ratio - lam, ratio + lam).mean() < ratio:
            lo = c
        else:
            hi = c
    return np.clip(base + (lo + hi) / 2, ratio - lam, ratio + lam)


def owl_plan(table: pd.DataFrame, budget: Budget, outlier_ratio, ratio: float, ratio_of: str = "total", *,
             lam: float = 0.08, min_units_per_block: int = 1, score_column: str = "score") -> Plan:
    """OWL (Yin et al., 2024) as structured pruning: per-layer ratios from the layers' outlier ratios
    (`owl_ratios`, mean = the budget's share of the attention + MLP parameters, within ±`lam`), then each layer's
    lowest-score units (`min_units_per_block` best units of each block kept). The plan is checked against the
    budget asked (`ratio` of `ratio_of`).

    >>> from workbench import Rescorer, calibration_samples, CalibrationConfig, importance_cached, load_model
    >>> model, tok = load_model("tiny")
    >>> imp = importance_cached(model, calibration_samples(tok, CalibrationConfig(num_samples=2, seq_len=16)),
    ...                         cache=False, progress=False)
    >>> budget = Budget.of(model)
    >>> plan = owl_plan(Rescorer(imp, budget).table("wanda"), budget, [0.1, 0.3, 0.2, 0.0], 0.2)
    >>> plan.provenance.label, round(plan.asked_ratio, 2), plan.achieved_ratio >= plan.asked_ratio
    ('owl · wanda', 0.2, True)
    """
    values = check_layer_values(outlier_ratio, len(budget.widths), "outlier ratio")
    target, denominator = budget.target(ratio, ratio_of)
    ratios = owl_ratios(values, target / budget.prunable_params, lam)
    plan = select(table, budget, SelectionConfig(layer_ratios=tuple(float(r) for r in ratios),
                                                 min_units_per_block=min_units_per_block), score_column=score_column)
    plan.target_params, plan.denominator = target, denominator
    plan.provenance = PlanProvenance("owl", method=table.attrs.get("method"),
                                     selection=dict(ratio=ratio, ratio_of=ratio_of, layer_ratios=ratios.round(6).tolist(),
                                                    min_units_per_block=min_units_per_block, score_column=score_column),
                                     params=dict(lam=lam, outlier_ratio=values.round(6).tolist()))
    return check_achieved(plan, "OWL", int(table["cost"].max()),
                          f"min_units_per_block={min_units_per_block} keeps units the per-layer ratios ask for"
                          if min_units_per_block else "")


def compare_allocation(global_plan: Plan, owl_plan: Plan, budget, outlier_ratio: np.ndarray) -> pd.DataFrame:
    """Per layer: outlier ratio and the pruned share of the layer's attention+MLP parameters under both plans."""
    def share(plan):
        out = []
        for i, (g, c) in enumerate(plan.widths):
            total = g * budget.costs["attn"][i] + c * budget.costs["mlp"][i]
            gone = len(plan.removed["attn"][i]) * budget.costs["attn"][i] + len(plan.removed["mlp"][i]) * budget.costs["mlp"][i]
            out.append(gone / total if total else np.nan)
        return np.array(out)

    return pd.DataFrame(dict(layer=np.arange(len(outlier_ratio)), outlier_ratio=outlier_ratio,
                             global_pruned=share(global_plan), owl_pruned=share(owl_plan)))


# ----------------------------------------------------------------------------------------------
# The study's layer-wise strategies


@dataclass(frozen=True)
class Allocation:
    name: str
    description: str
    weights: Callable[[np.ndarray, float, float], np.ndarray]  # (normalized importance, alpha, epsilon) -> weights


ALLOCATIONS: Registry[Allocation] = Registry.of("strategy", [
    Allocation("uniform", "every layer gives the same share of its parameters", lambda n, a, e: np.ones_like(n)),
    Allocation("inverse", "important layers pruned less: weight ∝ 1 / (n + ε)^α", lambda n, a, e: (n + e) ** -a),
    Allocation("proportional", "important layers pruned more: weight ∝ (n + ε)^α", lambda n, a, e: (n + e) ** a),
])


@dataclass(frozen=True)
class LayerwiseConfig:
    """A per-layer (non-uniform) pruning run of the GAQ-Aware-Prune study's v1.0 line.

    Args:
        ratio: share of the denominator to remove, in [0, 1).
        ratio_of: "total" (every parameter) or "prunable" (attention + MLP parameters).
        strategy: a key of `ALLOCATIONS`.
        measure: the layer importance it reads (a key of `layer_importance.LAYER_IMPORTANCE`).
        alpha: α > 0, the spread of inverse / proportional weights.
        epsilon: ε > 0 added to the normalized importance n ∈ [0, 1] (bounds the largest weight).
        freeze_top_n: the n most important layers are not pruned (their share moves to the others).
        frozen: layers that are never pruned, by index (e.g. LLM-Pruner's first and last layers).
        max_layer_ratio: the most a layer may give, as a share of its attention + MLP parameters, in (0, 1)
            (a layer emptied whole is depth pruning: ShortGPT).
        attn_mlp: x:y split of the removed parameters between attention groups and MLP channels; None: each
            layer's lowest-score units whatever their kind.
        method: importance method choosing units within a layer (a key of `IMPORTANCE_METHODS`).
    """

    ratio: float = 0.2
    ratio_of: str = "total"
    strategy: str = "inverse"
    measure: str = "removal"
    alpha: float = 1.0
    epsilon: float = 0.1
    freeze_top_n: int = 0
    frozen: tuple[int, ...] = ()
    max_layer_ratio: float = 0.9
    attn_mlp: tuple[float, float] | None = (2.0, 8.0)
    method: str = "taylor"

    def __post_init__(self):
        if isinstance(self.ratio, bool) or not 0 <= self.ratio < 1:
            raise ValueError(f"ratio={self.ratio!r} must be in [0, 1)")
        check_choice("ratio_of", self.ratio_of, RATIO_OF)
        ALLOCATIONS.check(self.strategy)
        if not (np.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha={self.alpha!r} must be a finite number > 0 (α ∈ (0, ∞))")
        if not (np.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"epsilon={self.epsilon!r} must be a finite number > 0")
        if isinstance(self.freeze_top_n, bool) or not isinstance(self.freeze_top_n, int) or self.freeze_top_n < 0:
            raise ValueError(f"freeze_top_n={self.freeze_top_n!r} must be an integer >= 0")
        if not 0 < self.max_layer_ratio < 1:
            raise ValueError(f"max_layer_ratio={self.max_layer_ratio!r} must be in (0, 1)")
        if self.attn_mlp is not None:
            check_attn_mlp(self.attn_mlp)

    def to_dict(self) -> dict:
        return asdict(self)


def allocate(importance: np.ndarray, layer_params: np.ndarray, target: int, cfg: LayerwiseConfig) -> np.ndarray:
    """Per-layer ratios (share of each layer's attention + MLP parameters) whose removed parameters sum to
    `target`: r_i = min(c·w_i, max_layer_ratio), frozen layers 0, c by bisection (monotone)."""
    importance = np.asarray(importance, dtype=np.float64)
    p = np.asarray(layer_params, dtype=np.float64)
    n_layers = len(p)
    if len(importance) != n_layers:
        raise ValueError(f"layer importance has {len(importance)} values; the model has {n_layers} layers")
    if not np.isfinite(importance).all():
        raise ValueError(f"layer importance holds inf/NaN at layers {np.flatnonzero(~np.isfinite(importance)).tolist()}")
    bad = [i for i in cfg.frozen if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"frozen={list(cfg.frozen)}: layers {bad} are outside 0..{n_layers - 1}")
    if cfg.freeze_top_n >= n_layers:
        raise ValueError(f"freeze_top_n={cfg.freeze_top_n} must be below the number of layers ({n_layers})")
    w = ALLOCATIONS[cfg.strategy].weights(NORMALIZERS["minmax"].fn(importance), cfg.alpha, cfg.epsilon)
    frozen = set(cfg.frozen) | set(np.argsort(-importance, kind="stable")[: cfg.freeze_top_n].tolist())
    w[sorted(frozen)] = 0.0
    w[p == 0] = 0.0
    cap = np.where(w > 0, cfg.max_layer_ratio, 0.0)
    most = float((cap * p).sum())
    if target > most + 1e-9:
        raise ValueError(
            f"the budget ({target:,} parameters) cannot be met: with frozen layers {sorted(frozen)} and "
            f"max_layer_ratio={cfg.max_layer_ratio} the other layers can give at most {int(most):,}; the largest "
            f"feasible ratio is that over the denominator (lower the ratio, freeze fewer layers or raise "
            f"max_layer_ratio)")
    if target <= 0:
        return np.zeros(n_layers)
    lo, hi = 0.0, cfg.max_layer_ratio / w[w > 0].min()
    for _ in range(200):
        c = (lo + hi) / 2
        if (np.minimum(c * w, cap) * p).sum() < target:
            lo = c
        else:
            hi = c
    return np.minimum(hi * w, cap)


def _largest_remainder(ideal: np.ndarray, limit: np.ndarray, unit_cost: np.ndarray, need: int, *,
                       below: bool = False, counts: np.ndarray | None = None) -> np.ndarray:
    """Integer counts ≤ limit near `ideal` whose cost reaches `need`, overshooting by less than one unit
    (`below`: the most units that stay ≤ need): floors first (or the given counts), then one more unit at a
    time to the largest fractional remainders (then wherever room is)."""
    ideal = np.minimum(np.maximum(ideal, 0), limit)
    counts = np.floor(ideal).astype(np.int64) if counts is None else counts.copy()
    short = need - int((counts * unit_cost).sum())
    order = np.argsort(-(ideal - counts), kind="stable")
    while short > 0:
        added = False
        for i in order:
            if short <= 0:
                break
            if counts[i] < limit[i] and unit_cost[i] > 0 and not (below and unit_cost[i] > short):
                counts[i] += 1
                short -= int(unit_cost[i])
                added = True
        if not added:
            break
    return counts


def counts_for_targets(budget: Budget, layer_targets: np.ndarray, attn_mlp, total_target: int) -> np.ndarray:
    """[n_layers, 2] units to remove per (layer, kind) for per-layer parameter targets split x:y."""
    x, y = check_attn_mlp(attn_mlp)
    widths = np.asarray(budget.widths, dtype=np.int64).reshape(-1, 2)
    cost = np.stack([np.asarray(budget.costs[b], dtype=np.int64) for b in BLOCKS], axis=1)
    t = np.asarray(layer_targets, dtype=np.float64)
    widths = np.where((t > 0)[:, None], widths, 0)  # a layer with no target (frozen) gives nothing
    want_attn = np.minimum(t * x / (x + y), widths[:, 0] * cost[:, 0])
    safe = np.where(cost > 0, cost, 1)
    if y > 0:  # attention: the most groups within its share; the MLP fills the rest to the unit
        groups = _largest_remainder(want_attn / safe[:, 0], widths[:, 0], cost[:, 0], int(round(want_attn.sum())),
                                    below=True)
        need_mlp = total_target - int((groups * cost[:, 0]).sum())
        want_mlp = np.maximum(t - groups * cost[:, 0], 0)  # what each layer still owes, scaled to the need
        want_mlp = want_mlp * (need_mlp / want_mlp.sum()) if want_mlp.sum() > 0 else want_mlp
        channels = _largest_remainder(want_mlp / safe[:, 1], widths[:, 1], cost[:, 1], need_mlp)
    else:
        groups = _largest_remainder(want_attn / safe[:, 0], widths[:, 0], cost[:, 0], total_target)
        channels = np.zeros(len(t), dtype=np.int64)
    short = total_target - int((groups * cost[:, 0]).sum() + (channels * cost[:, 1]).sum())
    if short > 0:  # the MLP ran out: more attention groups
        groups = _largest_remainder(want_attn / safe[:, 0], widths[:, 0], cost[:, 0],
                                    int((groups * cost[:, 0]).sum()) + short, counts=groups)
    removed = int((groups * cost[:, 0]).sum() + (channels * cost[:, 1]).sum())
    if removed < total_target:
        raise ValueError(f"attn_mlp={attn_mlp}: the layers can give only {removed:,} of the {total_target:,} "
                         "parameters asked in this split (the kind it asks most of runs out); lower the ratio or "
                         "change x:y")
    return np.stack([groups, channels], axis=1)


def plan_from_counts(table: pd.DataFrame, budget: Budget, counts: np.ndarray, *, score_column: str = "score",
                     target: int = 0, denominator: int = 0, provenance: PlanProvenance | None = None) -> Plan:
    """Remove counts[i, k] lowest-score units of kind k in layer i (k: 0 attention, 1 MLP)."""
    check_table_widths(table, budget.widths)
    removed: dict[str, dict[int, list[int]]] = {b: {} for b in BLOCKS}
    for (layer, block), part in table.groupby(["layer", "block"], observed=True, sort=True):
        n = int(counts[int(layer), BLOCKS.index(str(block))])
        if n:
            order = stable_argsort(part[score_column].to_numpy(dtype=np.float64))
            removed[str(block)][int(layer)] = sorted(part["unit"].to_numpy()[order[:n]].tolist())
    cost = np.stack([np.asarray(budget.costs[b], dtype=np.int64) for b in BLOCKS], axis=1)
    plan = Plan.from_units(budget.widths, removed, target_params=int(target),
                           selected_params=int((np.asarray(counts) * cost).sum()), denominator=int(denominator),
                           provenance=provenance or PlanProvenance("hand", method=table.attrs.get("method")))
    plan.made_by(selection={**plan.provenance.selection, "score_column": score_column})
    return check_achieved(plan, plan.provenance.label, int(cost.max()))


def layerwise_plan(table: pd.DataFrame, budget: Budget, layer_importance, cfg: LayerwiseConfig, *,
                   score_column: str = "score") -> Plan:
    """The study's layer-wise plan: per-layer ratios from layer importance, units by score within each layer."""
    target, denominator = budget.target(cfg.ratio, cfg.ratio_of)
    ratios = allocate(layer_importance, budget.layer_params(), target, cfg)
    settings = cfg.to_dict()
    selection = {k: settings.pop(k) for k in ("ratio", "ratio_of", "attn_mlp")}
    provenance = PlanProvenance("layerwise", method=table.attrs.get("method", settings.get("method")),
                                selection=dict(selection, layer_ratios=ratios.round(6).tolist(),
                                               score_column=score_column), params=settings)
    if cfg.attn_mlp is None:  # each layer's lowest-score units until its own ratio: the per-layer selection
        plan = select(table, budget, SelectionConfig(layer_ratios=tuple(ratios)), score_column=score_column)
        plan.provenance = provenance
        return plan
    counts = counts_for_targets(budget, ratios * budget.layer_params(), cfg.attn_mlp, target)
    return plan_from_counts(table, budget, counts, score_column=score_column, target=target,
                            denominator=denominator, provenance=provenance)


def uniform_plan(table: pd.DataFrame, budget: Budget, ratio: float, ratio_of: str = "total", *,
                 attn_mlp=None, layers: list[int] | None = None, score_column: str = "score",
                 provenance: PlanProvenance | None = None) -> Plan:
    """Every pruned layer (default: all) removes the same number of groups and of channels (same widths).

    attn_mlp None: attention and MLP lose the same share (as close as whole groups allow). Budget rule:
    removed ≥ target, overshooting by less than one MLP channel per pruned layer (by less than one group per
    pruned layer when the MLP is not pruned). Raises when the layers cannot give the budget. `provenance`:
    the maker's own (a baseline's); its selection gets the ratio, split and layers.
    """
    target, denominator = budget.target(ratio, ratio_of)
    n_layers = len(budget.widths)
    layers = list(range(n_layers)) if layers is None else sorted(set(layers))
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad or not layers:
        raise ValueError(f"layers {layers}: need a non-empty list within 0..{n_layers - 1}")
    widths = np.asarray(budget.widths, dtype=np.int64)[layers]
    if (widths != widths[0]).any():
        raise ValueError("uniform_plan needs the pruned layers to have equal widths now (a dense model)")
    g_max, c_max = (int(v) for v in widths[0])
    ca, cm = (int(budget.costs[b][layers[0]]) for b in BLOCKS)
    n = len(layers)
    if attn_mlp is None:
        share = g_max * ca / max(g_max * ca + c_max * cm, 1)
    else:
        x, y = check_attn_mlp(attn_mlp)
        share = x / (x + y)
    groups = min(g_max, int(round(target * share / max(n * ca, 1)))) if ca else 0
    if c_max == 0 or (attn_mlp is not None and share == 1.0):
        groups = min(g_max, int(np.ceil(target / max(n * ca, 1))))
        channels = 0
    else:
        channels = int(np.ceil(max(target - n * groups * ca, 0) / (n * cm)))
    if channels > c_max or n * (groups * ca + channels * cm) < target:
        most = n * (g_max * ca + c_max * cm)
        raise ValueError(f"ratio={ratio} of {ratio_of} asks for {target:,} parameters; {n} uniformly pruned layers "
                         f"give at most {most:,} at this split (largest feasible ratio ≈ {most / denominator:.3f})")
    counts = np.zeros((n_layers, 2), dtype=np.int64)
    counts[layers] = (groups, channels)
    provenance = provenance or PlanProvenance("uniform", method=table.attrs.get("method"))
    provenance = replace(provenance, selection=dict(provenance.selection, ratio=ratio, ratio_of=ratio_of,
                                                    attn_mlp=attn_mlp, layers=layers))
    return plan_from_counts(table, budget, counts, score_column=score_column, target=target, denominator=denominator,
                            provenance=provenance)


def kind_rates(plan: Plan, budget: Budget) -> dict:
    """Pruned share of attention and of MLP parameters, and the share of the removed parameters that is attention."""
    gone = {b: sum(len(plan.removed[b][i]) * budget.costs[b][i] for i in range(plan.n_layers)) for b in BLOCKS}
    total = {b: sum(w[k] * budget.costs[b][i] for i, w in enumerate(budget.widths)) for k, b in enumerate(BLOCKS)}
    removed = gone["attn"] + gone["mlp"]
    return dict(attn_rate=gone["attn"] / max(total["attn"], 1), mlp_rate=gone["mlp"] / max(total["mlp"], 1),
                attn_share=gone["attn"] / removed if removed else 0.0, removed_params=removed)
