# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (prune-workbench)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07 · Layer-wise pruning, the Attention:MLP split and the literature baselines, on one table
#
# Every method here makes a `Plan` from the same calibration pass (cached), so pruning, reconstruction,
# checkpoints and evaluation treat them alike: the GAQ-Aware-Prune study's layer-wise (v1.0) strategies,
# its x:y search, and LLM-Pruner, Wanda-sp, FLAP and ShortGPT beside the global knapsack, at one budget. The
# re-fit score (`refit`: what a unit costs once the kept units are re-fitted) makes three more plans, each
# re-fitted: its global knapsack, ratios rising with depth (SlimGPT's schedule) and Taylor's allocation.
# Expected runtime on 2 CPU cores with SmolLM2-135M: ≈ 15 min (≈ 1 min cached); smoke mode: seconds.

# %% tags=["parameters"]
MODEL = None
SMOKE = False
RATIO = 0.2              # share of all parameters removed by every method
NUM_SAMPLES = 64
SEQ_LEN = 128
LAYER_SAMPLES = 16       # calibration samples for the layer-removal loss (one pass per layer)
HELD_OUT = 16            # calibration windows (not used for importance) that score x:y candidates
XY_START = 2.0
RECONSTRUCT = True       # also report each plan's PPL after closed-form reconstruction
DAMPING = 1e-4           # its ridge λ (the re-fit scores assume the same ridge)
TOWARD = "zero"          # what that ridge pulls toward: "zero", or "dense" (with DAMPING = 0.1: better out of domain)
CV_FOLDS = 4             # the reconstruction: each block's ridge by 4-fold cross-validation; 0: DAMPING / TOWARD
EVAL_WINDOWS = 50
OUT_OF_DOMAIN = ["jargon"]  # sources no calibration sees (jargon: `apt-get install jargon-text`); [] for none
REFIT_SCORES = True      # the pass also computes the re-fit score (≈ 1.8× the pass's time) for its three plans
EXPERIMENT = "nb07-layerwise-and-baselines"

# %%
import pandas as pd

from workbench import (
    ALLOCATIONS,
    BASELINES,
    LAYER_IMPORTANCE,
    NORMALIZERS,
    Budget,
    CalibrationConfig,
    Experiment,
    LayerwiseConfig,
    ReconstructConfig,
    Rescorer,
    ScoringConfig,
    SelectionConfig,
    allocate,
    baseline_plans,
    best_split,
    calibrate,
    compare_plans,
    held_out_samples,
    layer_importance,
    load,
    plots,
    study_variants,
    timed,
    xy_search,
)

pd.DataFrame([(b.name, b.source, b.description) for b in BASELINES.values()], columns=["plan", "source", "what"])

# %%
model, tokenizer = load(MODEL, SMOKE)  # SMOKE: a tiny random model (seconds; what the tests run)
exp = Experiment.create(EXPERIMENT, exist_ok=True)
calibration = CalibrationConfig(num_samples=NUM_SAMPLES, seq_len=SEQ_LEN, refit=REFIT_SCORES, refit_damping=DAMPING,
                                refit_toward=TOWARD)
with timed("importance pass"):
    samples, imp = calibrate(model, tokenizer, calibration)
rescorer = Rescorer(imp, Budget.of(model))

# %% [markdown]
# ### Layer importance: removal loss and Block Influence (both cached)

# %%
with timed("layer importance"):
    layer_scores = {m: layer_importance(model, samples[:LAYER_SAMPLES], m).to_numpy() for m in LAYER_IMPORTANCE}
importance_frame = pd.DataFrame({m: NORMALIZERS["minmax"].fn(v) for m, v in layer_scores.items()})
plots.grouped_bars(importance_frame, ylabel="normalized layer importance", title="Layer importance per layer")

# %% [markdown]
# ### Per-layer ratios of each strategy (importance: removal loss), with and without freezing the top 3

# %%
target, _ = rescorer.budget.target(RATIO, "total")  # the budget every plan maker uses (rounded up)
ratios = pd.DataFrame({f"{s} α={a}" + (" freeze 3" if f else ""): allocate(
    layer_scores["removal"], rescorer.budget.layer_params(), target, LayerwiseConfig(strategy=s, alpha=a, freeze_top_n=f))
    for s in ALLOCATIONS for a in (1.0, 2.0) for f in (0, 3) if not (s == "uniform" and (a, f) != (1.0, 0))})
plots.grouped_bars(ratios, ylabel="share of the layer's attention + MLP removed", title="Allocations per strategy")

# %% [markdown]
# ### The x:y search (global Taylor knapsack split x:y; PPL on held-out calibration windows; cached per point)

# %%
held_out = held_out_samples(tokenizer, calibration, HELD_OUT)
make_global = lambda split: rescorer.plan(ScoringConfig(), SelectionConfig(ratio=RATIO, attn_mlp=split))[1]
with timed("x:y search"):
    search = xy_search(model, make_global, held_out, settings=dict(method="taylor", ratio=RATIO), start=XY_START)
best = best_split(search)
print("best x:y", best)
plots.publish(plots.xy_curve, search, name="xy_search", to=exp)

# %% [markdown]
# ### One table at the same budget (PPL on the evaluation part; FLAP with its bias compensation)
# `ppl_<source>` columns: the same models on text out of the calibration domain (`OUT_OF_DOMAIN`).

# %%
plans = baseline_plans(rescorer, RATIO, layer_scores=layer_scores, variants=study_variants(best))
with timed("comparison table"):
    table = compare_plans(model, tokenizer, plans, samples,
                          reconstruction=(ReconstructConfig(cv_folds=CV_FOLDS) if CV_FOLDS else
                                          ReconstructConfig(damping=DAMPING, toward=TOWARD)) if RECONSTRUCT else None,
                          seq_len=SEQ_LEN, max_windows=EVAL_WINDOWS, extra_sources=tuple(OUT_OF_DOMAIN))
plots.styled(table.sort_values("ppl"))

# %%
exp.write_table("analysis/comparison.csv", table.reset_index())
exp.write_table("analysis/xy_search.csv", search)
exp.write_json("config.json", dict(ratio=RATIO, calibration=calibration.__dict__, held_out=HELD_OUT, best_xy=best))
plots.export(plots.ppl_bars(table.ppl.drop("dense"), backend="paper", dense=table.ppl["dense"],
                            title=f"every method, {RATIO:.0%} of all parameters"), f"comparison_ppl_{RATIO:g}", exp)
