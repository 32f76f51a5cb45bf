"""Evaluation: perplexity over non-overlapping windows, recorded with everything that defines it."""
from __future__ import annotations

import copy
import math
import platform
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from workbench.core.cache import model_fingerprint
from workbench.core.loss import summed_nll, token_batches
from workbench.core.models import check_token_ids, model_summary
from workbench.data.text import OFFLINE_SOURCE, evaluation_windows
from workbench.evaluation.efficiency import measure as measure_efficiency
from workbench.evaluation.zeroshot import zero_shot as run_zero_shot
from workbench.plans.plan import Plan
from workbench.surgery.prune import apply_plan, check_plan


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity and everything that defines it: model, source, split, window length and count, tokens."""

    ppl: float
    mean_nll: float
    model: str
    source: str
    split: str
    seq_len: int
    windows: int
    tokens: int  # predicted tokens (seq_len - 1 per window)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def window_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 8, progress: bool = True) -> torch.Tensor:
    """Summed next-token NLL (float64) and count over a stack of windows, as a 2-vector."""
    check_token_ids(windows, model, "evaluation token ids")
    total, count = summed_nll(model, token_batches(windows, batch_size), progress=progress, desc="perplexity",
                              total=-(-len(windows) // batch_size))
    return torch.tensor([total, float(count)], dtype=torch.float64)


def _ppl(mean_nll: float) -> float:
    return math.exp(mean_nll) if mean_nll < 700 else math.inf


def windows_perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 8, progress: bool = False) -> float:
    """exp(mean next-token NLL) of `model` over given token windows (held-out calibration windows, say)."""
    total, count = window_nll(model, windows, batch_size, progress).tolist()
    return _ppl(total / count)


def plan_perplexity(model: nn.Module, plan: Plan, windows: torch.Tensor, batch_size: int = 8) -> float:
    """`windows_perplexity` of a pruned copy of `model` under `plan` (`model` is left unchanged)."""
    return windows_perplexity(_pruned_copy(model, plan), windows, batch_size)


def _pruned_copy(model: nn.Module, plan: Plan) -> nn.Module:
    check_plan(model, plan)  # before the copy: a model pruned since the plan was made is refused at once
    pruned = copy.deepcopy(model)
    apply_plan(pruned, plan)
    return pruned


def perplexity(
    model: nn.Module,
    tokenizer,
    source: str = OFFLINE_SOURCE,
    *,
    seq_len: int = 128,
    max_windows: int | None = 50,
    batch_size: int = 8,
    progress: bool = True,
    hub_root=None,
) -> PerplexityResult:
    """exp(mean next-token NLL) over the evaluation part of `source` in windows of `seq_len`."""
    windows = evaluation_windows(tokenizer, source, seq_len, max_windows, hub_root=hub_root)
    total, count = window_nll(model, windows, batch_size, progress).tolist()
    mean = total / count
    return PerplexityResult(
        ppl=_ppl(mean),
        mean_nll=mean,
        model=str(getattr(model.config, "name_or_path", "")),
        source=source,
        split="evaluation",
        seq_len=seq_len,
        windows=len(windows),
        tokens=int(count),
    )


def perplexity_after(model: nn.Module, tokenizer, plan, source: str = OFFLINE_SOURCE, **kwargs) -> PerplexityResult:
    """Perplexity of a pruned copy of `model` under `plan`; `model` itself is left unchanged.

    Used to compare plans side by side (one copy at a time, so peak memory is twice the model).
    """
    return perplexity(_pruned_copy(model, plan), tokenizer, source, **kwargs)


RESULT_LIBRARIES = ("torch", "transformers", "peft", "datasets", "lm-eval", "numpy", "pandas")


def library_versions() -> dict[str, str | None]:

    out: dict[str, str | None] = {"python": platform.python_version()}
    for lib in RESULT_LIBRARIES:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            out[lib] = None
    return out


def model_entry(model: nn.Module, *, perplexity: PerplexityResult | None = None, zero_shot=None,
                efficiency: dict | None = None, checkpoint: str | None = None) -> dict:
    """One model's results for `evaluation_results.json` (what is not measured is None)."""
    return dict(model_hash=model_fingerprint(model), summary=model_summary(model), checkpoint=checkpoint,
                perplexity=perplexity.to_dict() if perplexity is not None else None,
                zero_shot=zero_shot.to_dict() if zero_shot is not None else None, efficiency=efficiency)


