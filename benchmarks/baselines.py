"""The README's comparison table: every method at the same budget on the default model, no fine-tuning.

    python benchmarks/baselines.py [--model default|tiny|<path>] [--ratios 0.2 0.25] [--reconstruct]
                                   [--extra-sources jargon] [--methods flap global_taylor ...]

Calibration 64 × 128 (pydoc calibration part), layer-removal loss on 16 of those samples, the x:y search on
16 held-out calibration windows, PPL on the evaluation part (50 × 128), and on each of `--extra-sources`
(e.g. `jargon`, out of the calibration domain) with the same windows. The same calls as notebook 07.
"""
from __future__ import annotations

import argparse

import pandas as pd
from _models import add_eval_args, add_model_args, bench_model

from workbench.analysis.comparison import baseline_plans, compare_plans, study_variants
from workbench.analysis.distribution import best_split, xy_search
from workbench.data.text import CalibrationConfig, held_out_samples
from workbench.plans.normalize import ScoringConfig
from workbench.plans.rescore import Rescorer
from workbench.plans.selection import Budget, SelectionConfig
from workbench.runs.pipeline import calibrate
from workbench.scoring.layer_importance import LAYER_IMPORTANCE, layer_importance
from workbench.surgery.reconstruct import ReconstructConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.25])
    ap.add_argument("--reconstruct", action="store_true", help="add PPL after closed-form reconstruction")
    ap.add_argument("--no-search", action="store_true", help="skip the x:y search")
    add_eval_args(ap)
    ap.add_argument("--methods", nargs="*", default=[], help="only these rows (default: every method)")
    args = ap.parse_args()

    model, tok = bench_model(args)
    calibration = CalibrationConfig(num_samples=64, seq_len=128, refit=True)
    samples, imp = calibrate(model, tok, calibration, progress=False)
    rescorer = Rescorer(imp, Budget.of(model))
    scores = {m: layer_importance(model, samples[:16], m, progress=False).to_numpy() for m in LAYER_IMPORTANCE}
    print("layer importance (removal):", " ".join(f"{v:.3f}" for v in scores["removal"]))
    print("layer importance (Block Influence):", " ".join(f"{v:.3f}" for v in scores["activation"]))
    held_out = held_out_samples(tok, calibration, 16)
    pd.set_option("display.width", 200)
    for ratio in args.ratios:
        best = None
        if not args.no_search:
            search = xy_search(model, lambda s: rescorer.plan(ScoringConfig(), SelectionConfig(ratio=ratio, attn_mlp=s))[1],
                               held_out, settings=dict(method="taylor", ratio=ratio), progress=False)
            best = best_split(search)
            print(f"\nx:y search at {ratio:.0%}:", " ".join(f"{r.x:g}→{r.ppl:.2f}" for r in search.itertuples()))
        plans = baseline_plans(rescorer, ratio, layer_scores=scores, variants=study_variants(best))
        unknown = sorted(set(args.methods) - set(plans))
        if unknown:
            raise SystemExit(f"--methods {unknown}: not among {sorted(plans)}")
        plans = {k: v for k, v in plans.items() if not args.methods or k in args.methods}
        table = compare_plans(model, tok, plans, samples, progress=False, extra_sources=tuple(args.extra_sources),
                              reconstruction=ReconstructConfig() if args.reconstruct else None)
        print(f"\n{ratio:.0%} of all parameters")
        print(table.round(4).to_markdown())


if __name__ == "__main__":
    main()
