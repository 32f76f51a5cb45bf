"""Plans: which units to remove, validated against the widths they were made for, and their summaries.

Every way of choosing units (the global selection, per-layer allocations, baselines, random plans for
tests) produces a `Plan`; pruning, zeroing, checkpoints, evaluation and figures all take one.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from workbench.core.arch import BLOCKS
from workbench.core.registry import check_choice

SOURCES = {  # how a plan can be made (PlanProvenance.source)
    "global": "the global fractional knapsack over the scored unit table",
    "per_layer": "the lowest-scored units of each layer at given per-layer ratios",
    "layerwise": "a per-layer strategy of the GAQ-Aware-Prune study (v1.0), units by score within each layer",
    "uniform": "the same ratio in every layer (or a range of layers), units by score within each layer",
    "owl": "OWL (Yin et al., 2024): per-layer ratios from the layers' outlier ratios, units by score within each layer",
    "baseline": "a method the workbench is compared with (`baselines.BASELINES`)",
    "random": "random units (tests, sanity checks)",
    "hand": "written by hand, or read from a file made before plans recorded their provenance",
}
_SELECTION_KEYS = ("ratio", "ratio_of", "min_units_per_block", "layer_ratios", "attn_mlp", "score_column")


@dataclass(frozen=True)
class PlanProvenance:
    """How a plan was made: the one record that labels it in runs, tables, the panel, figures and GGUF files.

    >>> PlanProvenance("global", method="taylor", scoring={"normalization": "minmax", "level": "block"}).label
    'taylor, minmax/block'
    >>> PlanProvenance("baseline", method="taylor", baseline="llm_pruner").description
    'llm_pruner'

    Args:
        source: what made it, one of `SOURCES`.
        method: the importance method its units were ranked by (None: none, e.g. a random plan).
        baseline: the baseline's name in `baselines.BASELINES` (source "baseline" only).
        scoring: the scoring settings (`ScoringConfig.to_dict()`) when units were ranked by corrected scores.
        selection: what was asked of the selection (ratio, ratio_of, per-layer ratios, attn:mlp, score column).
        params: everything else its maker was given (a strategy, a layer range, a seed, the layers removed).
    """

    source: str = "hand"
    method: str | None = None
    baseline: str | None = None
    scoring: Mapping[str, Any] = field(default_factory=dict)
    selection: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice("source", self.source, SOURCES)
        if (self.source == "baseline") != (self.baseline is not None):
            raise ValueError(f"source={self.source!r} with baseline={self.baseline!r}: a baseline's plan names it, "
                             "and only a baseline's")

    @property
    def label(self) -> str:
        """A short name that tells apart every way of making a plan (consolidation groups, legends, titles):
        the method and its corrections ("taylor, minmax/block, T=0.5"), a baseline's name, a strategy."""
        if self.source == "baseline":
            strategy = self.params.get("strategy")
            return f"{self.baseline}:{strategy}" if self.baseline == "layerwise" and strategy else str(self.baseline)
        if self.source in ("random", "hand"):
            return "random" if self.source == "random" else (self.method or "plan")
        name = ", ".join([self._method(), *_scoring_words(self.scoring)])
        if self.source == "layerwise":
            return f"layerwise:{self.params.get('strategy', '?')} · {name}"
        if self.source in ("uniform", "owl"):
            return f"{self.source} · {name}"
        return f"{name} · per layer" if self.source == "per_layer" else name

    @property
    def description(self) -> str:
        """Where the plan came from and how, in words (GGUF metadata, reports): "global taylor (minmax/block)"."""
        if self.source != "global":
            return self.label
        words = _scoring_words(self.scoring)
        return f"global {self._method()}" + (f" ({', '.join(words)})" if words else "")

    def _method(self) -> str:
        return self.method or self.scoring.get("method") or "scores"

    def to_dict(self) -> dict:
        return dict(source=self.source, method=self.method, baseline=self.baseline, scoring=dict(self.scoring),
                    selection=dict(self.selection), params=dict(self.params))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PlanProvenance:
        return cls(**{k: d[k] for k in ("source", "method", "baseline", "scoring", "selection", "params") if k in d})

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> PlanProvenance:
        """A provenance from the flat `settings` dict plans carried before (plan files, GGUF files, old code)."""
        s = dict(settings)
        baseline, kind = s.pop("baseline", None), s.pop("kind", None)
        scoring = dict(s.pop("scoring", None) or {})
        method = s.pop("method", None) or scoring.get("method")
        selection = {k: s.pop(k) for k in _SELECTION_KEYS if k in s}
        if baseline is not None:
            source = "baseline"
        elif kind in SOURCES:
            source = kind
        elif "score_column" in selection:
            source = "per_layer" if selection.get("layer_ratios") else "global"
        else:
            source = "hand"
        return cls(source, method=method, baseline=baseline, scoring=scoring, selection=selection, params=s)

    def settings(self) -> dict:
        """The flat view `Plan.settings` gives (what `from_settings` reads back)."""
        out: dict[str, Any] = {**self.params, **self.selection}
        if self.source in ("layerwise", "uniform", "owl", "random"):
            out["kind"] = self.source
        if self.baseline is not None:
            out["baseline"] = self.baseline
        if self.method is not None:
            out["method"] = self.method
        if self.scoring:
            out["scoring"] = dict(self.scoring)
        return out


