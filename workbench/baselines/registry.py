"""The methods the global knapsack is compared with, each a way to make a `Plan` from the same calibration pass.

Every entry of `BASELINES` takes the cached importance (through a `Rescorer`), per-layer importance where it
needs one, and the budget (`ratio` of `ratio_of`), and returns a `Plan`; pruning, checkpoints, evaluation,
figures and widgets then treat it like any other plan. A baseline with `compensation` is followed by that
closed-form correction (`workbench.surgery.reconstruct`) when it is applied.

Sources:
- `global_taylor`, `global_taylor2`: this workbench's global fractional knapsack (score = importance / cost).
- `uniform`: every layer keeps the same widths (the deployable shape; plain transformers loads it).
- `layerwise`: the GAQ-Aware-Prune study's v1.0 per-layer strategies (`allocation.LayerwiseConfig`).
- `llm_pruner`: LLM-Pruner (Ma et al., 2023), block-wise: first-order Taylor importance, the same ratio in
  every layer of a middle range (its Llama-7B setting prunes layers 4–29 of 32; here the range scales with
  depth and is a parameter). As its code (`param_first`): |w·g| summed over every weight of a head group
  (q, k, v, o) or channel (gate, up, down). Its g is one gradient of the loss over all its examples at once;
  here the pass sums |w·g| over batches, which is the same with `batch_size` equal to `num_samples`.
- `wanda_sp`: Wanda-sp, the structured Wanda of An et al. (2024) (Wanda: Sun et al., 2024), as its code scores
  units: |W|·‖x‖ of the output projection's columns (o_proj / down_proj), averaged over rows, summed per group /
  channel; the same ratio in every layer. Its code feeds each layer the already pruned layers' outputs; here
  every method scores from one dense calibration pass.
- `flap`: FLAP (An et al., 2024), as its code computes it: the fluctuation metric per input column of
  o_proj / down_proj (input variance × squared weight-column norm; squared again for attention), standardized
  over each layer's attention columns and MLP channels, a head group's columns averaged; one global ranking
  by that statistic (adaptive structure, AL-AM), and the bias compensation.
- `shortgpt`: ShortGPT (Men et al., 2024): remove the whole layers of lowest Block Influence.
- `global_refit`: this workbench's global knapsack on the reconstruction-aware score (`scoring.refit`: the
  loss a unit costs once the kept units are re-fitted), re-fitted afterwards (its compensation).
- `depth_refit`: per-layer ratios rising with depth on a logarithmic curve, the shape of SlimGPT's incremental
  pruning ratio (Ling et al., 2024); units by the re-fit score within each layer, re-fitted afterwards.
- `taylor_counts`: today's Taylor allocation (the per-block unit counts of the global Taylor plan) with the
  units chosen by the re-fit score, re-fitted afterwards: which units, apart from how many where.
- `owl`: OWL (Yin et al., 2024), structured: each layer's ratio falls with its outlier ratio (the share of Wanda
  scores |w|·‖x‖ above m × the layer mean), within ±λ of the budget's share, mean equal to it; each layer's
  lowest-Wanda units (one best unit of each block kept by default).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from workbench.core.arch import BLOCKS
from workbench.core.registry import Registry
from workbench.data.text import REFIT_DAMPING
from workbench.plans.allocation import LayerwiseConfig, layerwise_plan, owl_plan, plan_from_counts, uniform_plan
from workbench.plans.normalize import ScoringConfig
from workbench.plans.plan import Plan, PlanProvenance, check_achieved
from workbench.plans.rescore import Rescorer
from workbench.plans.selection import SelectionConfig, select
from workbench.scoring.methods import IMPORTANCE_METHODS, Importance
from workbench.surgery.reconstruct import ReconstructConfig


@dataclass(frozen=True)
class Baseline:
    """One way to make a plan.

    Args:
        name: registry key.
        source: the paper or study it follows, in words.
        description: what it does, one line.
        layer_measures: per-layer importance measures it reads (keys of `layer_importance.LAYER_IMPORTANCE`).
        method: what chooses its units by default, as its plans' provenance names it (a key of
            `IMPORTANCE_METHODS`, or `block_influence` for whole layers); a baseline taking a `method` parameter
            has this as that parameter's default. Which pass a run needs (`uses_refit_scores`) is read from here.
        compensation: the closed-form correction applied after pruning (None: none).
        make: (rescorer, layer_scores, ratio, ratio_of, **params) -> Plan.
    """

    name: str
    source: str
    description: str
    layer_measures: tuple[str, ...]
    method: str
    compensation: ReconstructConfig | None
    make: Callable[..., Plan]


def _global(method: str):
    def make(r: Rescorer, layer_scores, ratio, ratio_of, attn_mlp=None, min_units_per_block=0):
        return r.plan(ScoringConfig(method=method), SelectionConfig(ratio=ratio, ratio_of=ratio_of, attn_mlp=attn_mlp,
                                                                    min_units_per_block=min_units_per_block))[1]
    return make


def _uniform(r: Rescorer, layer_scores, ratio, ratio_of, method="taylor", attn_mlp=(5, 5)):
    return uniform_plan(r.table(method), r.budget, ratio, ratio_of, attn_mlp=attn_mlp,
                        provenance=PlanProvenance("baseline", method=method, baseline="uniform"))


def _layerwise(r: Rescorer, layer_scores, ratio, ratio_of, **params):
    cfg = LayerwiseConfig(ratio=ratio, ratio_of=ratio_of, **params)
    plan = layerwise_plan(r.table(cfg.method), r.budget, _scores(layer_scores, cfg.measure), cfg)
    return plan.made_by(source="baseline", baseline="layerwise")


def _owl(r: Rescorer, layer_scores, ratio, ratio_of, method="wanda", lam=0.08, min_units_per_block=1):
    plan = owl_plan(r.table(method), r.budget, _scores(layer_scores, "outlier_ratio"), ratio, ratio_of, lam=lam,
                    min_units_per_block=min_units_per_block)
    return plan.made_by(source="baseline", baseline="owl")


def default_llm_pruner_range(n_layers: int) -> tuple[int, int]:
    """LLM-Pruner's Llama-7B range (layers 4 ..< 30 of 32), scaled to the depth: (first, end) pruned layers."""
    first, end = round(n_layers * 4 / 32), n_layers - round(n_layers * 2 / 32)
    return (first, end) if end > first else (0, n_layers)


