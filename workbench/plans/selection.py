"""The global unit table and fractional-knapsack selection.

One row per unit (layer, block, unit, importance, cost, score = importance / cost). The lowest
scores are removed, in order, until the removed cost reaches `ratio` of the chosen denominator:
`total` = every parameter of the model (tied embeddings counted once), `prunable` = the parameters
owned by attention and MLP units. The plan is the smallest such prefix, so it reaches the target
exactly or overshoots by less than one unit's cost.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from workbench.core.arch import BLOCKS, geometry, layer_widths
from workbench.core.models import parameter_count
from workbench.core.registry import check_choice
from workbench.core.units import iter_blocks, unit_cost
from workbench.plans.plan import Plan, PlanProvenance, check_achieved

RATIO_OF = ("total", "prunable")


def block_codes(table: pd.DataFrame) -> np.ndarray:
    """0 for attention rows, 1 for MLP rows, as small integers (fast: the categorical codes when present)."""
    col = table["block"]
    if isinstance(col.dtype, pd.CategoricalDtype) and list(col.cat.categories) == list(BLOCKS):
        return col.cat.codes.to_numpy()
    return (col.astype(str).to_numpy() == "mlp").astype(np.int8)


def unit_costs(model: nn.Module) -> dict[str, list[int]]:
    """Exact parameters one unit removes, per block and layer."""
    head_dim = geometry(model.config).head_dim
    out: dict[str, list[int]] = {b: [] for b in BLOCKS}
    for _, block, parts in iter_blocks(model):
        out[block].append(unit_cost(parts, block, head_dim))
    return out


def build_table(scores: dict[str, list[torch.Tensor]], costs: dict[str, list[int]]) -> pd.DataFrame:
    """One row per unit: layer, block, unit, importance, cost, score (vectorised).

    `table.attrs["widths"]` records the (KV groups, MLP channels) per layer the scores were made for;
    `select` refuses a model of other widths (importance of another or an already pruned model).
    """
    frames = []
    for block in BLOCKS:
        if len(scores[block]) != len(costs[block]):
            raise ValueError(
                f"importance has {len(scores[block])} layers for {block} but the model has {len(costs[block])}; "
                "importance must be computed on the model being pruned"
            )
        for layer, (imp, cost) in enumerate(zip(scores[block], costs[block])):
            n = imp.numel()
            if n == 0:
                continue
            frames.append(pd.DataFrame({
                "layer": np.full(n, layer, dtype=np.int32),
                "block": block,
                "unit": np.arange(n, dtype=np.int32),
                "importance": imp.double().numpy(),
                "cost": np.full(n, cost, dtype=np.int64),
            }))
    if not frames:
        raise ValueError("the scores hold no unit at all; nothing can be selected")
    table = pd.concat(frames, ignore_index=True)
    table["block"] = pd.Categorical(table["block"], categories=list(BLOCKS))
    table["score"] = table["importance"] / table["cost"]
    table.attrs["widths"] = [(int(scores["attn"][i].numel()), int(scores["mlp"][i].numel()))
                             for i in range(len(scores["attn"]))]
    return table


def check_table_widths(table: pd.DataFrame, widths: list[tuple[int, int]]) -> None:
    """Refuse a table made for other layer widths than the model's (or with unit indices out of range)."""
    made_for = table.attrs.get("widths")
    if made_for is not None:
        made_for = [tuple(w) for w in made_for]
        if made_for != [tuple(w) for w in widths]:
            diff = [(i, a, b) for i, (a, b) in enumerate(zip(made_for, widths)) if tuple(a) != tuple(b)]
            raise ValueError(
                f"the importance table was made for layer widths that differ from the model's "
                f"({len(made_for)} vs {len(widths)} layers; first differences (layer, table, model): {diff[:3]}). "
                "Compute importance on the model being pruned (not on the dense model after pruning it)")
        return
    w = np.asarray(widths, dtype=np.int64).reshape(-1, 2)
    layer, unit, mlp = table["layer"].to_numpy(), table["unit"].to_numpy(), block_codes(table)
    bad = (layer < 0) | (layer >= len(w)) | (unit < 0)
    bad[~bad] |= unit[~bad] >= w[layer[~bad], mlp[~bad]]
    if bad.any():
        raise ValueError(f"{int(bad.sum())} table rows name units outside the model's widths "
                         f"(first: row {int(np.flatnonzero(bad)[0])})")


