"""What the cached-decoding self-check costs (`compat.check_cached_decoding`, run once by `apply_plan` and
`load_pruned` when a pruned model relies on transformers internals): median over repeats, on a model pruned so
that the check runs (layer 0's attention emptied, per-layer KV heads)."""
import argparse
import statistics
import time

import torch
from _models import add_model_args, bench_model

from workbench.core.arch import layer_widths
from workbench.core.compat import check_cached_decoding
from workbench.plans.plan import Plan
from workbench.surgery.prune import apply_plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    add_model_args(ap)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    model, _ = bench_model(args)
    widths = layer_widths(model)
    units = {"attn": {0: list(range(widths[0][0])), 1: [0]}, "mlp": {1: list(range(widths[1][1] // 4))}}
    t = time.perf_counter()
    apply_plan(model, Plan.from_units(widths, units))  # includes one check
    apply_s = time.perf_counter() - t
    times, diffs = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        diffs.append(check_cached_decoding(model))
        if torch.cuda.is_available() and str(args.device).startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    print(f"model: {args.shape or args.model} ({args.dtype}, {args.device}), {len(widths)} layers")
    print(f"check_cached_decoding: median {statistics.median(times) * 1000:.1f} ms, "
          f"min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f} ({args.repeats} repeats); "
          f"relative difference {max(diffs):.2e}")
    print(f"apply_plan with its check: {apply_s * 1000:.1f} ms")


if __name__ == "__main__":
    main()
