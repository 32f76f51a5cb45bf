"""The Attention:MLP distribution search of the GAQ-Aware-Prune study: which x:y (x + y = 10) prunes best.

Two phases: coarse (step 1 from a start such as 2:8, both directions, a direction stops after `patience`
consecutive PPL rises or at 0 / 10), then fine (step 0.1 within ±0.9 of the coarse best). Each point prunes
a copy of the model with the plan of that x:y and measures PPL on held-out calibration windows (never the
evaluation part). Every point is cached (`workbench.core.cache`, kind `xy_point`) by the model, the held-out
data and the plan's settings, so an interrupted search resumes where it stopped.
"""
from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from workbench.core.cache import cached, make_key
from workbench.core.models import check_token_ids
from workbench.evaluation.evaluate import plan_perplexity
from workbench.plans.plan import Plan

TOTAL = 10.0
XY_POINT_FORMAT = 2  # 2: held-out PPL from the one loss loop (float64 sums); points of format 1 are recomputed


def held_out_ppl(model: nn.Module, plan: Plan, held_out: torch.Tensor, batch_size: int = 4) -> float:
    """PPL of `model` pruned by `plan` (on a copy) over held-out token windows (`evaluation.plan_perplexity`)."""
    return plan_perplexity(model, plan, held_out, batch_size)


def xy_search(model: nn.Module, make_plan: Callable[[tuple[float, float]], Plan], held_out: torch.Tensor, *,
              settings: dict, start: float = 2.0, patience: int = 3, fine: bool = True, batch_size: int = 4,
              cache: bool | str | os.PathLike = True, progress: bool = True) -> pd.DataFrame:
    """Search x in [0, 10] (y = 10 − x); returns one row per evaluated point (x, y, ppl, phase, error), sorted by x.

    `make_plan((x, y))` makes the plan of a split; `settings` must name everything else it depends on (method,
    ratio, strategy ...): it is part of every point's cache key. An infeasible split (its plan raises
    ValueError) counts as a rise and is reported in the `error` column.
    """
    if isinstance(start, bool) or not 0 <= start <= TOTAL:
        raise ValueError(f"start={start!r} must be in [0, {TOTAL:g}] (x of x:y with x + y = {TOTAL:g})")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ValueError(f"patience={patience!r} must be a positive integer")
    check_token_ids(held_out, model, "held-out token ids")
    rows: dict[float, dict] = {}
    bar = tqdm(desc="x:y search", disable=not progress, leave=False)

    def point(x: float, phase: str) -> float:
        x = round(float(x), 1)
        if x not in rows:
            key = make_key(model=model, data=held_out, settings=dict(settings, x=x, batch_size=batch_size))

            def compute() -> dict:
                try:
                    plan = make_plan((x, TOTAL - x))
                except ValueError as e:
                    return dict(ppl=float("inf"), error=str(e))
                return dict(ppl=held_out_ppl(model, plan, held_out, batch_size), error="")

            point = cached("xy_point", key, compute, cache=cache, version=XY_POINT_FORMAT)
            rows[x] = dict(x=x, y=round(TOTAL - x, 1), phase=phase, **point)
            bar.update(1)
            bar.set_postfix(x=x, ppl=rows[x]["ppl"])
        return rows[x]["ppl"]

    point(start, "coarse")
    for step in (1.0, -1.0):
        prev, rises, x = point(start, "coarse"), 0, start + step
        while 0 <= x <= TOTAL and rises < patience:
            now = point(x, "coarse")
            rises = rises + 1 if now > prev else 0
            prev, x = now, x + step
    best = min(rows.values(), key=lambda r: r["ppl"])["x"]
    if fine:
        for x in np.arange(max(0.0, best - 0.9), min(TOTAL, best + 0.9) + 1e-9, 0.1):
            point(x, "fine")
    bar.close()
    return pd.DataFrame(sorted(rows.values(), key=lambda r: r["x"])).reset_index(drop=True)


def best_split(result: pd.DataFrame) -> tuple[float, float]:
    """The (x, y) of lowest PPL in a search result."""
    row = result.loc[result["ppl"].idxmin()]
    return float(row["x"]), float(row["y"])