@dataclass(frozen=True)
class SelectionConfig:
    """How many parameters to remove, against what, and what to protect.

    Args:
        ratio: share of the denominator to remove, in [0, 1).
        ratio_of: the denominator: "total" (every parameter, tied embeddings once) or "prunable"
            (the parameters owned by attention and MLP units).
        min_units_per_block: each block keeps at least its N best units; 0 lets blocks (and layers) empty.
        layer_ratios: per-layer allocation (e.g. OWL): layer i loses layer_ratios[i] of its attention + MLP
            parameters, lowest scores first within the layer; `ratio` and `ratio_of` are then not used.
        attn_mlp: the Attention:MLP distribution x:y of the GAQ-Aware-Prune study: x/(x+y) of the removed
            parameters come from attention groups and y/(x+y) from MLP channels, each kind chosen by its own
            knapsack (lowest scores first). None: one knapsack over both kinds.
    """

    ratio: float = 0.2
    ratio_of: str = "total"
    min_units_per_block: int = 0  # 0 lets blocks (and whole layers) empty
    # Per-layer allocation (e.g. OWL): layer i loses layer_ratios[i] of its attention+MLP parameters,
    # lowest scores first within the layer; `ratio` and `ratio_of` are then not used.
    layer_ratios: tuple[float, ...] | None = None
    attn_mlp: tuple[float, float] | None = None

    def __post_init__(self):
        for name in ("ratio", "min_units_per_block"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise TypeError(f"{name}={value!r} must be a number, not {type(value).__name__}")
        if not float(self.ratio) == float(self.ratio):
            raise ValueError(f"ratio={self.ratio} is NaN; use a value in [0, 1)")
        if self.layer_ratios is not None:
            bad = [r for r in self.layer_ratios if not 0.0 <= r < 1.0]
            if bad or not len(self.layer_ratios):
                raise ValueError(f"layer_ratios {list(self.layer_ratios)} must be a non-empty list of values in [0, 1)")
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio={self.ratio} must be in [0, 1)")
        if self.attn_mlp is not None:
            check_attn_mlp(self.attn_mlp)
            if self.layer_ratios is not None:
                raise ValueError("attn_mlp with layer_ratios: use allocation.layerwise_plan for per-layer x:y")
        check_choice("ratio_of", self.ratio_of, RATIO_OF)
        if self.min_units_per_block < 0:
            raise ValueError(f"min_units_per_block={self.min_units_per_block} must be >= 0")


def check_attn_mlp(attn_mlp) -> tuple[float, float]:
    """A valid x:y (two finite numbers >= 0, not both 0), or a clear error."""
    try:
        x, y = (float(v) for v in attn_mlp)
    except (TypeError, ValueError):
        raise ValueError(f"attn_mlp={attn_mlp!r} must be two numbers (x, y), e.g. (2, 8)") from None
    if not (np.isfinite(x) and np.isfinite(y)) or x < 0 or y < 0 or x + y == 0:
        raise ValueError(f"attn_mlp={attn_mlp!r}: x and y must be finite, >= 0 and not both 0 (e.g. (2, 8), (0, 10))")
    return x, y


def prunable_params(costs: dict[str, list[int]], widths: list[tuple[int, int]]) -> int:
    return sum(costs[b][i] * widths[i][k] for k, b in enumerate(BLOCKS) for i in range(len(widths)))


@dataclass(frozen=True)
class Budget:
    """What a selection needs to know of the model: widths, unit costs and total parameters."""

    widths: list[tuple[int, int]]
    costs: dict[str, list[int]]
    total_params: int

    @classmethod
    def of(cls, model: nn.Module) -> Budget:
        return cls(layer_widths(model), unit_costs(model), parameter_count(model))

    @property
    def prunable_params(self) -> int:
        return prunable_params(self.costs, self.widths)

    def layer_params(self) -> np.ndarray:
        """Attention + MLP parameters per layer."""
        return np.array([sum(w[k] * self.costs[b][i] for k, b in enumerate(BLOCKS)) for i, w in enumerate(self.widths)],
                        dtype=np.float64)

    def target(self, ratio: float, ratio_of: str) -> tuple[int, int]:
        """(parameters to remove, denominator) for `ratio` of "total" or "prunable" parameters."""
        check_choice("ratio_of", ratio_of, RATIO_OF)
        denominator = self.total_params if ratio_of == "total" else self.prunable_params
        return int(np.ceil(ratio * denominator)), denominator


def stable_argsort(x: np.ndarray) -> np.ndarray:
    """argsort(kind="stable") semantics at quicksort speed: only runs of equal values are re-ordered by index."""
    order = np.argsort(x)
    xs = x[order]
    tie = xs[1:] == xs[:-1] if len(xs) > 1 else np.zeros(0, dtype=bool)
    if not tie.any():
        return order
    # only the positions inside runs of equal values are re-ordered (by index): a small sort, not a second full one
    in_run = np.zeros(len(x), dtype=bool)
    in_run[1:] |= tie
    in_run[:-1] |= tie
    pos = np.flatnonzero(in_run)
    run = np.r_[0, np.cumsum(~tie)][pos].astype(np.int64)
    order[pos] = order[pos][np.argsort(run * len(x) + order[pos])]
    return order


def select(table: pd.DataFrame, model: nn.Module | Budget, cfg: SelectionConfig = SelectionConfig(), *,
           score_column: str = "score") -> Plan:
    """Remove the lowest-score units until `cfg.ratio` of the denominator is reached.

    Rows with `forced=True` (tau) are removed first, whole, and count against the budget.
    """
    budget = model if isinstance(model, Budget) else Budget.of(model)
    check_table_widths(table, budget.widths)
    if cfg.layer_ratios is not None:
        return _select_per_layer(table, budget, cfg, score_column)
    widths = budget.widths
    target, denominator = budget.target(cfg.ratio, cfg.ratio_of)

    score = table[score_column].to_numpy(dtype=np.float64)
    layer = table["layer"].to_numpy()
    mlp = block_codes(table)
    unit = table["unit"].to_numpy()
    cost = table["cost"].to_numpy()
    group = layer * 2 + mlp.astype(layer.dtype)
    # blocks removed whole before width pruning (tau); they count against the budget
    forced = table["forced"].to_numpy(dtype=bool) if "forced" in table else np.zeros(len(table), dtype=bool)
    if forced.any() and cfg.min_units_per_block > 0:
        raise ValueError(f"tau removes {len(np.unique(group[forced]))} blocks whole, but min_units_per_block="
                         f"{cfg.min_units_per_block} keeps units in every block; set one of them off")
    if forced.any() and int(cost[forced].sum()) > target:
        forced = _forced_within_budget(table, forced, cost, group, target, denominator, cfg)
    whole = np.flatnonzero(forced)
    whole_cost = int(cost[whole].sum())
    idx = np.flatnonzero(~forced)
    if cfg.min_units_per_block == 0 and cfg.attn_mlp is None:  # only the lowest scores matter: sort just those
        idx = _lowest_reaching(score, cost, idx, target - whole_cost)
    order = idx[stable_argsort(score[idx])]  # ascending score; ties keep table order
    if cfg.min_units_per_block > 0:  # protect each block's best units
        by_group = np.argsort(group[order], kind="stable")
        g_sorted = group[order][by_group]
        starts = np.r_[0, np.flatnonzero(np.diff(g_sorted)) + 1]
        sizes = np.diff(np.r_[starts, len(g_sorted)])
        pos = np.arange(len(g_sorted)) - np.repeat(starts, sizes)
        protected = np.zeros(len(order), dtype=bool)
        protected[by_group] = pos >= np.repeat(sizes, sizes) - cfg.min_units_per_block
        order = order[~protected]
    if cfg.attn_mlp is None:
        chosen = np.concatenate([whole, _prefix(order, cost, target - whole_cost, target, whole_cost, denominator, cfg)])
    else:
        if len(whole):
            raise ValueError("tau (forced whole-block removal) does not combine with attn_mlp; set tau=None")
        x, y = check_attn_mlp(cfg.attn_mlp)
        attn_target = int(np.ceil(target * x / (x + y)))
        parts = [_prefix(order[mlp[order] == k], cost, t, t, 0, denominator, cfg, kind=BLOCKS[k], share=sh)
                 for k, (t, sh) in enumerate(((attn_target, x / (x + y)), (target - attn_target, y / (x + y))))]
        chosen = np.concatenate(parts)
    # (block, layer, unit) order: each (layer, block) contiguous with its units ascending. `build_table` writes
    # rows in that order, so a mask gives it without a sort; a table in another row order is sorted.
    mask = np.zeros(len(table), dtype=bool)
    mask[chosen] = True
    chosen = np.flatnonzero(mask)
    span = int(unit.max()) + 1
    key = (mlp[chosen].astype(np.int64) * len(widths) + layer[chosen]) * span + unit[chosen]
    if len(key) > 1 and not (np.diff(key) > 0).all():
        chosen = chosen[np.argsort(key)]
    removed: dict[str, dict[int, list[int]]] = {b: {} for b in BLOCKS}
    bounds = np.flatnonzero(np.diff(group[chosen])) + 1
    for part in np.split(chosen, bounds) if len(chosen) else []:
        removed[BLOCKS[mlp[part[0]]]][int(layer[part[0]])] = unit[part].tolist()
    # built directly: the lists are sorted, distinct and in range by construction (from_units would re-check)
    plan = Plan(removed={b: [removed[b].get(i, []) for i in range(len(widths))] for b in BLOCKS}, widths=list(widths),
                target_params=target, selected_params=int(cost[chosen].sum()), denominator=denominator,
                provenance=PlanProvenance("global", method=table.attrs.get("method"),
                                          selection=dict(asdict(cfg), score_column=score_column)))
    if len(plan.removed_layers()) == len(widths):
        raise ValueError(f"ratio={cfg.ratio} would remove every layer; lower the ratio or set min_units_per_block >= 1")
    return check_achieved(plan, "global selection", int(cost.max()))


def _forced_within_budget(table: pd.DataFrame, forced: np.ndarray, cost: np.ndarray, group: np.ndarray, target: int,
                          denominator: int, cfg: SelectionConfig) -> np.ndarray:
    """The whole-block removals of tau when they exceed the budget: refused, or capped to the lowest-loss blocks
    that fit (with a warning), as `table.attrs["tau_over_budget"]` says."""
    tau, policy = table.attrs.get("tau"), table.attrs.get("tau_over_budget", "refuse")
    blocks = np.unique(group[forced])
    block_cost = np.array([cost[forced & (group == g)].sum() for g in blocks])
    over = (f"tau={tau} removes {len(blocks)} whole blocks owning {int(block_cost.sum()):,} parameters "
            f"({block_cost.sum() / denominator:.2%} of {cfg.ratio_of}), more than the budget ratio={cfg.ratio} "
            f"({target:,})")
    if policy != "cap":
        raise ValueError(f"{over}; lower tau, raise the ratio, or set tau_over_budget='cap' (remove whole only the "
                         "lowest-loss blocks that fit)")
    loss = table["forced_loss"].to_numpy(dtype=np.float64)
    block_loss = np.array([np.nanmin(loss[forced & (group == g)]) for g in blocks])
    order = np.lexsort((blocks, block_loss))  # lowest loss first; ties by position
    fits = int((np.cumsum(block_cost[order]) <= target).sum())  # costs are positive: the fitting blocks are a prefix
    keep = set(blocks[order][:fits].tolist())
    warnings.warn(f"{over}: capped to the {len(keep)} lowest-loss blocks that fit; the other "
                  f"{len(blocks) - len(keep)} are pruned by width", UserWarning, stacklevel=3)
    return forced & np.isin(group, list(keep))


def _lowest_reaching(score: np.ndarray, cost: np.ndarray, idx: np.ndarray, rest: int) -> np.ndarray:
    """The units of `idx` (in their order) whose score is at most the k-th smallest, for the smallest k found
    whose cost reaches `rest`: every unit a stable sort would put before the budget is met, ties included, in
    O(n) partitions instead of a full sort. All of `idx` when it cannot reach `rest` (the caller says why)."""
    n = len(idx)
    if rest <= 0 or n == 0:
        return idx[:0] if rest <= 0 else idx
    full = n == len(score)  # idx is every row in order (no forced block): no gathers
    c = cost if full else cost[idx]
    if int(c.sum()) < rest:
        return idx
    s = score if full else score[idx]
    k = min(n, max(64, int(2 * rest / c.mean())))
    while k < n:
        part = np.argpartition(s, k - 1)[:k]
        if int(c[part].sum()) >= rest:
            return idx[s <= s[part].max()]
        k = min(n, 2 * k)
    return idx


def _prefix(order: np.ndarray, cost: np.ndarray, rest: int, target: int, whole_cost: int, denominator: int,
            cfg: SelectionConfig, kind: str | None = None, share: float = 1.0) -> np.ndarray:
    """The shortest prefix of `order` whose cost reaches `rest` (clear error when even all of it cannot)."""
    cum = cost[order].cumsum()
    available = whole_cost + (int(cum[-1]) if len(cum) else 0)
    if target > available:
        if kind is None:
            raise ValueError(
                f"ratio={cfg.ratio} of {cfg.ratio_of} parameters ({denominator:,}) asks for {target:,} parameters, "
                f"but only {available:,} can be removed with min_units_per_block={cfg.min_units_per_block} "
                f"(max ratio ≈ {available / denominator:.3f})")
        raise ValueError(
            f"attn_mlp={cfg.attn_mlp} asks {kind} for {target:,} parameters of ratio={cfg.ratio}, but only "
            f"{available:,} can be removed from {kind} (min_units_per_block={cfg.min_units_per_block}); "
            f"at this x:y the largest feasible ratio of {cfg.ratio_of} is ≈ {available / share / denominator:.3f}")
    n_remove = 0 if rest <= 0 else int(np.searchsorted(cum, rest, side="left")) + 1
    return order[:n_remove]


def _select_per_layer(table: pd.DataFrame, budget: Budget, cfg: SelectionConfig, score_column: str) -> Plan:
    """Within each layer, remove the lowest-score units until the layer's own ratio of its parameters is met
    (or its unprotected units run out: `min_units_per_block` keeps each block's best units). A unit that would
    pass the layer's target by more than the layer's smallest unit is skipped for the next one (a whole KV group
    when a few channels are owed), so each layer overshoots by less than one of its smallest units; only when
    the small units run out first are the skipped ones taken, lowest score first."""
    widths = budget.widths
    assert cfg.layer_ratios is not None  # select() sends only per-layer settings here
    if len(cfg.layer_ratios) != len(widths):
        raise ValueError(f"layer_ratios has {len(cfg.layer_ratios)} values; the model has {len(widths)} layers")
    if "forced" in table and table["forced"].any():
        raise ValueError("tau (forced whole-block removal) does not combine with layer_ratios; set tau=None")
    removed: dict[str, dict[int, list[int]]] = {b: {} for b in BLOCKS}
    target = selected = 0
    short = []
    for layer, part in table.groupby("layer", sort=True):
        part = part.iloc[stable_argsort(part[score_column].to_numpy(dtype=np.float64))]
        if cfg.min_units_per_block:  # each block keeps its N best units; the layer's ratio is met from the rest
            from_top = part.groupby("block", observed=True).cumcount(ascending=False).to_numpy()
            part = part[from_top >= cfg.min_units_per_block]
        layer_params = sum(widths[layer][k] * budget.costs[b][layer] for k, b in enumerate(BLOCKS))
        want = int(np.ceil(cfg.layer_ratios[layer] * layer_params))
        cost, block, unit = part["cost"].to_numpy(), block_codes(part), part["unit"].to_numpy()
        slack = int(cost.min()) if len(cost) else 0
        got, skipped = 0, []
        for c, k, u in zip(cost.tolist(), block.tolist(), unit.tolist()):
            if got >= want:
                break
            if got + c > want + slack:
                skipped.append((c, k, u))
                continue
            removed[BLOCKS[k]].setdefault(int(layer), []).append(int(u))
            got += int(c)
        for c, k, u in skipped:  # the small units ran out first: the lowest-score skipped ones, in order
            if got >= want:
                break
            removed[BLOCKS[k]].setdefault(int(layer), []).append(int(u))
            got += int(c)
        target += want
        selected += got
        if got < want:
            short.append(f"layer {layer}: {cfg.layer_ratios[layer]:.3f} asked, {got / layer_params:.3f} possible")
    plan = Plan.from_units(widths, {b: {i: sorted(u) for i, u in d.items()} for b, d in removed.items()},
                           target_params=target, selected_params=selected, denominator=budget.prunable_params,
                           provenance=PlanProvenance("per_layer", method=table.attrs.get("method"),
                                                     selection=dict(asdict(cfg), score_column=score_column)))
    why = (f"min_units_per_block={cfg.min_units_per_block} keeps units the layer ratios ask for "
           f"({'; '.join(short[:4])}{' …' if len(short) > 4 else ''})") if short else ""
    return check_achieved(plan, "per-layer selection", int(table["cost"].max()), why)
