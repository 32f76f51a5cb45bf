"""Everything that matters at real scale, measured on one model in one run (the issue's checklist).

    python benchmarks/scale.py --shape llama3-8b --device cuda --dtype bfloat16     # on a GPU (random weights)
    python benchmarks/scale.py --shape small --samples 8 --lora-steps 3    # a quick run on a CPU
    python benchmarks/scale.py --model default      # the default model (CPU: 16 × 128 calibration, LoRA 4 × 256)

Prints, in this order:
  importance  time and peak memory of forward-only, bare forward+backward and the importance pass (eager,
              compiled, checkpointed, with the re-fit scores), the overhead (target ≤ 1.10×), compiled-vs-eager
              agreement, and the re-fit scores' pass against the plain one (target ≤ 2×);
  cache key   the model fingerprint's time (what every cached result is keyed by);
  selection   unit table build, and re-score + selection per scoring setting (target < 50 ms);
  decode      dense vs pruned prefill and decode, eager loop and static cache (compiled by transformers on CUDA),
              against the weight-bandwidth floor (weight bytes / memory bandwidth; `--bandwidth-gbs`);
  re-fit      the one-shot re-fit of the Taylor plan (fixed ridge; `--refit-cv-folds K` also with each block's
              ridge by K-fold cross-validation): time, peak memory, and how many layers' Gram matrices fit in one
              pass (the others are replayed one layer at a time);
  apply       physical pruning time;
  checkpoint  save / reload time and size, and the reload's max |Δlogit| in the model's dtype (must be 0);
  lora        seconds per LoRA step and peak memory.
`--json FILE` also writes every figure.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch
from _models import add_calibration_args, add_model_args, bare_pass, bench_model, calibration, measured
from rescore_speed import plan_ms, settings

from workbench.core.arch import decoder_layers, get_spec, layer_parts
from workbench.core.cache import model_fingerprint
from workbench.data.text import calibration_samples
from workbench.evaluation.efficiency import EfficiencyConfig, directory_bytes, measure
from workbench.plans.normalize import ScoringConfig
from workbench.plans.rescore import Rescorer
from workbench.plans.selection import Budget, SelectionConfig
from workbench.recovery.finetune import FinetuneConfig, finetune, training_data
from workbench.scoring.hooks import only_prunable_grads
from workbench.scoring.importance import compute_importance
from workbench.scoring.removal import block_removal_loss
from workbench.surgery.checkpoints import load_pruned, save_pruned
from workbench.surgery.prune import apply_plan
from workbench.surgery.reconstruct import (
    ReconstructConfig,
    free_bytes,
    held_layers,
    refit_blocks,
    solve_reconstruction,
)

# Peak memory bandwidth of known GPUs in GB/s (their data sheets), for the decode floor.
BANDWIDTH_GBS = {"H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H200": 4800, "A100-SXM4-80GB": 2039,
                 "A100-SXM4-40GB": 1555, "A100-PCIE-40GB": 1555, "L40S": 864, "RTX 4090": 1008}

ROWS: list[dict] = []


def report(section: str, measure_name: str, value, unit: str = "") -> None:
    ROWS.append(dict(section=section, measure=measure_name, value=value, unit=unit))
    shown = f"{value:,.4g}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)
    print(f"  {section:11s} {measure_name:52s} {shown:>14s} {unit}", flush=True)


def forward_only(model, samples, batch_size):
    device = model.get_input_embeddings().weight.device
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size].to(device)
            model(input_ids=batch, labels=batch, use_cache=False)


def max_rel_diff(a, b) -> float:
    return max(float(((x - y).abs() / y.abs().clamp_min(1e-30)).max())
               for name in ("first", "fisher") for blk in ("attn", "mlp")
               for x, y in zip(getattr(a.acc, name)[blk], getattr(b.acc, name)[blk]) if len(x))


def importance_section(model, samples, args, device):
    opts = dict(batch_size=args.batch_size, progress=False)
    warm = samples[: args.batch_size]
    bare_pass(model, warm, args.batch_size)
    compute_importance(model, warm, **opts)
    _, t_fwd, m_fwd = measured(lambda: forward_only(model, samples, args.batch_size), device)
    with only_prunable_grads(model):
        _, t_bare, m_bare = measured(lambda: bare_pass(model, samples, args.batch_size), device)
    eager, t_eager, m_eager = measured(lambda: compute_importance(model, samples, **opts), device)
    with only_prunable_grads(model):  # again, the faster of the two counts (a shared machine drifts)
        _, t_bare2, _ = measured(lambda: bare_pass(model, samples, args.batch_size), device)
    t_bare = min(t_bare, t_bare2)
    report("importance", "forward only", t_fwd, "s")
    report("importance", "bare forward+backward (faster of two)", t_bare, "s")
    report("importance", "importance pass (eager accumulation)", t_eager, "s")
    report("importance", "overhead eager (target <= 1.10)", t_eager / t_bare, "x")
    if not args.no_compile:
        _, t_compile, _ = measured(lambda: compute_importance(model, warm, accumulation="compiled", **opts), device)
        compiled, t_comp, m_comp = measured(
            lambda: compute_importance(model, samples, accumulation="compiled", **opts), device)
        report("importance", "first compiled batch (includes compiling)", t_compile, "s")
        report("importance", "importance pass (compiled accumulation)", t_comp, "s")
        report("importance", "overhead compiled (target <= 1.10)", t_comp / t_bare, "x")
        report("importance", "compiled vs eager, max relative difference", max_rel_diff(compiled, eager))
    ckpt, t_ckpt, m_ckpt = measured(
        lambda: compute_importance(model, samples, gradient_checkpointing=True, **opts), device)
    report("importance", "importance pass, gradient checkpointing", t_ckpt, "s")
    report("importance", "checkpointed vs plain, max relative difference", max_rel_diff(ckpt, eager))
    _, t_refit, m_refit = measured(lambda: compute_importance(model, samples, refit=True, **opts), device)
    report("importance", "importance pass with the re-fit scores (refit=True)", t_refit, "s")
    report("importance", "re-fit scores: pass with / without (target <= 2)", t_refit / t_eager, "x")
    kind = "peak allocated" if device.type == "cuda" else "peak RSS"
    for name, m in (("forward only", m_fwd), ("bare forward+backward", m_bare), ("importance pass", m_eager),
                    ("importance pass, checkpointed", m_ckpt), ("importance pass with the re-fit scores", m_refit)):
        report("importance", f"{kind}: {name}", m / 2**30, "GiB")
    return eager


def selection_section(model, imp, samples, args, device):
    loss, t_loss, _ = measured(lambda: block_removal_loss(model, samples[: args.batch_size], progress=False,
                                                          cache=False), device)
    report("selection", f"block removal loss ({args.batch_size} windows; for T and tau)", t_loss, "s")
    t = time.perf_counter()
    rescorer = Rescorer(imp, Budget.of(model), loss)
    rescorer.table("taylor")
    report("selection", f"unit table ({sum(w[0] + w[1] for w in imp.widths):,} units)", time.perf_counter() - t, "s")
    for name, cfg in settings().items():
        cfg = dataclasses.replace(cfg, tau_over_budget="cap")  # random weights: tau's blocks may exceed the budget
        report("selection", f"re-score + select, {name} (target < 50 ms)", plan_ms(rescorer, cfg, args.ratio), "ms")
    return rescorer.plan(ScoringConfig(method="taylor"), SelectionConfig(ratio=args.ratio))[1]


def refit_section(model, plan, samples, args, device):
    layers = decoder_layers(model, get_spec(model))
    for folds in (0, *([args.refit_cv_folds] if args.refit_cv_folds else [])):
        cfg = ReconstructConfig(cv_folds=folds, batch_size=args.batch_size)
        wanted = refit_blocks(plan, cfg)
        k = max(folds, 1)
        held = held_layers(model, get_spec(model), wanted, k, free_bytes(device) // 2)
        every = sum(8 * k * (layer_parts(layers[i], get_spec(model)).out_proj(b).in_features + 1) ** 2
                    for i, b in wanted)
        label = f"{folds}-fold cross-validation" if folds else "fixed ridge"
        report("re-fit", f"{label}: Gram matrices of every pruned block ({len(wanted)})", every / 2**30, "GiB")
        report("re-fit", f"{label}: layers summed in the one pass / replayed",
               f"{len(held)} / {len({i for i, _ in wanted}) - len(held)}")
        rec, t, peak = measured(lambda cfg=cfg: solve_reconstruction(model, plan, samples, cfg, cache=False,
                                                                     progress=False), device)
        report("re-fit", f"{label}: one-shot re-fit of {len(rec.solutions)} blocks", t, "s")
        report("re-fit", f"{label}: peak memory", peak / 2**30, "GiB")


def decode_section(model, label, args, device, floor_gbs):
    out = {}
    for mode in ("loop", "static"):
        cfg = EfficiencyConfig(prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
                               decode=mode)
        m = measure(model, cfg)
        out[mode] = m
        report("decode", f"{label}: prefill {args.prompt_len} tokens ({mode})", m["prefill_ms"], "ms")
        report("decode", f"{label}: decode per token ({mode})", m["decode_ms_per_token"], "ms")
        if floor_gbs:
            floor = m["weight_bytes"] / (floor_gbs * 1e9) * 1e3
            report("decode", f"{label}: decode / bandwidth floor {floor:.2f} ms ({mode}, target <= 1.5)",
                   m["decode_ms_per_token"] / floor, "x")
    return out


def checkpoint_section(model, args, device):
    probe = torch.randint(0, model.get_input_embeddings().weight.shape[0], (2, 64),
                          generator=torch.Generator().manual_seed(0)).to(device)
    dtype = next(model.parameters()).dtype
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        target = Path(tmp) / "pruned"
        _, t_save, _ = measured(lambda: save_pruned(model, target), device)
        reloaded, t_load, _ = measured(lambda: load_pruned(target, dtype=dtype, device=device), device)
        with torch.no_grad():
            diff = float((reloaded(probe).logits.float() - model(probe).logits.float()).abs().max())
        report("checkpoint", "save", t_save, "s")
        report("checkpoint", "size", directory_bytes(target) / 2**30, "GiB")
        report("checkpoint", f"load_pruned(dtype={str(dtype).replace('torch.', '')})", t_load, "s")
        report("checkpoint", "reload max |Δlogit| (must be 0)", diff)
        del reloaded


def lora_section(model, tokenizer, args, device):
    cfg = FinetuneConfig(method="lora", seq_len=args.lora_seq_len, max_steps=args.lora_steps, batch_size=4,
                         warmup_steps=0, eval_every=args.lora_steps, save_every=args.lora_steps, val_fraction=0.05)
    data = training_data(tokenizer, cfg)
    data = data.subset(torch.arange(min(len(data), 4 * args.lora_steps + 20)))  # a small held-out part to evaluate
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        first = finetune(model, tokenizer, cfg, tmp, data=data, stop_after=1, progress=False, log=lambda *_: None)
        result, _, peak = measured(lambda: finetune(first.model, tokenizer, cfg, tmp, data=data, progress=False,
                                                    log=lambda *_: None), device)
    steps = args.lora_steps - 1
    report("lora", f"seconds per step ({steps} steps × 4 × {args.lora_seq_len} tokens after the first; with one "
                   "evaluation and one save)",
           result.seconds / steps, "s")
    report("lora", "peak memory", peak / 2**30, "GiB")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(ap)
    add_calibration_args(ap, samples=None)
    ap.set_defaults(seq_len=None)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--ratio", type=float, default=0.2, help="share of parameters the Taylor plan removes")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--lora-steps", type=int, default=None)
    ap.add_argument("--lora-seq-len", type=int, default=None)
    ap.add_argument("--bandwidth-gbs", type=float, default=None,
                    help="memory bandwidth for the decode floor (default: the data sheet of a known GPU)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled accumulation")
    ap.add_argument("--refit-cv-folds", type=int, default=0,
                    help="also time the one-shot re-fit with each block's ridge by K-fold cross-validation (0: not)")
    ap.add_argument("--tmp", default=None, help="folder for the checkpoint and LoRA state (default: the system's)")
    ap.add_argument("--json", default=None, help="also write every figure to this JSON file")
    args = ap.parse_args()
    gpu = args.device.startswith("cuda")  # defaults: the GPU setting, or what a 2-core CPU does in minutes
    for name, on_gpu, on_cpu in (("samples", 64, 16), ("seq_len", 512, 128), ("lora_steps", 8, 4),
                                 ("lora_seq_len", 512, 256)):
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if gpu else on_cpu)
    if args.lora_steps < 2:
        raise SystemExit(f"--lora-steps {args.lora_steps}: at least 2 (the first step is not timed)")

    model, tok = bench_model(args)
    device = model.get_input_embeddings().weight.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    floor_gbs = args.bandwidth_gbs or next((v for k, v in BANDWIDTH_GBS.items() if k in name), None)
    params = sum(p.numel() for p in model.parameters())
    print(f"{model.config.name_or_path}: {params / 1e9:.3f} B parameters, {next(model.parameters()).dtype}, on {name}; "
          f"calibration {args.samples} × {args.seq_len} tokens, batch {args.batch_size}; Taylor plan at "
          f"{args.ratio:.0%}" + (f"; bandwidth {floor_gbs:,.0f} GB/s" if floor_gbs else ""), flush=True)
    report("model", "parameters", params)
    report("model", "device", name)

    samples = calibration_samples(tok, calibration(args))
    imp = importance_section(model, samples, args, device)
    _, t_fp, _ = measured(lambda: model_fingerprint(model), device)
    report("cache key", "model fingerprint (hash of every weight)", t_fp, "s")
    plan = selection_section(model, imp, samples, args, device)
    refit_section(model, plan, samples, args, device)
    dense = decode_section(model, "dense", args, device, floor_gbs)
    _, t_apply, _ = measured(lambda: apply_plan(model, plan), device)
    report("apply", f"physical pruning ({plan.selected_params / plan.denominator:.1%} of the parameters)", t_apply, "s")
    pruned = decode_section(model, "pruned", args, device, floor_gbs)
    ideal = dense["loop"]["weight_bytes"] / pruned["loop"]["weight_bytes"]
    for mode in ("loop", "static"):
        speedup = dense[mode]["decode_ms_per_token"] / pruned[mode]["decode_ms_per_token"]
        report("decode", f"pruned speed-up ({mode}) / weight ratio {ideal:.3f} (target >= 0.95)", speedup / ideal)
    checkpoint_section(model, args, device)
    lora_section(model, tok, args, device)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), rows=ROWS), indent=1, default=str))


if __name__ == "__main__":
    main()
