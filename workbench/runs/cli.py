"""The command line: `workbench run | sweep | launch | consolidate | best | ...` (also `python -m workbench ...`).

    workbench run CONFIG.yaml [key=value ...] [--name NAME] [--overwrite]
    workbench sweep SWEEP.yaml [key=value ...] [--dir DIR] [--workers N] [--storage URL] [--join]
    workbench launch SWEEP.yaml [key=value ...] --dir SHARED_DIR --workers N [--partition P] [--hours H] [--wait]
                                                         (a Slurm job array of sweep workers, or --executor local)
    workbench consolidate SWEEP_DIR
    workbench best SWEEP_DIR [--objective ppl] [--direction minimize]
    workbench export-gguf DIR OUT.gguf [--dtype f16|f32|q8_0] [--overwrite]
    workbench export-hf DIR OUT [--overwrite]              (a folder plain transformers loads, remote code inside)
    workbench calibrate CONFIG.yaml [key=value ...]      (also under torchrun: data-parallel, rank 0 caches)

Every file and override is checked before a model is loaded; a bad one exits with status 2 and a message
naming the key and what is allowed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from workbench.core.compat import DecodingCheckError
from workbench.core.experiments import Experiment
from workbench.core.models import model_summary
from workbench.core.paths import experiments_root
from workbench.core.timing import timed
from workbench.deploy.gguf import GGUF_DTYPES, export_gguf
from workbench.deploy.gguf_tokenizer import ExportError
from workbench.runs.config import ConfigError, load_run_config, save_config
from workbench.runs.consolidate import best, consolidate
from workbench.runs.launch import EXECUTORS, LaunchConfig, launch
from workbench.runs.pipeline import calibrate, run_pruning
from workbench.runs.queue import STORAGE_ENV, check_command_line_storage, queue_status
from workbench.runs.sweep import DIRECTIONS, RUN_FILE, ModelPool, run_sweep
from workbench.scoring.parallel import init_from_env
from workbench.surgery.checkpoints import (
    MODELING_FILE,
    PLAN_FILE,
    is_pruned_checkpoint,
    load_model,
    load_plan,
    save_pruned,
)


def _run(args) -> int:
    cfg = load_run_config(args.config, args.overrides)
    name = args.name or time.strftime("run-%Y%m%d-%H%M%S")
    Experiment.check_new(name, overwrite=args.overwrite)
    t0 = time.perf_counter()
    # written into a staging folder, moved under its name only when the whole run succeeded
    with Experiment.staged(name, overwrite=args.overwrite) as exp:
        save_config(cfg, exp.root / RUN_FILE)
        with timed("model loaded"):
            model, tok = ModelPool().get(cfg)
        for k, v in model_summary(model).items():
            print(f"  {k:16s} {v}")
        record = run_pruning(model, tok, cfg, exp, progress=not args.quiet)
    final = experiments_root() / name
    print(f"PPL dense {record['dense']['ppl']:.2f} -> pruned {record['pruned']['ppl']:.2f}; "
          f"achieved {record['report']['ratio_total']:.2%} of all parameters, "
          f"{record['report']['ratio_prunable']:.2%} of attention+MLP")
    figures = [str(final / p) for p in record["figures"] if p.endswith(".png")]
    print(f"experiment: {final}\nfigures: {', '.join(figures)}\ntotal {time.perf_counter() - t0:.1f} s")
    return 0


def _sweep(args) -> int:
    check_command_line_storage(args.storage)
    sweep_dir = Path(args.dir) if args.dir else experiments_root() / "sweeps" / Path(args.sweep).stem
    run_sweep(args.sweep, sweep_dir, overrides=args.overrides, workers=args.workers, storage=args.storage,
              join=args.join)
    return _consolidated(sweep_dir)


def _consolidated(sweep_dir: str | os.PathLike) -> int:
    """Consolidate a finished sweep and say so; exit status 1 when a run failed."""
    table = consolidate(sweep_dir)
    print(f"{sweep_dir}: {int((table.status == 'complete').sum())} of {len(table)} runs complete, "
          f"{int((table.status == 'failed').sum())} failed; table: {Path(sweep_dir) / 'consolidated.csv'}")
    return 0 if not (table.status == "failed").any() else 1


def _launch(args) -> int:
    check_command_line_storage(args.storage)
    cfg = LaunchConfig(workers=args.workers, executor=args.executor, partition=args.partition,
                       gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker, mem_gb=args.mem_gb,
                       hours=args.hours, account=args.account, qos=args.qos, setup=tuple(args.setup))
    launch(args.sweep, args.dir, cfg, overrides=args.overrides, storage=args.storage, wait=args.wait)
    return _consolidated(args.dir) if args.wait else 0


def _consolidate(args) -> int:
    table = consolidate(args.sweep_dir)
    print(f"{len(table)} runs -> {Path(args.sweep_dir) / 'consolidated.csv'} (and .parquet)")
    queue = queue_status(args.sweep_dir)
    left = queue[queue.state.isin(["waiting", "running"])]
    if len(left):  # a sweep still at work: what waits, and what runs where
        running = left[left.state == "running"]
        print(f"queue: {int((left.state == 'waiting').sum())} waiting, {len(running)} running"
              + "".join(f"\n  {r.run} on {r.host} pid {r.pid} for {r.seconds} s{'' if r.alive else ' (worker gone)'}"
                        for r in running.itertuples()))
    return 0


def _best(args) -> int:
    print(best(args.sweep_dir, args.objective, args.direction)["report"])
    return 0


def _model_folder(source: Path) -> Path:
    """An experiment folder's `model/`, or the folder itself."""
    if (source / "model" / "config.json").is_file():  # an experiment folder: its pruned model
        return source / "model"
    if (source / RUN_FILE).is_file() or (source / "evaluation").is_dir():  # an experiment without a model
        raise ConfigError(f"experiment {source} has no saved model (it ran with save_model: false); run it again "
                          "with save_model: true, then export its model/")
    return source