def _llm_pruner(r: Rescorer, layer_scores, ratio, ratio_of, first: int | None = None, end: int | None = None):
    n = len(r.budget.widths)
    d_first, d_end = default_llm_pruner_range(n)
    first, end = d_first if first is None else first, d_end if end is None else end
    if not 0 <= first < end <= n:
        raise ValueError(f"first={first}, end={end}: need 0 <= first < end <= {n} (layers first..end-1 are pruned)")
    return uniform_plan(r.table("taylor"), r.budget, ratio, ratio_of, layers=list(range(first, end)),
                        provenance=PlanProvenance("baseline", method="taylor", baseline="llm_pruner",
                                                  params=dict(first=first, end=end)))


def _wanda_sp(r: Rescorer, layer_scores, ratio, ratio_of):
    return uniform_plan(r.table("wanda_sp"), r.budget, ratio, ratio_of,
                        provenance=PlanProvenance("baseline", method="wanda_sp", baseline="wanda_sp"))


def _flap(r: Rescorer, layer_scores, ratio, ratio_of):
    """FLAP as its code does it: one list of every attention group and MLP channel ranked by FLAP's statistic
    (already standardized per layer; not divided by cost), the lowest removed until the budget is met (its
    compression weights are the units' parameter counts: exact costs here)."""
    table = r.table("flap")
    scored = table.assign(final_score=table["importance"])
    plan = select(scored, r.budget, SelectionConfig(ratio=ratio, ratio_of=ratio_of), score_column="final_score")
    return plan.made_by(source="baseline", baseline="flap", method="flap")


def depth_ratios(layer_params: np.ndarray, target: int, spread: float = 0.5) -> np.ndarray:
    """Per-layer ratios (share of each layer's attention + MLP parameters) rising with depth on a logarithmic
    curve, the shape of SlimGPT's incremental pruning ratio (Ling et al., 2024): r_i = r̄·(1 − spread) +
    c·ln(1 + i)/ln(n), with c such that the removed parameters sum to `target` (r̄ = target / all of them).

    >>> depth_ratios(np.full(4, 100.0), 100, 0.5).round(3).tolist()
    [0.125, 0.234, 0.298, 0.343]
    """
    p = np.asarray(layer_params, dtype=np.float64)
    if isinstance(spread, bool) or not 0 <= spread <= 1:
        raise ValueError(f"spread={spread!r} must be in [0, 1] (0: the same ratio in every layer)")
    n = len(p)
    if n == 0 or p.sum() <= 0:
        raise ValueError("depth_ratios needs at least one layer with parameters")
    mean = target / p.sum()
    shape = np.log1p(np.arange(n)) / np.log(n) if n > 1 else np.zeros(1)
    rise = (spread * mean * p.sum() / (shape * p).sum()) if (shape * p).sum() > 0 else 0.0
    ratios = mean * (1 - spread) + rise * shape
    if ratios.max() >= 1:
        raise ValueError(f"spread={spread} asks the last layer for {ratios.max():.3f} of its parameters at this budget; "
                         "lower the spread or the ratio")
    return ratios


