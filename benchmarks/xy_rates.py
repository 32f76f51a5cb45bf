"""Per-kind pruning rates of the Attention:MLP distribution x:y (the GAQ-Aware-Prune study's table) on the
default model: for each split, the share of attention and of MLP parameters removed by the global knapsack with
that split and by uniform plans (same widths in every layer), at each ratio. No model is pruned.

    python benchmarks/xy_rates.py [--model default|tiny|<path>] [--ratios 0.2 0.25] [--splits 5:5 2:8 0:10 10:0]
"""
from __future__ import annotations

import argparse

import pandas as pd
from _models import add_model_args, bench_model

from workbench.data.text import CalibrationConfig
from workbench.plans.allocation import kind_rates, uniform_plan
from workbench.plans.normalize import ScoringConfig
from workbench.plans.rescore import Rescorer
from workbench.plans.selection import Budget, SelectionConfig
from workbench.runs.pipeline import calibrate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.25])
    ap.add_argument("--splits", nargs="+", default=["5:5", "2:8", "0:10", "10:0"])
    args = ap.parse_args()
    model, tok = bench_model(args)
    _, imp = calibrate(model, tok, CalibrationConfig(num_samples=64, seq_len=128), progress=False)
    budget = Budget.of(model)
    rescorer = Rescorer(imp, budget)
    rows = []
    for ratio in args.ratios:
        for split in args.splits:
            xy = tuple(float(v) for v in split.split(":"))
            for kind in ("global", "uniform"):
                try:
                    plan = (rescorer.plan(ScoringConfig(), SelectionConfig(ratio=ratio, attn_mlp=xy))[1]
                            if kind == "global" else uniform_plan(rescorer.table("taylor"), budget, ratio, attn_mlp=xy))
                    r = kind_rates(plan, budget)
                    rows.append(dict(ratio=ratio, split=split, plan=kind, attn_rate=r["attn_rate"],
                                     mlp_rate=r["mlp_rate"], attn_share=r["attn_share"], note=""))
                except ValueError as e:
                    rows.append(dict(ratio=ratio, split=split, plan=kind, note=str(e)[:90]))
    print(pd.DataFrame(rows).round(4).to_markdown(index=False))


if __name__ == "__main__":
    main()
