"""Second-order Taylor on the default model: the size of each term, the cost of the per-sequence Fisher, and
the plan (and PPL) each score gives at the same budget.

    python benchmarks/second_order.py [--model default|tiny|<path>] [--ratio 0.2] [--samples 64] [--seq-len 128]

One importance pass with fisher="batch" and one with fisher="sequence" over the same calibration windows
(timed, not cached); then global plans from taylor, taylor2 (batch-mean Fisher), taylor2_seq (per-sequence
Fisher) and fisher_seq (the second-order term alone), each compared with the taylor plan (units in common) and
measured by PPL on the evaluation part (50 × 128) and on each of `--extra-sources` (default: jargon, out of
the calibration domain), no fine-tuning.
"""
from __future__ import annotations

import argparse
import copy
import time

import pandas as pd
from _models import add_calibration_args, add_eval_args, add_model_args, bench_model, calibration

from workbench.analysis.diagnosis import taylor_terms
from workbench.data.text import calibration_samples
from workbench.evaluation.evaluate import perplexity
from workbench.plans.normalize import ScoringConfig
from workbench.plans.rescore import Rescorer
from workbench.plans.selection import Budget, SelectionConfig
from workbench.scoring.importance import compute_importance
from workbench.surgery.prune import apply_plan


def removed_units(plan) -> set[tuple[str, int, int]]:
    return {(b, i, u) for b, layers in plan.removed.items() for i, units in enumerate(layers) for u in units}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--ratio", type=float, default=0.2)
    add_calibration_args(ap)
    ap.add_argument("--batch-size", type=int, default=4)
    add_eval_args(ap, ("jargon",))
    args = ap.parse_args()

    model, tok = bench_model(args)
    samples = calibration_samples(tok, calibration(args))
    passes = {}
    for mode in ("batch", "sequence"):
        t0 = time.perf_counter()
        passes[mode] = compute_importance(model, samples, batch_size=args.batch_size, fisher=mode, progress=False)
        print(f"importance pass, fisher={mode}: {time.perf_counter() - t0:.1f} s", flush=True)
    imp = passes["sequence"]

    terms = taylor_terms(imp)
    print("\nsecond term / first term over blocks (median, max):")
    for col in ("batch_over_first", "seq_over_first"):
        print(f"  {col:>17}: {terms[col].median():.2e}  {terms[col].max():.2e}")

    rescorer = Rescorer(imp, Budget.of(model))
    selection = SelectionConfig(ratio=args.ratio)
    reference = removed_units(rescorer.plan(ScoringConfig(method="taylor"), selection)[1])
    rows = []
    for method in ("taylor", "taylor2", "taylor2_seq", "fisher_seq"):
        _, plan = rescorer.plan(ScoringConfig(method=method), selection)
        units = removed_units(plan)
        pruned = copy.deepcopy(model)
        apply_plan(pruned, plan)
        rows.append(dict(method=method, ppl=perplexity(pruned, tok, seq_len=128, max_windows=50, progress=False).ppl,
                         **{f"ppl_{source}": perplexity(pruned, tok, source, seq_len=128, max_windows=50,
                                                        progress=False).ppl for source in args.extra_sources},
                         same_units_as_taylor=len(units & reference) / max(1, len(units | reference)),
                         removed_units=len(units), emptied_blocks=len(plan.emptied_blocks()),
                         removed_layers=len(plan.removed_layers())))
        del pruned
    dense = {source: perplexity(model, tok, source, seq_len=128, max_windows=50, progress=False).ppl
             for source in ("pydoc", *args.extra_sources)}
    print(f"\nglobal plans at {args.ratio:.0%} of all parameters (dense PPL "
          + ", ".join(f"{source} {ppl:.2f}" for source, ppl in dense.items()) + "):")
    print(pd.DataFrame(rows).set_index("method").round(4).to_markdown())


if __name__ == "__main__":
    main()
