"""README demo: the default model, pruned globally by 20 % with Taylor importance, end to end.

    python -m workbench.demo [--ratio 0.2] [--method taylor] [--samples 64] [--name demo]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from workbench import plots
from workbench.data import CalibrationConfig
from workbench.experiments import Experiment
from workbench.methods import IMPORTANCE_METHODS
from workbench.checkpoints import load_model
from workbench.models import anatomy, model_summary
from workbench.normalize import ScoringConfig
from workbench.pipeline import PruneRunConfig, run_pruning
from workbench.selection import SelectionConfig


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="hub id, directory or .gguf (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--ratio-of", default="total", choices=["total", "prunable"])
    ap.add_argument("--method", default="taylor", choices=list(IMPORTANCE_METHODS))
    ap.add_argument("--samples", type=int, default=64, help="calibration samples")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=50)
    ap.add_argument("--name", default=None, help="experiment name (default: run-<timestamp>)")
    ap.add_argument("--overwrite", action="store_true", help="replace an experiment of the same name (at the end)")
    args = ap.parse_args(argv)

    # every argument is checked before the model is loaded
    try:
        cfg = PruneRunConfig(
            scoring=ScoringConfig(method=args.method),
            calibration=CalibrationConfig(num_samples=args.samples, seq_len=args.seq_len),
            selection=SelectionConfig(ratio=args.ratio, ratio_of=args.ratio_of),
            eval_seq_len=args.seq_len,
            eval_windows=args.eval_windows,
        )
        name = args.name or time.strftime("run-%Y%m%d-%H%M%S")
        Experiment.check_new(name, overwrite=args.overwrite)
    except (ValueError, TypeError, FileExistsError) as e:
        ap.error(str(e))

    # written into a staging folder, moved under its name only when the whole run succeeded
    with Experiment.staged(name, overwrite=args.overwrite) as exp:
        t0 = time.perf_counter()
        model, tokenizer = load_model(args.model)
        print(f"loaded {model.config.name_or_path} in {time.perf_counter() - t0:.1f} s")
        for k, v in model_summary(model).items():
            print(f"  {k:16s} {v}")
        anat = anatomy(model)
        print(anat.groupby("block")["params"].sum().to_string())
        plots.export(plots.params_per_layer(anat, backend="paper"), "params_per_layer_dense", exp)
        record = run_pruning(model, tokenizer, cfg, exp)
    print(f"PPL dense {record['dense']['ppl']:.2f} -> pruned {record['pruned']['ppl']:.2f}; "
          f"achieved {record['report']['ratio_total']:.2%} of all parameters, "
          f"{record['report']['ratio_prunable']:.2%} of attention+MLP")
    figures = [exp.root / p if not Path(p).is_absolute() else Path(p) for p in record["figures"] if p.endswith(".png")]
    print(f"experiment: {exp.root}\nfigures: {', '.join(map(str, figures))}\ntotal {time.perf_counter() - t0:.1f} s")
    return record


if __name__ == "__main__":
    main()