def _export_hf(args) -> int:
    source = _model_folder(Path(args.source))
    if not is_pruned_checkpoint(source):
        raise ConfigError(f"{source} is not a pruned checkpoint (its config.json has no per-layer widths); export "
                          "the folder save_pruned wrote, or an experiment folder")
    model, tokenizer = load_model(source)
    plan = load_plan(source) if (source / PLAN_FILE).is_file() else None
    out = save_pruned(model, args.out, tokenizer=tokenizer, plan=plan, overwrite=args.overwrite, self_contained=True)
    print(f"{out}: self-contained ({MODELING_FILE}); load it with transformers alone:\n"
          f"  AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    return 0


def _export_gguf(args) -> int:
    source = _model_folder(Path(args.source))
    tok: dict = {}
    if args.tokenizer:
        if args.tokenizer.endswith(".gguf"):
            tok["tokenizer_gguf"] = args.tokenizer
        else:
            from transformers import AutoTokenizer  # deferred: transformers loads in seconds

            tok["tokenizer"] = AutoTokenizer.from_pretrained(args.tokenizer)
    report = export_gguf(source, args.out, dtype=args.dtype, overwrite=args.overwrite, **tok)
    print(f"{report.path}: {report.arch}, {report.n_layers} layers, {report.dtype}, "
          f"{report.size_bytes / 2**20:.1f} MiB; tokenizer {report.tokenizer_source}")
    for note in report.notes:
        print(f"note: {note}")
    return 0


def _calibrate(args) -> int:
    data_parallel = init_from_env()  # under torchrun: join its process group, take a share of the batches
    cfg = load_run_config(args.config, args.overrides)
    model, tok = ModelPool().get(cfg)
    _, imp = calibrate(model, tok, cfg.calibration, progress=not args.quiet, data_parallel=data_parallel)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"importance of {imp.acc.batches} batches, {imp.acc.tokens:,} tokens in {imp.seconds:.1f} s "
              f"(cache key {imp.key[:12]}; every later run of this model, data and setting reads it)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="workbench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="one run from a config file")
    r.add_argument("config")
    r.add_argument("overrides", nargs="*", help="dotted key=value, e.g. selection.ratio=0.25")
    r.add_argument("--name", help="experiment name (default: run-<timestamp>)")
    r.add_argument("--overwrite", action="store_true")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(fn=_run)
    s = sub.add_parser("sweep", help="a grid or search of runs, resumable, over one or many workers")
    s.add_argument("sweep")
    s.add_argument("overrides", nargs="*", help="dotted key=value applied to the base run")
    s.add_argument("--dir", help="sweep folder (default: experiments/sweeps/<file name>)")
    s.add_argument("--workers", type=int, default=1, help="local worker processes")
    storage_help = (f"database URL of the queue shared by workers on many machines, without a password (PGPASSWORD, "
                    f"~/.pgpass, or the whole URL in ${STORAGE_ENV}); default: ${STORAGE_ENV}, else a journal file in "
                    "the sweep folder")
    s.add_argument("--storage", help=storage_help)
    s.add_argument("--join", action="store_true", help="join a running sweep as extra workers (no preparation)")
    s.set_defaults(fn=_sweep)
    la = sub.add_parser("launch", help="prepare a sweep, then submit its workers as a Slurm job array (one GPU each)")
    la.add_argument("sweep")
    la.add_argument("overrides", nargs="*", help="dotted key=value applied to the base run")
    la.add_argument("--dir", required=True, help="sweep folder, on a file system every node shares")
    la.add_argument("--workers", type=int, required=True, help="jobs in the array")
    la.add_argument("--executor", default="slurm", choices=EXECUTORS, help="slurm, or local processes (a dry run)")
    la.add_argument("--partition", help="Slurm partition (default: the cluster's)")
    la.add_argument("--gpus-per-worker", type=int, default=1)
    la.add_argument("--cpus-per-worker", type=int, default=8)
    la.add_argument("--mem-gb", type=int, default=None)
    la.add_argument("--hours", type=float, default=12.0, help="time limit of each job")
    la.add_argument("--account")
    la.add_argument("--qos")
    la.add_argument("--setup", action="append", default=[], help="a shell line each job runs first (repeatable), "
                                                                 "e.g. 'source ~/wb/bin/activate'")
    la.add_argument("--storage", help=storage_help)
    la.add_argument("--wait", action="store_true", help="wait for every job, then consolidate")
    la.set_defaults(fn=_launch)
    c = sub.add_parser("consolidate", help="one table of a sweep's runs (CSV and Parquet)")
    c.add_argument("sweep_dir")
    c.set_defaults(fn=_consolidate)
    b = sub.add_parser("best", help="best configs, method comparison, correlations and a report")
    b.add_argument("sweep_dir")
    b.add_argument("--objective", default=None, help="default: the sweep file's objective (else ppl)")
    b.add_argument("--direction", default=None, choices=DIRECTIONS, help="default: the sweep file's direction")
    b.set_defaults(fn=_best)
    g = sub.add_parser("export-gguf", help="write a pruned checkpoint (or an experiment's model) as a GGUF file "
                                           "llama.cpp runs")
    g.add_argument("source", help="a checkpoint folder, an experiment folder, or a model folder / hub id")
    g.add_argument("out", help="the .gguf file to write (its folder must exist)")
    g.add_argument("--dtype", default="f16", choices=GGUF_DTYPES)
    g.add_argument("--overwrite", action="store_true")
    g.add_argument("--tokenizer", help="a HF tokenizer folder / hub id, or a .gguf file whose tokenizer is carried "
                                       "(default: the model's own)")
    g.set_defaults(fn=_export_gguf)
    h = sub.add_parser("export-hf", help="write a pruned checkpoint (or an experiment's model) as a self-contained "
                                         "Hugging Face folder: transformers loads it with trust_remote_code=True, "
                                         "no workbench needed")
    h.add_argument("source", help="a pruned checkpoint folder or an experiment folder")
    h.add_argument("out", help="the folder to write (new, empty, or a pruned checkpoint to replace)")
    h.add_argument("--overwrite", action="store_true", help="replace a folder that holds other files")
    h.set_defaults(fn=_export_hf)
    k = sub.add_parser("calibrate", help="the importance pass of a run file, cached (data-parallel under torchrun)")
    k.add_argument("config")
    k.add_argument("overrides", nargs="*", help="dotted key=value, e.g. calibration.num_samples=128")
    k.add_argument("--quiet", action="store_true", help="no progress bars")
    k.set_defaults(fn=_calibrate)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in sub.choices:  # options and key=value overrides in any order: `run cfg.yaml --name x k=v`
        args = sub.choices[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
    else:
        args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, ExportError, FileExistsError, FileNotFoundError, ValueError, DecodingCheckError) as e:
        # bad input raises ValueError (or one of these) by the project's convention: one line naming it, exit 2;
        # any other exception keeps its traceback
        print(f"workbench {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