def _scoring_words(scoring: Mapping[str, Any]) -> list[str]:
    """The corrections a scoring applies, each in a few characters (none for plain scores)."""
    words = []
    if scoring.get("normalization", "none") != "none":
        words.append(f"{scoring['normalization']}/{scoring.get('level', 'layer')}")
    low, high = scoring.get("clip_low"), scoring.get("clip_high")
    if (low not in (None, 0, 0.0)) or (high not in (None, 100, 100.0)):
        words.append(f"clip {low if low is not None else 0:g}–{high if high is not None else 100:g}")
    if scoring.get("temperature"):
        words.append(f"T={scoring['temperature']:g}")
    if scoring.get("tau") is not None:
        words.append(f"tau={scoring['tau']:g} ({scoring.get('tau_over_budget', 'refuse')})")
    return words


@dataclass
class Plan:
    """Which units to remove: block -> per layer sorted unit indices, plus what it was chosen against.

    Attributes:
        removed: block -> per layer, the sorted distinct unit indices removed.
        widths: (KV groups, MLP channels) per layer of the model the plan applies to.
        target_params: parameters the selection aimed to remove.
        selected_params: parameters the chosen units own.
        denominator: the parameters `ratio` was taken of.
        provenance: how the plan was made (`PlanProvenance`; `settings` is its flat dict view).
    """

    removed: dict[str, list[list[int]]]
    widths: list[tuple[int, int]]  # (KV groups, MLP channels) per layer of the model it applies to
    target_params: int = 0
    selected_params: int = 0
    denominator: int = 0
    provenance: PlanProvenance = field(default_factory=PlanProvenance)

    @property
    def settings(self) -> dict:
        """How the plan was made as one flat dict (read-only: a copy; change `provenance` instead)."""
        return self.provenance.settings()

    def made_by(self, **changes: Any) -> Plan:
        """This plan with its provenance's fields replaced (`plan.made_by(source="baseline", baseline="flap")`)."""
        self.provenance = replace(self.provenance, **changes)
        return self

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
        d = asdict(self)
        d["provenance"] = self.provenance.to_dict()
        d["settings"] = self.settings  # the flat view, for readers of plan files written before provenance
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        """A plan from `to_dict`'s output, validated like `from_units` (indices in range, no duplicates)."""
        widths = [(int(w[0]), int(w[1])) for w in d["widths"]]
        for b in BLOCKS:
            if len(d["removed"][b]) != len(widths):
                raise ValueError(f"plan: {len(d['removed'][b])} {b} entries for {len(widths)} layers")
        removed = {b: {i: [int(u) for u in r] for i, r in enumerate(d["removed"][b])} for b in BLOCKS}
        return cls.from_units(widths, removed, target_params=d["target_params"], selected_params=d["selected_params"],
                              denominator=d["denominator"],
                              provenance=PlanProvenance.from_dict(d["provenance"]) if "provenance" in d
                              else PlanProvenance.from_settings(d.get("settings") or {}))

    @classmethod
    def from_units(cls, widths: list[tuple[int, int]], removed: dict[str, dict[int, list[int]]], **kw) -> Plan:
        """A plan from {block: {layer: [units]}} (hand-written or random plans); `settings=` (a flat dict, as
        plans carried before) is read into `provenance`.

        >>> plan = Plan.from_units([(2, 8), (2, 8)], {"attn": {0: [1]}, "mlp": {1: list(range(8))}})
        >>> plan.kept_widths(), plan.emptied_blocks(), plan.provenance.label
        ([(1, 8), (2, 0)], [(1, 'mlp')], 'plan')
        """
        if "settings" in kw:
            kw["provenance"] = PlanProvenance.from_settings(kw.pop("settings") or {})
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
    """Per layer and block: units before, kept, removed, kept and pruned fractions.

    >>> plan = Plan.from_units([(2, 8)], {"mlp": {0: [0, 1]}})
    >>> layer_summary(plan)[["block", "kept", "pruned_fraction"]].values.tolist()
    [['attn', 2, 0.0], ['mlp', 6, 0.25]]
    """
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
    return Plan.from_units(widths, removed, provenance=PlanProvenance("random", params=dict(fraction=fraction, seed=seed)))


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


EXTREME_THRESHOLD = 0.9


def extreme_blocks(plan: Plan, threshold: float = EXTREME_THRESHOLD) -> pd.DataFrame:
    """Blocks whose pruned fraction exceeds `threshold` under `plan`."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold} must be in (0, 1]")
    s = layer_summary(plan)
    return s[s.pruned_fraction > threshold].reset_index(drop=True)
