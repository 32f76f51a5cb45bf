"""Importance pass time ÷ bare forward+backward over the same batches (target ≤ 1.15), and peak memory.

    python benchmarks/importance_overhead.py [--model tiny|default|<path>] [--samples 16] [--seq-len 128]

Peak memory is the peak RSS over each phase (CPU; sampled every 5 ms) or the peak CUDA allocation (GPU).
"""
from __future__ import annotations

import argparse
import time

import torch
from _models import add_calibration_args, add_model_args, bench_model, calibration

from workbench.data import calibration_samples
from workbench.efficiency import PeakMemory
from workbench.importance import compute_importance


def bare_pass(model, samples, batch_size):
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size].to(next(model.parameters()).device)
        model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)


def main():
    ap = argparse.ArgumentParser()
    add_model_args(ap)
    add_calibration_args(ap, samples=16)
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()
    model, tok = bench_model(args)
    samples = calibration_samples(tok, calibration(args))
    device = next(model.parameters()).device
    # Warm-up (the first iterations are slower), then the bare pass with the same frozen parameters.
    warm = samples[: args.batch_size]
    bare_pass(model, warm, args.batch_size)
    compute_importance(model, warm, batch_size=args.batch_size, progress=False)
    from workbench.importance import only_prunable_grads

    results = {}
    for name in ("bare", "importance", "bare_again"):
        with PeakMemory(device) as mem:
            t = time.perf_counter()
            if name.startswith("bare"):
                with only_prunable_grads(model):
                    bare_pass(model, samples, args.batch_size)
            else:
                compute_importance(model, samples, batch_size=args.batch_size, progress=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
            results[name] = (time.perf_counter() - t, mem.peak)
    bare_t = min(results["bare"][0], results["bare_again"][0])
    print(f"model {model.config.name_or_path}, device {device}, dtype {next(model.parameters()).dtype}, "
          f"{args.samples} samples × {args.seq_len} tokens, batch {args.batch_size}")
    for name, (t, peak) in results.items():
        print(f"  {name:11s} {t:8.2f} s   peak memory {peak / 2**20:9.1f} MiB")
    print(f"importance / bare forward+backward = {results['importance'][0] / bare_t:.3f}  (target ≤ 1.15)")


if __name__ == "__main__":
    main()
