"""Importance pass time ÷ bare forward+backward over the same batches (target ≤ 1.10), and peak memory.

    python benchmarks/importance_overhead.py [--model tiny|default|<path> | --shape llama3-8b] [--samples 16]
        [--seq-len 128] [--gradient-checkpointing] [--accumulation eager|compiled] [--device cuda --dtype bfloat16]

Peak memory is the peak RSS over each phase (CPU; sampled every 5 ms) or the peak CUDA allocation (GPU).
"""
from __future__ import annotations

import argparse

from _models import add_calibration_args, add_model_args, bare_pass, bench_model, calibration, measured

from workbench.data.text import calibration_samples
from workbench.scoring.hooks import only_prunable_grads
from workbench.scoring.importance import compute_importance


def main():
    ap = argparse.ArgumentParser()
    add_model_args(ap)
    add_calibration_args(ap, samples=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--gradient-checkpointing", action="store_true", help="checkpoint the importance pass's layers")
    ap.add_argument("--accumulation", default="eager", choices=["eager", "compiled"])
    args = ap.parse_args()
    options = dict(batch_size=args.batch_size, progress=False, gradient_checkpointing=args.gradient_checkpointing,
                   accumulation=args.accumulation)
    model, tok = bench_model(args)
    samples = calibration_samples(tok, calibration(args))
    device = next(model.parameters()).device
    # Warm-up (the first iterations are slower), then the bare pass with the same frozen parameters.
    warm = samples[: args.batch_size]
    bare_pass(model, warm, args.batch_size)
    compute_importance(model, warm, **options)  # the compiled accumulation compiles here
    def bare():
        with only_prunable_grads(model):
            bare_pass(model, samples, args.batch_size)

    passes = {"bare": bare, "importance": lambda: compute_importance(model, samples, **options), "bare_again": bare}
    results = {name: measured(fn, device)[1:] for name, fn in passes.items()}
    bare_t = min(results["bare"][0], results["bare_again"][0])
    print(f"model {model.config.name_or_path}, device {device}, dtype {next(model.parameters()).dtype}, "
          f"{args.samples} samples × {args.seq_len} tokens, batch {args.batch_size}, accumulation {args.accumulation}"
          + (", checkpointed" if args.gradient_checkpointing else ""))
    for name, (t, peak) in results.items():
        print(f"  {name:11s} {t:8.2f} s   peak memory {peak / 2**20:9.1f} MiB")
    print(f"importance / bare forward+backward = {results['importance'][0] / bare_t:.3f}  (target ≤ 1.10)")


if __name__ == "__main__":
    main()
