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
# # 03 · Normalization, clipping, temperature and tau: the same budget, side by side
#
# All corrections work on the cached importance of one calibration pass; none needs a new forward or
# backward pass except the block-removal loss, measured once and cached. With score s = importance / cost,
# `workbench.plans.normalize.score_table` applies in order:
#
# 1. **normalization** (`NORMALIZERS`: none, log, minmax, zscore, sqrt) within a **level**: `layer` (all
#    units of a layer together) or `block` (a layer's attention and its MLP separately). Every map is
#    monotone, so the order of units inside a level never changes; only the levels are put on one scale.
# 2. **percentile clipping** of the normalized scores to [P_low, P_high] (global percentiles; 0/100 = off).
# 3. **temperature T ∈ [0, 1]** (default 0 = off). With L_b the measured removal loss of block b (calibration
#    loss increase when the block is bypassed), the block-corrected score is s_bc = s · L_b / Σ_{u∈b} s_u:
#    every block's scores sum to L_b and keep their distribution. The normalized scores are rescaled by one
#    positive constant to the mean |s_bc| and mixed: final = (1 − T)·s_norm + T·s_bc. T = 1 ranks units
#    by how much their block's removal actually costs.
# 4. **tau** (default None = off): every block with L_b < tau is removed whole before width pruning, its
#    parameters counted against the budget (depth pruning by evidence).
#
# Presets: `taylor` (no normalization), `layerwise` (minmax per layer), `blockwise` (minmax per block).
#
# Note: `log` and `sqrt` apply the same increasing function at every level, so on their own they keep the
# global order of all units and give the plain plan (log up to its tiny per-level floor). They matter only in
# combination with T (the mix is additive) or clipping. `minmax` and `zscore` have per-level parameters and
# do re-rank units across levels.
#
# Expected runtime on 2 CPU cores with SmolLM2-135M: 9.3 min with every cache empty (block-removal loss 5.5 min, cached afterwards); smoke mode: seconds.

# %% tags=["parameters"]
MODEL = None
SMOKE = False
METHOD = "taylor"
RATIO = 0.2             # of all parameters
NUM_SAMPLES = 64
SEQ_LEN = 128
EVAL_WINDOWS = 50
BLOCK_LOSS_SAMPLES = 32 # calibration samples for the block-removal loss (one pass, then each block from its layer on)
EXPERIMENT = "nb03-normalization"

# %%
from workbench import (
    PRESETS,
    Budget,
    CalibrationConfig,
    Experiment,
    Rescorer,
    SelectionConfig,
    block_removal_loss,
    calibrate,
    layer_summary,
    load,
    panel,
    perplexity,
    perplexity_of_plans,
    plans_record,
    plots,
    standard_settings,
    timed,
)

# %%
model, tokenizer = load(MODEL, SMOKE)  # SMOKE: a tiny random model (seconds; what the tests run)

# %%
exp = Experiment.create(EXPERIMENT, exist_ok=True)
calib = CalibrationConfig(num_samples=NUM_SAMPLES, seq_len=SEQ_LEN)
with timed("importance pass"):
    samples, imp = calibrate(model, tokenizer, calib)
with timed("block-removal loss"):
    block_loss = block_removal_loss(model, samples[:BLOCK_LOSS_SAMPLES], batch_size=calib.batch_size)  # cached
rescorer = Rescorer(imp, Budget.of(model), block_loss)
print(f"base calibration loss {block_loss.base_loss.iloc[0]:.3f}; blocks whose removal lowers the loss: "
      f"{(block_loss.removal_loss < 0).sum()}")
plots.scale_per_layer(block_loss, columns=("removal_loss",), title="block removal loss (log axis; ≤ 0 not drawn)")

# %% [markdown]
# ### Every normalization × level, plus clipping and temperature, at the same budget

# %%
selection = SelectionConfig(ratio=RATIO)
comparison, plans = rescorer.compare(standard_settings(METHOD), selection)
plots.styled(comparison[["n_extreme", "emptied_blocks", "removed_layers", "attn_max_pruned", "mlp_max_pruned", "mlp_std_pruned"]])

# %%
summaries = {name: layer_summary(plan) for name, plan in plans.items()}
plots.publish(plots.pruned_fraction_heatmap, summaries, title=f"{METHOD}, {RATIO:.0%} of all parameters: pruned fraction per layer",
              name=f"pruned_fraction_by_setting_{METHOD}_{RATIO:g}", to=exp)

# %% [markdown]
# ### Interactive: every change re-scores from the cache
#
# Importance method, normalization and level, clipping percentiles, T, tau and the ratio; the chart shows the
# kept fraction per layer, the line below it the achieved ratio and the number of extreme blocks.
# `state["plan"]` is the plan on display (e.g. `apply_plan(model, state["plan"])`).

# %%
box, state = panel(rescorer, PRESETS["taylor"], ratio=RATIO)
box

# %% [markdown]
# ### Perplexity after pruning under each setting (each on a fresh copy of the model)

# %%
dense = perplexity(model, tokenizer, seq_len=SEQ_LEN, max_windows=EVAL_WINDOWS)
comparison["ppl"] = perplexity_of_plans(model, tokenizer, plans, seq_len=SEQ_LEN, max_windows=EVAL_WINDOWS)
print(f"dense PPL {dense.ppl:.2f}")
plots.styled(comparison[["n_extreme", "mlp_max_pruned", "mlp_std_pruned", "ppl"]].sort_values("ppl"))

# %%
plots.publish(plots.ppl_bars, comparison.ppl, dense=dense.ppl, title=f"{METHOD}: PPL after pruning {RATIO:.0%} of all parameters",
              name=f"ppl_by_setting_{METHOD}_{RATIO:g}", to=exp)

# %%
exp.write_table("analysis/normalization_comparison.csv", comparison.reset_index())
exp.write_table("analysis/block_removal_loss.csv", block_loss)
exp.write_json("evaluation/perplexity.json", plans_record(dense, comparison.ppl, plans, ratio=RATIO, method=METHOD))
