"""Dense vs globally pruned (Taylor) model side by side: parameters, KV cache, prefill / decode speed.

    python benchmarks/efficiency_dense_vs_pruned.py [--model tiny|default|<path>] [--ratio 0.2]
        [--prompt-len 128] [--new-tokens 32] [--repeats 5] [--decode loop|static] [--device cpu|cuda] [--dtype float32]

Uses the cached importance of the demo's calibration (64 × 128 tokens) when present.
"""
from __future__ import annotations

import argparse
import copy

import pandas as pd
import torch
from _models import add_model_args, bench_model

from workbench.data.text import CalibrationConfig, calibration_samples
from workbench.evaluation.efficiency import EfficiencyConfig, compare
from workbench.plans.selection import SelectionConfig, build_table, select, unit_costs
from workbench.scoring.importance import importance_cached
from workbench.surgery.prune import apply_plan


def main():
    ap = argparse.ArgumentParser()
    add_model_args(ap)
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decode", default="loop", choices=["loop", "static"],
                    help="static: transformers' generate with a static KV cache (compiled by transformers on CUDA)")
    args = ap.parse_args()
    model, tok = bench_model(args)
    calib = CalibrationConfig(num_samples=64, seq_len=128)
    imp = importance_cached(model, calibration_samples(tok, calib), batch_size=calib.batch_size)
    plan = select(build_table(imp.scores("taylor"), unit_costs(model)), model, SelectionConfig(ratio=args.ratio))
    pruned = copy.deepcopy(model)
    apply_plan(pruned, plan)
    cfg = EfficiencyConfig(prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
                           decode=args.decode)
    table = compare({"dense": model, "pruned": pruned}, cfg)
    rows = ["params_total", "params_attn", "params_mlp", "weight_bytes", "kv_cache_bytes_per_token",
            "prefill_ms", "decode_ms_per_token", "decode_tokens_per_s", "peak_memory_bytes", "peak_memory_kind"]
    out = table.loc[rows]
    ratio = pd.to_numeric(out["pruned"], errors="coerce") / pd.to_numeric(out["dense"], errors="coerce")
    out = out.assign(pruned_over_dense=ratio.round(3))
    print(f"model {model.config.name_or_path or 'tiny'}, device {args.device}, dtype {args.dtype}, "
          f"{torch.get_num_threads()} threads; Taylor {args.ratio:.0%} of all parameters; "
          f"prompt {cfg.prompt_len}, {cfg.new_tokens} new tokens, {cfg.warmup} warm-up + {cfg.repeats} repeats (median)")
    with pd.option_context("display.width", 140, "display.max_colwidth", 30):
        print(out.to_string())


if __name__ == "__main__":
    main()
