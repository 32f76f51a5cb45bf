"""The reconstruction-aware score (`refit`) against Taylor, in and out of the calibration domain, and its cost.

    python benchmarks/refit.py [--model default] [--ratios 0.2 0.25] [--calibrations pydoc pydoc+jargon]
                               [--methods global_taylor global_refit depth_refit taylor_counts] [--timing]
                               [--damping 1e-4] [--toward zero|dense] [--seeds 0 1 2 3] [--samples 64] [--seq-len 128]
                               [--cv-folds 4]

For each calibration (`--samples` × `--seq-len` windows, 64 × 128 by default) and ratio of all parameters: PPL on
the pydoc evaluation part and on `jargon` (50 × 128 windows each), for global Taylor without and with the
closed-form re-fit (one_shot, λ = `--damping`, its ridge pulling toward `--toward`) and for the plans made from the re-fit
score (each re-fitted with the ridge its scores assumed). `--cv-folds K` re-fits every plan with each block's ridge
chosen by K-fold cross-validation instead (`ReconstructConfig.cv_folds`; the scores keep `--damping` / `--toward`):
the "reconstructed" columns, while the re-fit score's plans keep their own re-fit in "ppl". `--timing` first times
the plain importance pass against the pass with refit=True on the same windows, interleaved A B A B (uncached), and
prints the medians and the memory the layer-by-layer replay holds. `--seeds` draws the calibration windows once per
seed (`CalibrationConfig.seed`) and, with more than one, ends with each method's mean, min and max over the draws,
and the mean ratio to the dense model. The same calls as notebook 07.
"""
from __future__ import annotations

import argparse
import statistics
import time

import pandas as pd
from _models import add_calibration_args, add_eval_args, add_model_args, bench_model

from workbench.analysis.comparison import baseline_plans, compare_plans
from workbench.core.arch import geometry
from workbench.data.text import CalibrationConfig, calibration_samples
from workbench.plans.rescore import Rescorer
from workbench.plans.selection import Budget
from workbench.runs.pipeline import calibrate
from workbench.scoring.importance import compute_importance
from workbench.surgery.reconstruct import ReconstructConfig


def timing(model, tok, repeats: int, num_samples: int = 64, seq_len: int = 128) -> None:
    samples = calibration_samples(tok, CalibrationConfig(num_samples=num_samples, seq_len=seq_len))
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeats):
        for refit in (False, True):  # A B A B: a busy machine slows both alike
            t0 = time.perf_counter()
            compute_importance(model, samples, batch_size=4, refit=refit, progress=False)
            times[refit].append(time.perf_counter() - t0)
    plain, with_refit = statistics.median(times[False]), statistics.median(times[True])
    print(f"importance pass, {num_samples} × {seq_len} tokens, median of {repeats}: plain {plain:.1f} s, "
          f"with refit {with_refit:.1f} s "
          f"({with_refit / plain:.2f}×; pairs: " + ", ".join(f"{b / a:.2f}" for a, b in zip(times[False], times[True]))
          + ")")
    geo = geometry(model.config)
    d_attn, d_mlp = geo.n_heads * geo.head_dim, geo.intermediate
    gram_gb = 8 * ((d_attn + 1) ** 2 + (d_mlp + 1) ** 2) / 1e9
    print(f"layer-by-layer memory: one layer's Grams 8·((d_attn+1)² + (d_mlp+1)²) = {gram_gb:.2f} GB "
          f"(d_attn={d_attn}, d_mlp={d_mlp}), plus the hidden states {num_samples}·{seq_len}·{geo.hidden} values")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.25])
    ap.add_argument("--calibrations", nargs="*", default=["pydoc", "pydoc+jargon"],
                    help="calibration sources of the tables (none: only --timing)")
    ap.add_argument("--methods", nargs="+", default=["global_taylor", "global_refit", "depth_refit", "taylor_counts"])
    add_calibration_args(ap)
    add_eval_args(ap, ("jargon",))
    ap.add_argument("--damping", type=float, default=1e-4, help="λ of the re-fit (scores and reconstruction)")
    ap.add_argument("--toward", default="zero", choices=["zero", "dense"], help="what the re-fit's ridge pulls toward")
    ap.add_argument("--cv-folds", type=int, default=0,
                    help="re-fit with each block's ridge chosen by this many folds of cross-validation (0: --damping)")
    ap.add_argument("--seeds", "--seed", type=int, nargs="+", default=[0],
                    help="which calibration windows (CalibrationConfig.seed); several: a summary over the draws")
    ap.add_argument("--timing", action="store_true", help="time the pass with and without refit first")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    model, tok = bench_model(args)
    if args.timing:
        timing(model, tok, args.repeats, args.samples, args.seq_len)
    pd.set_option("display.width", 200)
    reconstruction = ReconstructConfig(cv_folds=args.cv_folds) if args.cv_folds else \
        ReconstructConfig(damping=args.damping, toward=args.toward)
    refit_label = f"each block's ridge by {args.cv_folds}-fold cross-validation" if args.cv_folds else \
        f"λ = {args.damping:g} toward {args.toward}"
    rows = []
    for seed in args.seeds:
        for source in args.calibrations:
            calibration = CalibrationConfig(source=source, num_samples=args.samples, seq_len=args.seq_len, seed=seed,
                                            refit=True, refit_damping=args.damping, refit_toward=args.toward)
            samples, imp = calibrate(model, tok, calibration, progress=False)
            rescorer = Rescorer(imp, Budget.of(model))
            for ratio in args.ratios:
                plans = baseline_plans(rescorer, ratio, variants={m: (m, {}) for m in args.methods})
                table = compare_plans(model, tok, plans, samples, progress=False,
                                      extra_sources=tuple(args.extra_sources),
                                      reconstruction=reconstruction)
                print(f"\ncalibration {source} (seed {seed}), {ratio:.0%} of all parameters; re-fit: {refit_label} "
                      f"(the scores: λ = {args.damping:g} toward {args.toward})")
                print(table.round(4).to_markdown())
                rows.append(table.assign(calibration=source, seed=seed, ratio=ratio))
    if len(args.seeds) > 1 and rows:
        print(f"\nover the calibration draws (seeds {args.seeds}): the re-fitted model's PPL (mean, min, max) and the "
              "mean ratio to the dense model")
        print(summary(pd.concat(rows), tuple(args.extra_sources)).round(3).to_markdown())


def summary(rows: pd.DataFrame, extra_sources: tuple[str, ...]) -> pd.DataFrame:
    """Per (calibration, ratio, method): the re-fitted PPL over the seeds (mean, min, max), and its mean ratio to
    the dense model, for pydoc and each extra source."""
    out = []
    for source in ("", *extra_sources):
        column = f"ppl_reconstructed_{source}" if source else "ppl_reconstructed"
        dense = rows.loc["dense"].groupby(["calibration", "seed"])[f"ppl_{source}" if source else "ppl"].first()
        pruned = rows.drop(index="dense").reset_index(names="method")
        pruned["ratio_to_dense"] = pruned[column].to_numpy() / dense.loc[
            list(zip(pruned["calibration"], pruned["seed"]))].to_numpy()
        stats = pruned.groupby(["calibration", "ratio", "method"]).agg(
            mean=(column, "mean"), min=(column, "min"), max=(column, "max"), ratio_to_dense=("ratio_to_dense", "mean"))
        out.append(stats.add_prefix(f"{source or 'pydoc'} "))
    return pd.concat(out, axis=1)


if __name__ == "__main__":
    main()
