"""Does closed-form reconstruction + LoRA beat LoRA alone at the same steps? (default model, no GPU needed)

    python benchmarks/reconstruction_lora.py [--model default|tiny|<path>] [--ratio 0.2] [--steps 50]
                                             [--samples 64] [--rec-samples 128]

The same global Taylor plan, then LoRA (r 8 on every projection, the calibration part of the text, seq 128,
batch 4) for the same steps from (a) the pruned model and (b) the pruned + reconstructed model; PPL on the
evaluation part (50 × 128) before and after training.
"""
from __future__ import annotations

import argparse
import copy
import tempfile

from _models import add_calibration_args, add_model_args, bench_model, calibration

from workbench.data.text import calibration_samples
from workbench.evaluation.evaluate import perplexity
from workbench.plans.selection import SelectionConfig
from workbench.recovery.finetune import FinetuneConfig, finetune
from workbench.runs.pipeline import calibrate, select_plan
from workbench.surgery.reconstruct import ReconstructConfig, prune_and_reconstruct


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--steps", type=int, default=50)
    add_calibration_args(ap)
    ap.add_argument("--rec-samples", type=int, default=128)
    args = ap.parse_args()

    model, tok = bench_model(args)
    ppl = lambda m: perplexity(m, tok, seq_len=args.seq_len, max_windows=50, progress=False).ppl  # noqa: E731
    _, imp = calibrate(model, tok, calibration(args))
    _, plan = select_plan(model, imp, "taylor", SelectionConfig(ratio=args.ratio))
    rec_samples = calibration_samples(tok, calibration(args, args.rec_samples))
    cfg = FinetuneConfig(method="lora", max_steps=args.steps, seq_len=args.seq_len, batch_size=4, lr=2e-4,
                         eval_every=args.steps, save_every=args.steps, warmup_steps=max(1, args.steps // 10))
    print(f"dense PPL {ppl(model):.2f}; LoRA {args.steps} steps × 4 × {args.seq_len} tokens")
    print(f"{'start':>26} {'before LoRA':>12} {'after LoRA':>11} {'LoRA s':>7}")
    for name, rec_cfg in (("pruned", None), ("pruned + reconstruction", ReconstructConfig())):
        m = copy.deepcopy(model)
        prune_and_reconstruct(m, plan, rec_samples, rec_cfg, progress=False)
        before = ppl(m)
        with tempfile.TemporaryDirectory() as tmp:
            result = finetune(m, tok, cfg, tmp, progress=False, log=lambda *_: None)
        after = ppl(result.model)
        print(f"{name:>26} {before:>12.2f} {after:>11.2f} {result.summary()['seconds']:>7.0f}", flush=True)
        del m, result


if __name__ == "__main__":
    main()
