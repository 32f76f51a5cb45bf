"""Dense and pruned default model exported to GGUF and run in llama.cpp on this CPU: PPL and tokens/s.

    python benchmarks/gguf_llamacpp.py [--model default|tiny|<path>] [--ratio 0.2] [--dtypes f16 q8_0]
                                       [--samples 64] [--eval-windows 50] [--threads N] [--out DIR]

The global Taylor plan of `ratio` of all parameters (importance from the calibration part), exported
with `export_gguf` in each dtype; llama.cpp's perplexity on the same evaluation windows (50 × 128) as the
workbench's own (float32, PyTorch) figure, and llama.cpp's prompt (128 tokens) and generation (64 tokens)
speed, best of 5; `--extra-sources` (default: jargon) adds each text's PPL in both, out of the calibration
domain. The source GGUF file (Q4_1) of the default model is run too, for reference.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

from _models import add_calibration_args, add_eval_args, add_model_args, bench_model, calibration

from workbench.data.text import evaluation_windows
from workbench.deploy import llamacpp
from workbench.deploy.gguf import GGUF_DTYPES, export_gguf
from workbench.evaluation.evaluate import perplexity
from workbench.plans.selection import SelectionConfig
from workbench.runs.pipeline import calibrate, select_plan
from workbench.surgery.checkpoints import default_model_dir
from workbench.surgery.prune import apply_plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--dtypes", nargs="+", default=["f16", "q8_0"], choices=list(GGUF_DTYPES))
    add_calibration_args(ap)
    ap.add_argument("--eval-windows", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all cores)")
    ap.add_argument("--repeats", type=int, default=5, help="speed: best of this many runs")
    ap.add_argument("--out", default=None, help="folder for the GGUF files (default: a temporary one)")
    add_eval_args(ap, ("jargon",))
    args = ap.parse_args()

    model, tok = bench_model(args)
    _, imp = calibrate(model, tok, calibration(args))
    _, plan = select_plan(model, imp, "taylor", SelectionConfig(ratio=args.ratio))
    pruned = copy.deepcopy(model)
    apply_plan(pruned, plan)
    for source in ("pydoc", *args.extra_sources):
        ppl = {name: perplexity(m, tok, source, seq_len=args.seq_len, max_windows=args.eval_windows, progress=False).ppl
               for name, m in (("dense", model), ("pruned", pruned))}
        print(f"PyTorch float32 PPL on {source}: dense {ppl['dense']:.2f}, pruned {ppl['pruned']:.2f} "
              f"(global Taylor, {args.ratio:.0%} of all parameters)")

    out = Path(args.out or tempfile.mkdtemp(prefix="gguf-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    if args.model == "default":
        files["source Q4_1"] = next(default_model_dir().glob("*.gguf"))
    for dtype in args.dtypes:
        for name, m in (("dense", model), ("pruned", pruned)):
            t = time.perf_counter()
            rep = export_gguf(m, out / f"{name}-{dtype}.gguf", dtype=dtype, tokenizer=tok,
                              plan=plan if name == "pruned" else None, overwrite=True)
            print(f"exported {rep.path.name}: {rep.arch}, {rep.size_bytes / 2**20:.1f} MiB, "
                  f"{time.perf_counter() - t:.1f} s; tokenizer {rep.tokenizer_source}")
            files[f"{name} {dtype}"] = rep.path
    windows = evaluation_windows(tok, seq_len=args.seq_len, max_windows=args.eval_windows).tolist()
    extra = {source: evaluation_windows(tok, source, seq_len=args.seq_len, max_windows=args.eval_windows).tolist()
             for source in args.extra_sources}
    table = llamacpp.compare(files, windows, n_threads=args.threads, repeats=args.repeats, extra_windows=extra)
    print(table.to_string(float_format=lambda v: f"{v:,.2f}"))
    for dtype in args.dtypes:
        d, p = table.loc[f"dense {dtype}"], table.loc[f"pruned {dtype}"]
        print(f"{dtype}: pruned/dense speed-up prompt {p.prompt_tok_s / d.prompt_tok_s:.2f}×, "
              f"generation {p.gen_tok_s / d.gen_tok_s:.2f}×; parameters "
              f"{sum(x.numel() for x in model.parameters()) / sum(x.numel() for x in pruned.parameters()):.2f}×")


if __name__ == "__main__":
    main()
