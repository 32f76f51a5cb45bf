"""Plans: which units to remove, validated against the widths they were made for, and their summaries.

Every way of choosing units (the global selection, per-layer allocations, baselines, random plans for
tests) produces a `Plan`; pruning, zeroing, checkpoints, evaluation and figures all take one.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch

from workbench.models import BLOCKS


@dataclass
class Plan:
    """Which units to remove: block -> per layer sorted unit indices, plus what it was chosen against.

    Attributes:
        removed: block -> per layer, the sorted distinct unit indices removed.
        widths: (KV groups, MLP channels) per layer of the model the plan applies to.
        target_params: parameters the selection aimed to remove.
        selected_params: parameters the chosen units own.
        denominator: the parameters `ratio` was taken of.
        settings: how the plan was made (selection and scoring settings, or a baseline's).
    """

    removed: dict[str, list[list[int]]]
    widths: list[tuple[int, int]]  # (KV groups, MLP channels) per layer of the model it applies to
    target_params: int = 0
    selected_params: int = 0
    denominator: int = 0
    settings: dict = field(default_factory=dict)

    @property
    def asked_ratio(self) -> float:
        """The share of the denominator the maker was asked to remove (0 when it was asked for no budget)."""
        return self.target_params / self.denominator if self.denominator else 0.0

    @property
    def achieved_ratio(self) -> float:
        """The share of the denominator the plan removes."""
        return self.selected_params / self.denominator if self.denominator else 0.0

    @property
    def n_layers(self) -> int:
        return len(self.widths)

    def kept(self, block: str, layer: int) -> list[int]:
        n = self.widths[layer][BLOCKS.index(block)]
        gone = set(self.removed[block][layer])
        return [u for u in range(n) if u not in gone]

    def n_kept(self, block: str, layer: int) -> int:
        return self.widths[layer][BLOCKS.index(block)] - len(self.removed[block][layer])

    def emptied_blocks(self) -> list[tuple[int, str]]:
        return [(i, b) for i in range(self.n_layers) for b in BLOCKS
                if self.widths[i][BLOCKS.index(b)] > 0 and self.n_kept(b, i) == 0]

    def removed_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.n_kept("attn", i) == 0 and self.n_kept("mlp", i) == 0]

    def kept_widths(self) -> list[tuple[int, int]]:
        """(KV groups, MLP channels) per layer of the pruned model (removed layers left out)."""
        gone = set(self.removed_layers())
        return [(self.n_kept("attn", i), self.n_kept("mlp", i)) for i in range(self.n_layers) if i not in gone]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        """A plan from `to_dict`'s output, validated like `from_units` (indices in range, no duplicates)."""
        widths = [tuple(int(x) for x in w) for w in d["widths"]]
        for b in BLOCKS:
            if len(d["removed"][b]) != len(widths):
                raise ValueError(f"plan: {len(d['removed'][b])} {b} entries for {len(widths)} layers")
        removed = {b: {i: [int(u) for u in r] for i, r in enumerate(d["removed"][b])} for b in BLOCKS}
        return cls.from_units(widths, removed, target_params=d["target_params"], selected_params=d["selected_params"],
                              denominator=d["denominator"], settings=d["settings"])

    @classmethod
    def from_units(cls, widths: list[tuple[int, int]], removed: dict[str, dict[int, list[int]]], **kw) -> Plan:
        """A plan from {block: {layer: [units]}} (hand-written or random plans)."""
        extra = {b: sorted(set(removed.get(b, {})) - set(range(len(widths)))) for b in BLOCKS}
        if any(extra.values()):
            raise ValueError(f"plan names layers {extra} outside the model's {len(widths)} layers")
        full = {b: [sorted(removed.get(b, {}).get(i, [])) for i in range(len(widths))] for b in BLOCKS}
        for b in BLOCKS:
            for i, units in enumerate(full[b]):
                n = widths[i][BLOCKS.index(b)]
                # units are sorted: distinct and in range iff strictly increasing from >= 0 to < n
                if units and (units[0] < 0 or units[-1] >= n or any(a >= b_ for a, b_ in zip(units, units[1:]))):
                    raise ValueError(f"layer {i} {b}: units {units} must be distinct and in [0, {n})")
        return cls(removed=full, widths=list(widths), **kw)


def layer_summary(plan: Plan) -> pd.DataFrame:
    """Per layer and block: units before, kept, removed, kept and pruned fractions."""
    rows = []
    for i, w in enumerate(plan.widths):
        for k, block in enumerate(BLOCKS):
            units = w[k]
            removed = len(plan.removed[block][i])
            kept = units - removed
            rows.append(dict(layer=i, block=block, units=units, kept=kept, removed=removed,
                             kept_fraction=kept / units if units else np.nan,
                             pruned_fraction=removed / units if units else np.nan))
    return pd.DataFrame(rows)


def random_plan(widths: list[tuple[int, int]], fraction: float, seed: int = 0,
                empty_blocks: int = 0, remove_layers: int = 0) -> Plan:
    """A random plan (tests, baselines): `fraction` of each block's units, plus whole blocks/layers emptied."""
    n_layers = len(widths)
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction={fraction} must be in [0, 1)")
    if remove_layers < 0 or empty_blocks < 0:
        raise ValueError(f"remove_layers={remove_layers} and empty_blocks={empty_blocks} must be >= 0")
    if remove_layers >= n_layers:
        raise ValueError(f"remove_layers={remove_layers} must leave a layer: the model has {n_layers}")
    if empty_blocks > n_layers - remove_layers:
        raise ValueError(f"empty_blocks={empty_blocks}: at most one block per remaining layer "
                         f"({n_layers - remove_layers}) can be emptied without removing the layer")
    g = torch.Generator().manual_seed(seed)
    layer_perm = torch.randperm(n_layers, generator=g).tolist()
    gone_layers = set(layer_perm[:remove_layers])
    emptied = {(layer_perm[remove_layers + j], BLOCKS[j % 2]) for j in range(empty_blocks)}
    removed: dict[str, dict[int, list[int]]] = {b: {} for b in BLOCKS}
    for i in range(n_layers):
        for k, b in enumerate(BLOCKS):
            n = widths[i][k]
            if i in gone_layers or (i, b) in emptied:
                removed[b][i] = list(range(n))
            else:
                m = min(n - 1, int(round(fraction * n)))
                removed[b][i] = torch.randperm(n, generator=g)[:m].tolist()
    return Plan.from_units(widths, removed, settings=dict(kind="random", fraction=fraction, seed=seed))


# A plan may miss its budget by one removable item (one unit, or one layer for depth pruning) or by this share of
# its denominator, whichever is larger: past that, a shortfall is refused and an overshoot warned of.
ACHIEVED_TOLERANCE = 0.005


def check_achieved(plan: Plan, maker: str, item_params: int, why_short: str = "") -> Plan:
    """The one rule every plan maker applies to what it made: refuse a plan that removes nothing when asked for a
    budget, or falls short of it by more than the tolerance; warn when it overshoots by more. Returns the plan.
    `item_params`: the largest thing the maker removes at once (a unit, or a layer for ShortGPT);
    `why_short`: the maker's reason when it can fall short, for the message.
    """
    if plan.target_params <= 0 or plan.denominator <= 0:
        return plan
    asked, achieved = plan.asked_ratio, plan.achieved_ratio
    tolerance = max(ACHIEVED_TOLERANCE, item_params / plan.denominator)
    said = (f"{maker}: asked to remove {asked:.4f} of {plan.denominator:,} parameters ({plan.target_params:,}), "
            f"the plan removes {achieved:.4f} ({plan.selected_params:,})")
    if plan.selected_params == 0:
        raise ValueError(f"{said}: nothing{'; ' + why_short if why_short else ''}. Raise the ratio or choose "
                         "a finer-grained method")
    if achieved < asked - tolerance:
        raise ValueError(f"{said}, short by more than the tolerance {tolerance:.4f}"
                         f"{'; ' + why_short if why_short else ''}")
    if achieved > asked + tolerance:
        warnings.warn(f"{said}, over by more than the tolerance {tolerance:.4f} (its units are coarse)",
                      UserWarning, stacklevel=3)
    return plan
