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
# # 02 · Outliers and weight / activation distributions, next to the pruning decisions
#
# LLMs carry outliers: a few weights far from the bulk, a few hidden dimensions whose activations are orders
# of magnitude above the rest ("massive activations"), channels LLM.int8 must treat apart (|x| > 6).
# Removing a unit that carries them breaks the model, and layers rich in outliers tolerate less pruning
# (OWL). This notebook shows both and links them to a pruning plan:
#
# 1. weights per layer and module: std, kurtosis, max |w| / σ, share beyond k·σ; histograms on a log count axis;
# 2. activations over the calibration data, streamed and cached: per hidden dimension max |x| and how often it
#    exceeds the threshold, massive activations, dimensions that are outliers in many layers;
# 3. the outlier units a global plan removes (warning), and an OWL-style per-layer allocation:
#    each layer's ratio shrinks with its outlier ratio (share of |w|·‖x‖ above M × the layer mean), kept within
#    ±λ of the global ratio, mean equal to it.
#
# Expected runtime on 2 CPU cores with SmolLM2-135M: 2.4 min with the importance pass cached (activation statistics 65 s); smoke mode: seconds.

# %% tags=["parameters"]
MODEL = None
SMOKE = False
NUM_SAMPLES = 64       # the calibration setting 01, 03, 04 and 05 use: one importance pass (cached) serves them all
SEQ_LEN = 128
THRESHOLD = 6.0       # |activation| counted as an outlier (LLM.int8)
K_SIGMA = 6.0         # weight statistics: share of |w - mean| beyond K_SIGMA · std
METHOD = "taylor"
RATIO = 0.2           # of all parameters
OWL_M = 5.0
OWL_LAMBDA = 0.08
OWL_MIN_UNITS = 1     # each block keeps its N best units under OWL's per-layer ratios (0: blocks may empty)
EVAL_WINDOWS = 50
EXPERIMENT = "nb02-outliers"

# %%
from workbench import (
    Budget,
    CalibrationConfig,
    Experiment,
    SelectionConfig,
    activation_stats,
    build_table,
    calibration_samples,
    compare_allocation,
    importance_cached,
    layer_outlier_ratio,
    layer_summary,
    load,
    owl_plan,
    perplexity_of_plans,
    plan_outliers,
    plans_record,
    plots,
    select,
    timed,
    unit_outliers,
    warn_removed_outliers,
    weight_histograms,
    weight_stats,
)

# %%
model, tokenizer = load(MODEL, SMOKE)  # SMOKE: a tiny random model (seconds; what the tests run)

# %% [markdown]
# ### Weights

# %%
exp = Experiment.create(EXPERIMENT, exist_ok=True)
wstats = weight_stats(model, k_sigma=K_SIGMA)
wstats.sort_values("max_over_std", ascending=False).head(10)

# %%
plots.publish(plots.outlier_heatmap, wstats, "max_over_std", name="weight_outliers", to=exp)

# %%
plots.outlier_heatmap(wstats, "kurtosis", log=False)

# %%
whist = weight_histograms(model)
plots.publish(plots.weight_distribution, whist, name="weight_distribution", to=exp)

# %% [markdown]
# ### Activations (one streamed pass, cached under `data_cache/outliers/`)

# %%
calib = CalibrationConfig(num_samples=NUM_SAMPLES, seq_len=SEQ_LEN)
samples = calibration_samples(tokenizer, calib)
with timed("activation statistics"):
    acts = activation_stats(model, samples, batch_size=calib.batch_size, threshold=THRESHOLD)
acts.massive("residual")  # every layer: the largest values sit in the later layers

# %%
print(f"hidden dimensions beyond |x| > {THRESHOLD} in at least 2 layers (residual stream):")
acts.outlier_dims("residual", min_layers=2).head(10)

# %%
plots.publish(plots.activation_magnitude, acts.frame("residual"), title="residual stream: max |x| per dimension",
              name="activation_magnitude", to=exp)

# %% [markdown]
# ### The outlier units of a global plan

# %%
imp = importance_cached(model, samples, batch_size=calib.batch_size)
budget = Budget.of(model)
table = build_table(imp.scores(METHOD), budget.costs)
plan = select(table, budget, SelectionConfig(ratio=RATIO))
units = unit_outliers(model, acts)  # massive channel: ≥ 10 × its block's median; outlier weight: > 16 σ
summary, _ = plan_outliers(plan, units)
summary

# %%
flagged = warn_removed_outliers(plan, units)
flagged.head(20)

# %% [markdown]
# ### OWL-style allocation against the plain global plan (same number of parameters)

# %%
lod = layer_outlier_ratio(model, acts, m=OWL_M)
owl = owl_plan(table, budget, lod, RATIO, lam=OWL_LAMBDA, min_units_per_block=OWL_MIN_UNITS)
owl_free = owl_plan(table, budget, lod, RATIO, lam=OWL_LAMBDA, min_units_per_block=0)  # blocks may empty
print("OWL emptied blocks:", owl.emptied_blocks(), "; without protection:", owl_free.emptied_blocks())
allocation = compare_allocation(plan, owl, budget, lod)
ratios = allocation.owl_pruned
print(f"global plan removes {plan.selected_params / budget.prunable_params:.2%} of attention+MLP; OWL removes "
      f"{owl.selected_params / budget.prunable_params:.2%}, per layer [{ratios.min():.2%}, {ratios.max():.2%}]")
plots.pruned_fraction_by_setting({"global": layer_summary(plan), "OWL": layer_summary(owl)},
                                 title="global vs OWL allocation")

# %%
compared = {"global": plan, f"OWL (min {OWL_MIN_UNITS} unit/block)": owl, "OWL (blocks may empty)": owl_free}
ppl = perplexity_of_plans(model, tokenizer, compared, seq_len=SEQ_LEN, max_windows=EVAL_WINDOWS)
ppl

# %%
exp.write_table("analysis/weight_stats.csv", wstats)
exp.write_table("analysis/massive_activations.csv", acts.massive("residual"))
exp.write_table("analysis/outlier_dims.csv", acts.outlier_dims("residual", min_layers=2))
exp.write_table("analysis/plan_outliers.csv", summary)
exp.write_table("analysis/owl_allocation.csv", allocation)
exp.write_json("evaluation/perplexity.json", plans_record(None, ppl, compared, ratio=RATIO, method=METHOD, owl_m=OWL_M,
                                                      owl_lambda=OWL_LAMBDA, owl_min_units=OWL_MIN_UNITS))