def _depth(r: Rescorer, layer_scores, ratio, ratio_of, method="refit", spread=0.5):
    target, denominator = r.budget.target(ratio, ratio_of)
    layer_params = r.budget.layer_params()
    ratios = depth_ratios(layer_params, target, spread)
    plan = select(r.table(method), r.budget, SelectionConfig(layer_ratios=tuple(float(x) for x in ratios)))
    plan.target_params, plan.denominator = target, denominator
    plan.provenance = PlanProvenance("baseline", method=method, baseline="depth_refit",
                                     selection=dict(ratio=ratio, ratio_of=ratio_of, layer_ratios=ratios.round(6).tolist()),
                                     params=dict(spread=spread))
    return check_achieved(plan, "depth_refit", max(max(c) for c in r.budget.costs.values()))


def _taylor_counts(r: Rescorer, layer_scores, ratio, ratio_of, method="refit", allocation="taylor"):
    ref = r.plan(ScoringConfig(method=allocation), SelectionConfig(ratio=ratio, ratio_of=ratio_of))[1]
    counts = np.array([[len(ref.removed[b][i]) for b in BLOCKS] for i in range(len(r.budget.widths))])
    return plan_from_counts(r.table(method), r.budget, counts, target=ref.target_params, denominator=ref.denominator,
                            provenance=PlanProvenance("baseline", method=method, baseline="taylor_counts",
                                                      selection=dict(ratio=ratio, ratio_of=ratio_of),
                                                      params=dict(allocation=allocation)))


def shortgpt_plan(budget, block_influence, ratio: float, ratio_of: str = "total") -> Plan:
    """Remove the n layers of lowest Block Influence, n the whole-layer count closest to the budget (≥ 1 layer
    kept); the achieved ratio is `plan.achieved_ratio`."""
    bi = np.asarray(block_influence, dtype=np.float64)
    n_layers = len(budget.widths)
    if len(bi) != n_layers or not np.isfinite(bi).all():
        raise ValueError(f"block influence must be {n_layers} finite values (one per layer), got {len(bi)}")
    target, denominator = budget.target(ratio, ratio_of)
    order = np.argsort(bi, kind="stable")
    per_layer = budget.layer_params()
    cum = np.r_[0, np.cumsum(per_layer[order])][:n_layers]  # removing 0 .. n_layers - 1 layers
    n = int(np.argmin(np.abs(cum - target)))
    gone = sorted(order[:n].tolist())
    removed = {b: {i: list(range(budget.widths[i][k])) for i in gone} for k, b in enumerate(BLOCKS)}
    plan = Plan.from_units(budget.widths, removed, target_params=target, selected_params=int(round(cum[n])),
                           denominator=denominator,
                           provenance=PlanProvenance("baseline", method="block_influence", baseline="shortgpt",
                                                     selection=dict(ratio=ratio, ratio_of=ratio_of),
                                                     params=dict(layers_removed=gone)))
    return check_achieved(plan, "ShortGPT", int(per_layer.max()),
                          f"whole layers only: the nearest layer count to {target:,} parameters is {n} "
                          f"(the smallest layer owns {int(per_layer.min()):,})")


def _shortgpt(r: Rescorer, layer_scores, ratio, ratio_of):
    return shortgpt_plan(r.budget, _scores(layer_scores, "activation"), ratio, ratio_of)


def _scores(layer_scores: dict, measure: str) -> np.ndarray:
    if measure not in layer_scores:
        raise ValueError(f"this plan needs the per-layer importance {measure!r}; give layer_scores[{measure!r}] "
                         f"(workbench.scoring.layer_importance.layer_importance(model, samples, {measure!r}))")
    return np.asarray(layer_scores[measure], dtype=np.float64)


