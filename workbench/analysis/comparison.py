"""One table of methods at the same budget: every plan pruned on a fresh copy, with its own compensation,
optionally also with closed-form reconstruction, PPL on the evaluation part, achieved ratio and per-kind rates."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from workbench.baselines.registry import BASELINES, baseline_compensation, make_plan
from workbench.core.models import parameter_count
from workbench.data.text import OFFLINE_SOURCE
from workbench.evaluation.evaluate import perplexity
from workbench.plans.allocation import kind_rates
from workbench.plans.plan import Plan
from workbench.plans.rescore import Rescorer
from workbench.plans.selection import Budget
from workbench.surgery.reconstruct import ReconstructConfig, prune_and_reconstruct


@dataclass(frozen=True)
class Refused:
    """A method that made no plan at this budget, and why (its row in the table says so)."""

    reason: str


def baseline_plans(rescorer: Rescorer, ratio: float, ratio_of: str = "total", *, layer_scores: dict | None = None,
                   variants: dict[str, tuple[str, dict]] | None = None
                   ) -> dict[str, tuple[Plan | Refused, ReconstructConfig | None]]:
    """Plans by label: every registered baseline with its defaults, or `variants` {label: (baseline, params)}.
    A method that refuses this budget (e.g. ShortGPT below half a layer) is kept as `Refused` with its reason."""
    variants = variants or {name: (name, {}) for name in BASELINES}
    out: dict[str, tuple[Plan | Refused, ReconstructConfig | None]] = {}
    for label, (name, params) in variants.items():
        try:
            plan: Plan | Refused = make_plan(name, rescorer, ratio, ratio_of, layer_scores=layer_scores, **params)
        except ValueError as e:
            if name not in BASELINES:
                raise
            plan = Refused(str(e))
        out[label] = (plan, baseline_compensation(name, rescorer.importance, params))
    return out


def study_variants(best_xy: tuple[float, float] | None = None) -> dict[str, tuple[str, dict]]:
    """The comparison the GAQ-Aware-Prune study asks for: {label: (baseline, params)}, the x:y search's best
    split included when given, and the plans of the re-fit score (refused, saying why, after a pass without
    refit=True)."""
    variants = {
        "global_taylor": ("global_taylor", {}),
        "global_taylor2": ("global_taylor2", {}),
        "uniform 5:5": ("uniform", dict(attn_mlp=(5, 5))),
        "layerwise uniform 2:8": ("layerwise", dict(strategy="uniform", attn_mlp=(2, 8))),
        "layerwise inverse 2:8": ("layerwise", dict(strategy="inverse", attn_mlp=(2, 8))),
        "layerwise inverse 2:8 + freeze 3": ("layerwise", dict(strategy="inverse", attn_mlp=(2, 8), freeze_top_n=3)),
        "llm_pruner": ("llm_pruner", {}),
        "wanda_sp": ("wanda_sp", {}),
        "flap": ("flap", {}),
        "shortgpt": ("shortgpt", {}),
        "owl": ("owl", {}),
        "global_refit": ("global_refit", {}),
        "depth_refit": ("depth_refit", {}),
        "taylor_counts": ("taylor_counts", {}),
    }
    if best_xy is not None:
        variants[f"global_taylor {best_xy[0]:g}:{best_xy[1]:g} (x:y search)"] = ("global_taylor", dict(attn_mlp=best_xy))
    return variants


def compare_plans(model: nn.Module, tokenizer, plans: dict[str, tuple[Plan, ReconstructConfig | None]],
                  samples: torch.Tensor, *, reconstruction: ReconstructConfig | None = None,
                  source: str = OFFLINE_SOURCE, seq_len: int = 128, max_windows: int | None = 50,
                  extra_sources: tuple[str, ...] = (), progress: bool = True) -> pd.DataFrame:
    """One row per plan (and the dense model): PPL (with the plan's own compensation), PPL after closed-form
    reconstruction instead (when `reconstruction` is given), parameters, achieved ratio, attention / MLP rates;
    a `Refused` method gets a row with its reason in `refused` and no numbers. Each of `extra_sources` (e.g.
    "jargon", out of the calibration domain) adds `ppl_<source>` (and `ppl_reconstructed_<source>`), measured
    on the same models with the same window count and length.

    `model` is left unchanged; `samples` (calibration token ids) feed compensation and reconstruction. A plan whose
    own compensation is the reconstruction asked (the re-fit score's plans) is one model: measured once, both
    column sets hold it.
    """
    extra_sources = tuple(s for s in extra_sources if s != source)

    def ppl(m, suffix=""):
        out = {f"ppl{suffix}": perplexity(m, tokenizer, source, seq_len=seq_len, max_windows=max_windows,
                                          progress=False).ppl}
        for extra in extra_sources:
            out[f"ppl{suffix}_{extra}"] = perplexity(m, tokenizer, extra, seq_len=seq_len, max_windows=max_windows,
                                                     progress=False).ppl
        return out

    budget = Budget.of(model)
    rows = [dict(method="dense", **ppl(model), params=parameter_count(model), achieved_ratio=0.0)]
    for label, (plan, compensation) in tqdm(plans.items(), desc="methods", disable=not progress, leave=False):
        if isinstance(plan, Refused):
            rows.append(dict(method=label, refused=plan.reason))
            continue
        rates = kind_rates(plan, budget)
        pruned = copy.deepcopy(model)
        prune_and_reconstruct(pruned, plan, samples, compensation, progress=False)
        row = dict(method=label, **ppl(pruned), params=parameter_count(pruned),
                   achieved_ratio=plan.achieved_ratio, attn_rate=rates["attn_rate"],
                   mlp_rate=rates["mlp_rate"], removed_layers=len(plan.removed_layers()),
                   emptied_blocks=len(plan.emptied_blocks()), compensation=compensation is not None)
        del pruned
        if reconstruction is not None and compensation == reconstruction:  # the same model: measured once
            row.update({f"ppl_reconstructed{k[3:]}": v for k, v in row.items() if k.startswith("ppl")})
        elif reconstruction is not None:
            rebuilt = copy.deepcopy(model)
            prune_and_reconstruct(rebuilt, plan, samples, reconstruction, progress=False)
            row.update(ppl(rebuilt, "_reconstructed"))
            del rebuilt
        rows.append(row)
    table = pd.DataFrame(rows).set_index("method")
    table["refused"] = table["refused"].fillna("") if "refused" in table else ""
    return table
