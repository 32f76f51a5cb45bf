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
# # 01 · Gradient diagnosis: how different are the layers' scales?
#
# A global ranking compares units across layers, so it is only fair if their importance is on one scale.
# Gradient magnitudes can differ by orders of magnitude between layers; then a plain global plan empties a
# few layers almost completely. This notebook measures that from one cached calibration pass:
#
# * per layer and block (attention, MLP): mean |g|, gradient norm, max |g|, share of zero gradients, and the
#   importance statistics, on log axes;
# * `mean_ratio` / `norm_ratio`: largest over smallest per-layer mean |g| / gradient norm;
# * the *extreme blocks* of a naive global plan: blocks whose pruned fraction exceeds `THRESHOLD`;
# * the recommendation by the GAQ-Aware-Prune study's rules of thumb, with the rule that fired: mean_ratio > 1000 → log normalization; more than 5
#   extreme blocks → log + percentile clipping; 100–1000 → minmax or sqrt; < 100 → none, or temperature 1.
#
# Everything is written to `analysis/gradient_diagnosis.json` in the experiment directory.
#
# Expected runtime on 2 CPU cores with SmolLM2-135M: 79 s with the importance pass run cold (62 s of it, cached afterwards); smoke mode: seconds.

# %% tags=["parameters"]
MODEL = None
SMOKE = False
METHOD = "taylor"       # importance method of the naive plan
RATIO = 0.2             # of all parameters
THRESHOLD = 0.9         # a block pruned beyond this fraction is "extreme"
NUM_SAMPLES = 64
SEQ_LEN = 128
FISHER = "batch"        # "sequence": also the per-sequence Fisher (one backward per window; taylor2_seq, fisher_seq)
EXPERIMENT = "nb01-gradient-diagnosis"

# %%
import pandas as pd

from workbench import (
    Budget,
    CalibrationConfig,
    Experiment,
    Rescorer,
    ScoringConfig,
    SelectionConfig,
    available_methods,
    calibrate,
    diagnose,
    layer_summary,
    load,
    plots,
    taylor_terms,
    timed,
)

# %%
model, tokenizer = load(MODEL, SMOKE)  # SMOKE: a tiny random model (seconds; what the tests run)

# %%
exp = Experiment.create(EXPERIMENT, exist_ok=True)
calib = CalibrationConfig(num_samples=NUM_SAMPLES, seq_len=SEQ_LEN, fisher=FISHER)
with timed("importance pass (cached after the first run)"):
    _, imp = calibrate(model, tokenizer, calib)
rescorer = Rescorer(imp, Budget.of(model))
_, naive = rescorer.plan(ScoringConfig(method=METHOD), SelectionConfig(ratio=RATIO))
diag = diagnose(imp, naive, METHOD, THRESHOLD, costs=rescorer.budget.costs)
per_block = pd.DataFrame(diag["per_block"])
per_block.round(6).head(10)

# %% [markdown]
# ### Scales per layer (log axes)

# %%
plots.publish(plots.scale_per_layer, per_block, columns=("grad_mean_abs", "imp_mean", "score_mean"),
              title=f"{METHOD}: gradient and importance scale per layer", name=f"scale_per_layer_{METHOD}", to=exp)

# %%
print(f"mean_ratio = {diag['mean_ratio']:.1f} (largest layer {diag['max_mean_layer']}, smallest {diag['min_mean_layer']})")
print(f"norm_ratio = {diag['norm_ratio']:.1f}")
print(f"share of zero gradients: max {per_block.grad_zero_share.max():.2%}")

# %% [markdown]
# ### The naive global plan and its extreme blocks

# %%
print(f"{diag['n_extreme']} blocks pruned beyond {THRESHOLD:.0%}")
display(pd.DataFrame(diag["extreme_blocks"]))
plots.publish(plots.kept_fraction_per_layer, layer_summary(naive), title=f"naive {METHOD} plan, {RATIO:.0%} of all parameters",
              name=f"naive_kept_fraction_{METHOD}_{RATIO:g}", to=exp)

# %% [markdown]
# Every importance method under the same budget, no correction:

# %%
by_method, _ = rescorer.compare({m: ScoringConfig(method=m) for m in available_methods(imp)}, SelectionConfig(ratio=RATIO),
                                THRESHOLD)
plots.styled(by_method[["n_extreme", "emptied_blocks", "removed_layers", "attn_max_pruned", "mlp_max_pruned", "mlp_std_pruned"]])

# %% [markdown]
# ### Second-order Taylor: the size of each term
# `taylor2` adds ½Σw²F to Σ|w·g|. With F from batch-mean gradients the second term is typically orders of
# magnitude smaller, so it cannot change the ranking; the per-sequence Fisher (`FISHER = "sequence"`) is larger.

# %%
terms = taylor_terms(imp)
display(terms.round(6).head(10))
plots.scale_per_layer(terms, columns=("first", "second_batch", "batch_over_first"), title="Taylor terms per layer")

# %% [markdown]
# ### Recommendation

# %%
rec = diag["recommendation"]
print(rec["rule"])
print({k: v for k, v in rec.items() if k != "rule"})

# %%
exp.write_json("analysis/gradient_diagnosis.json", diag)
exp.write_table("analysis/extreme_by_method.csv", by_method.reset_index())
exp.write_table("analysis/taylor_terms.csv", terms)