BASELINES: Registry[Baseline] = Registry.of("baseline", [
    Baseline("global_taylor", "this workbench", "global fractional knapsack on first-order Taylor", (), "taylor", None,
             _global("taylor")),
    Baseline("global_taylor2", "this workbench", "global fractional knapsack on second-order Taylor", (), "taylor2", None,
             _global("taylor2")),
    Baseline("uniform", "the GAQ-Aware-Prune study", "every layer keeps the same widths (x:y split, Taylor)", (),
             "taylor", None, _uniform),
    Baseline("layerwise", "the GAQ-Aware-Prune study (v1.0)", "per-layer ratios from layer importance",
             ("removal", "activation"), LayerwiseConfig.method, None, _layerwise),
    Baseline("llm_pruner", "LLM-Pruner (Ma et al., 2023)", "Taylor, same ratio in every layer of a middle range",
             (), "taylor", None, _llm_pruner),
    Baseline("wanda_sp", "Wanda-sp (An et al., 2024; Wanda: Sun et al., 2024)",
             "structured Wanda |W|·‖x‖, same ratio in every layer", (), "wanda_sp", None, _wanda_sp),
    Baseline("flap", "FLAP (An et al., 2024)", "fluctuation metric, standardized, global, bias compensation", (),
             "flap", ReconstructConfig(weights=False, bias=True), _flap),
    Baseline("shortgpt", "ShortGPT (Men et al., 2024)", "remove the layers of lowest Block Influence",
             ("activation",), "block_influence", None, _shortgpt),
    Baseline("global_refit", "this workbench", "global fractional knapsack on the re-fit score, re-fitted", (),
             "refit", ReconstructConfig(), _global("refit")),
    Baseline("depth_refit", "SlimGPT's schedule (Ling et al., 2024)",
             "ratios rising with depth (logarithmic), re-fit score within layers, re-fitted", (), "refit",
             ReconstructConfig(), _depth),
    Baseline("taylor_counts", "this workbench", "Taylor's per-block unit counts, units by the re-fit score, re-fitted",
             (), "refit", ReconstructConfig(), _taylor_counts),
    Baseline("owl", "OWL (Yin et al., 2024)", "per-layer ratios from outlier ratios, Wanda units within layers",
             ("outlier_ratio",), "wanda", None, _owl),
])


def uses_refit_scores(name: str, params: dict | None = None) -> bool:
    """Whether baseline `name` with these params makes its plan from the re-fit scores (`scoring.refit`): its
    `method` parameter when given, else its registered `method`."""
    method = (params or {}).get("method", BASELINES[name].method)
    return isinstance(method, str) and method in IMPORTANCE_METHODS and IMPORTANCE_METHODS[method].needs == "refit"


def baseline_compensation(name: str, importance: Importance, params: dict | None = None) -> ReconstructConfig | None:
    """The closed-form correction that follows baseline `name`: its own; after a plan made from the re-fit scores,
    the re-fit those scores assumed (the ridge of the pass: `CalibrationConfig.refit_damping` / `refit_toward`)."""
    own = BASELINES[name].compensation
    if own is None or not uses_refit_scores(name, params):
        return own
    ridge = importance.acc.refit_ridge or {}
    return replace(own, damping=ridge.get("damping", REFIT_DAMPING), toward=ridge.get("toward", "zero"))


# The baselines whose plans come from the re-fit scores by default (their pass needs refit=True).
REFIT_BASELINES = tuple(name for name in BASELINES if uses_refit_scores(name))


def make_plan(name: str, rescorer: Rescorer, ratio: float, ratio_of: str = "total", *,
              layer_scores: dict | None = None, **params) -> Plan:
    """The plan of one registered baseline at this budget (params: the baseline's own options).

    >>> from workbench import Budget, Rescorer, calibration_samples, CalibrationConfig, importance_cached, load_model
    >>> model, tok = load_model("tiny")
    >>> imp = importance_cached(model, calibration_samples(tok, CalibrationConfig(num_samples=2, seq_len=16)),
    ...                         cache=False, progress=False)
    >>> plan = make_plan("wanda_sp", Rescorer(imp, Budget.of(model)), 0.2)
    >>> plan.provenance.label, round(plan.achieved_ratio, 2)
    ('wanda_sp', 0.2)
    """
    plan = BASELINES[name].make(rescorer, layer_scores or {}, ratio, ratio_of, **params)
    if plan.provenance.baseline != name:  # a baseline made by another's maker (e.g. the global ones) is named
        plan.made_by(source="baseline", baseline=name)
    return plan
