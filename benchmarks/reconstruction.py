"""Closed-form reconstruction on the default model: PPL without training, and its time against the importance pass.

    python benchmarks/reconstruction.py [--model default|tiny|<path>] [--ratios 0.2 0.25 0.3]
                                        [--modes sequential one_shot] [--samples 64] [--dampings 0.01 0.1]
                                        [--rec-samples N] [--no-bias-variant] [--extra-sources jargon]

Per ratio: the global Taylor plan of that share of all parameters (importance from the calibration
part), PPL on the evaluation part (50 × 128) of the dense, the pruned, and the pruned + reconstructed
model in each mode; the reconstruction's seconds next to the importance pass's. `--extra-sources`: the same
models' PPL on other sources too (e.g. `jargon`, out of the calibration domain), one column each.
"""
from __future__ import annotations

import argparse
import copy
import time

from _models import add_calibration_args, add_eval_args, add_model_args, bench_model, calibration

from workbench.data.text import calibration_samples
from workbench.evaluation.evaluate import perplexity
from workbench.plans.selection import SelectionConfig
from workbench.runs.pipeline import calibrate, select_plan
from workbench.surgery.prune import apply_plan
from workbench.surgery.reconstruct import MODES, ReconstructConfig, reconstruct


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.25, 0.3])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    add_calibration_args(ap)
    ap.add_argument("--dampings", type=float, nargs="+", default=[0.01])
    ap.add_argument("--rec-samples", type=int, default=None,
                    help="calibration samples for the reconstruction (default: the importance pass's)")
    ap.add_argument("--no-bias-variant", action="store_true", help="also run each mode without the bias")
    ap.add_argument("--eval-windows", type=int, default=50)
    add_eval_args(ap)
    args = ap.parse_args()

    model, tok = bench_model(args)
    def ppl(m, source="pydoc"):
        return perplexity(m, tok, source, seq_len=args.seq_len, max_windows=args.eval_windows, progress=False).ppl

    def others(m) -> str:
        return "".join(f" {s}={ppl(m, s):.2f}" for s in args.extra_sources)

    samples, imp = calibrate(model, tok, calibration(args))
    rec_samples = samples if args.rec_samples is None else calibration_samples(
        tok, calibration(args, args.rec_samples))
    dense = ppl(model)
    print(f"dense PPL {dense:.2f}{others(model)}; importance pass {imp.seconds:.1f} s ({args.samples} × {args.seq_len} tokens)")
    print(f"{'ratio':>6} {'setting':>28} {'PPL':>8} {'× dense':>8} {'seconds':>8}")
    for ratio in args.ratios:
        _, plan = select_plan(model, imp, "taylor", SelectionConfig(ratio=ratio))
        pruned = copy.deepcopy(model)
        apply_plan(pruned, plan)
        p = ppl(pruned)
        print(f"{ratio:>6.2f} {'pruned':>28} {p:>8.2f} {p / dense:>8.2f} {'':>8}{others(pruned)}")
        for mode, damping in ((m, d) for m in args.modes for d in args.dampings):
            for bias in (True, False) if args.no_bias_variant else (True,):
                rec_model = copy.deepcopy(pruned)
                t = time.perf_counter()
                cfg = ReconstructConfig(mode=mode, damping=damping, bias=bias)
                rec = reconstruct(model, rec_model, plan, rec_samples, cfg, cache=False)
                seconds = time.perf_counter() - t
                p = ppl(rec_model)
                name = f"{mode} λ={damping:g}{'' if bias else ' no bias'}"
                print(f"{ratio:>6.2f} {name:>28} {p:>8.2f} {p / dense:>8.2f} {seconds:>8.1f}{others(rec_model)}",
                      flush=True)
                del rec, rec_model


if __name__ == "__main__":
    main()