def results_record(entries: dict[str, dict]) -> dict:
    """The whole `evaluation/evaluation_results.json`: every model's entry plus library versions."""
    if not entries:
        raise ValueError("entries is empty: pass {name: model_entry(...)}")
    return dict(models=entries, versions=library_versions(), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def results_table(record: dict):
    """A DataFrame: rows = measures (PPL, mean and per-task accuracy, parameters, efficiency), columns = models."""
    cols = {}
    for name, e in record["models"].items():
        col = {"parameters": e["summary"]["parameters"]}
        if e.get("perplexity"):
            col["ppl"] = e["perplexity"]["ppl"]
        zs = e.get("zero_shot")
        if zs:
            col["mean_acc"], col["mean_acc_norm"] = zs["mean_acc"], zs["mean_acc_norm"]
            for task, r in zs["tasks"].items():
                col[f"acc/{task}"], col[f"acc_norm/{task}"] = r["acc"], r["acc_norm"]
        for k in ("prefill_ms", "decode_ms_per_token", "decode_tokens_per_s", "kv_cache_bytes_per_token",
                  "weight_bytes", "checkpoint_bytes", "peak_memory_bytes"):
            if e.get("efficiency") and e["efficiency"].get(k) is not None:
                col[k] = e["efficiency"][k]
        cols[name] = col
    return pd.DataFrame(cols)


def evaluate_models(models: dict[str, nn.Module], tokenizer, *, checkpoints: dict[str, str | None] | None = None,
                    source: str = OFFLINE_SOURCE, seq_len: int = 128, max_windows: int | None = 50,
                    zero_shot_cfg=None, efficiency_cfg=None) -> dict:
    """Perplexity, zero-shot accuracy and efficiency of each model under one protocol: `results_record`'s dict.

    `zero_shot_cfg` / `efficiency_cfg` of None skip that measurement.
    """
    checkpoints = checkpoints or {}
    entries = {}
    for name, m in models.items():
        ckpt = checkpoints.get(name)
        entries[name] = model_entry(
            m, checkpoint=str(ckpt) if ckpt else None,
            perplexity=perplexity(m, tokenizer, source, seq_len=seq_len, max_windows=max_windows),
            zero_shot=run_zero_shot(m, tokenizer, zero_shot_cfg) if zero_shot_cfg is not None else None,
            efficiency=measure_efficiency(m, efficiency_cfg, checkpoint_dir=ckpt) if efficiency_cfg is not None else None)
    return results_record(entries)


def recovery_table(dense: PerplexityResult, pruned: PerplexityResult, recovered: PerplexityResult,
                   label: str = "recovered"):
    """PPL of dense, pruned and recovered models, and the share of the pruning loss (mean NLL) recovered."""
    table = pd.DataFrame({"perplexity": [dense.ppl, pruned.ppl, recovered.ppl]}, index=["dense", "pruned", label])
    gap = pruned.mean_nll - dense.mean_nll  # 0 when nothing was pruned (LoRA on the dense model)
    table["recovered share of the loss"] = [None, None, (pruned.mean_nll - recovered.mean_nll) / gap if gap else None]
    return table


def plans_record(dense: PerplexityResult | None, results: Mapping[str, float | PerplexityResult] | pd.Series,
                 plans: Mapping[str, Plan], **settings: Any) -> dict:
    """The one shape of a notebook's `evaluation/perplexity.json`: the dense perplexity, then per plan (by the
    label it was shown under) its perplexity, how it was made (provenance and its label) and what it removes;
    `settings`: what the notebook was asked (ratio, method, ...).

    >>> plan = Plan.from_units([(2, 8)], {"mlp": {0: [0]}}, selected_params=10, denominator=100)
    >>> plans_record(None, {"mine": 12.5}, {"mine": plan}, ratio=0.1)["plans"]["mine"]["ppl"]
    12.5
    """
    results = dict(results.items())  # a Series of perplexities by label, too
    missing = sorted(set(results) - set(plans))
    if missing:
        raise ValueError(f"plans_record: results for {missing} without their plans; give every plan it scores")
    out: dict[str, Any] = dict(dense=dense.to_dict() if dense is not None else None, settings=settings, plans={})
    for label, result in results.items():
        plan = plans[label]
        entry = result.to_dict() if isinstance(result, PerplexityResult) else dict(ppl=float(result))
        out["plans"][label] = dict(entry, label=plan.provenance.label, provenance=plan.provenance.to_dict(),
                                   asked_ratio=plan.asked_ratio, achieved_ratio=plan.achieved_ratio,
                                   selected_params=plan.selected_params, denominator=plan.denominator,
                                   emptied_blocks=plan.emptied_blocks(), removed_layers=plan.removed_layers())
    return out


def perplexity_of_plans(model: nn.Module, tokenizer, plans: dict, source: str = OFFLINE_SOURCE,
                        **kwargs) -> pd.Series:
    """Perplexity after each plan (each on a fresh copy of `model`, which stays unchanged), by plan name."""
    kwargs.setdefault("progress", False)
    return pd.Series({name: perplexity_after(model, tokenizer, plan, source, **kwargs).ppl
                      for name, plan in tqdm(plans.items(), desc="perplexity per plan")}, name="ppl")


EFFICIENCY_ROWS = ("parameters", "prefill_ms", "decode_ms_per_token", "decode_tokens_per_s", "kv_cache_bytes_per_token")


def accuracy_table(table: pd.DataFrame, metric: str = "acc") -> pd.DataFrame:
    """From `results_table`: one row per zero-shot task (`acc` or `acc_norm`), one column per model."""
    rows = [r for r in table.index if r.startswith(f"{metric}/")]
    return table.loc[rows].rename(index=lambda r: r.split("/", 1)[1])


def efficiency_ratios(table: pd.DataFrame, reference: str = "dense") -> pd.DataFrame:
    """From `results_table`: the efficiency rows, plus each model's value divided by the reference model's."""
    eff = table.loc[[r for r in EFFICIENCY_ROWS if r in table.index]]
    return eff.assign(**{f"{c} / {reference}": eff[c] / eff[reference] for c in eff.columns if c != reference})
