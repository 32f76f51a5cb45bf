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
# # 04 · Global GQA-aware pruning
#
# One calibration pass computes every importance method at once (cached: re-running a cell or switching
# the method costs no forward pass). Units are whole GQA groups (one KV head with its query heads) and
# MLP channels; each has an exact parameter cost, and the lowest `score = importance / cost` units across
# all layers are removed until the budget is met (a fractional knapsack). Blocks left empty add nothing to
# the residual stream; layers with both blocks empty are removed.
#
# Expected runtime on 2 CPU cores with SmolLM2-135M: 106 s with the importance pass cached (≈ 50 s more without); smoke mode: seconds.

# %% tags=["parameters"]
MODEL = None
SMOKE = False
METHOD = "taylor"       # see IMPORTANCE_METHODS below; "refit": the loss a unit costs once the kept units are re-fitted
REFIT_SCORES = True     # the pass also computes the re-fit score (≈ 1.8× its time), so the panel offers "refit"
RATIO = 0.2
RATIO_OF = "total"      # "total": all parameters; "prunable": attention + MLP parameters
MIN_UNITS_PER_BLOCK = 0 # 0 lets blocks empty (depth pruning)
NUM_SAMPLES = 64
SEQ_LEN = 128
EVAL_WINDOWS = 50
RECONSTRUCT = True      # re-fit o_proj / down_proj of pruned blocks in closed form after pruning (no training)
DAMPING = 1e-4          # ridge λ of the reconstruction (× mean diagonal of the normal equations)
TOWARD = "zero"         # what that ridge pulls the re-fit toward: "zero", or "dense" (with DAMPING = 0.1: carries
                        # better out of the calibration domain; the re-fit scores assume the same ridge)
CV_FOLDS = 4            # each block's ridge chosen by 4-fold cross-validation over the calibration batches (better
                        # in and out of domain, README); 0: every block with DAMPING / TOWARD
RECONSTRUCT_SAMPLES = 128  # calibration samples of the reconstruction (more tokens: a better fit)
BLOCK_LOSS_SAMPLES = 16  # calibration samples for the block-removal loss the panel measures on request
USE_PANEL_PLAN = False  # True: prune with the plan the panel below shows (after trying settings there)
EXPERIMENT = "nb04-global-pruning"

# %%
import pandas as pd

from workbench import (
    IMPORTANCE_METHODS,
    Budget,
    CalibrationConfig,
    Experiment,
    ReconstructConfig,
    Rescorer,
    ScoringConfig,
    SelectionConfig,
    anatomy,
    block_removal_loss,
    calibrate,
    calibration_samples,
    layer_summary,
    load,
    panel,
    perplexity,
    perplexity_after,
    plans_record,
    plots,
    prune_and_reconstruct,
    record_plan,
    save_and_check,
    select_plan,
    timed,
)

pd.DataFrame([(m.name, m.description) for m in IMPORTANCE_METHODS.values()], columns=["method", "what"])

# %%
model, tokenizer = load(MODEL, SMOKE)  # SMOKE: a tiny random model (seconds; what the tests run)

# %%
exp = Experiment.create(EXPERIMENT, exist_ok=True)
dense_anatomy = anatomy(model)  # kept for the dense-vs-pruned parameter figure
dense_ppl = perplexity(model, tokenizer, seq_len=SEQ_LEN, max_windows=EVAL_WINDOWS)
dense_ppl

# %% [markdown]
# ### One calibration pass (cached on disk under `data_cache/importance/`)

# %%
with timed("importance pass"):
    samples, imp = calibrate(model, tokenizer, CalibrationConfig(num_samples=NUM_SAMPLES, seq_len=SEQ_LEN,
                                                                 refit=REFIT_SCORES, refit_damping=DAMPING,
                                                                 refit_toward=TOWARD))
print(f"{imp.acc.batches} batches, {imp.acc.tokens} tokens; the pass took {imp.seconds:.1f} s (cached since)")

# %% [markdown]
# ### The global table (one row per unit) and the plan selected from it

# %%
selection = SelectionConfig(ratio=RATIO, ratio_of=RATIO_OF, min_units_per_block=MIN_UNITS_PER_BLOCK)
table, plan = select_plan(model, imp, METHOD, selection)
plots.styled(table.nsmallest(15, "score"))

# %%
summary = record_plan(exp, table, plan)
print(f"target {plan.target_params:,} of {plan.denominator:,} ({RATIO_OF}); selected {plan.selected_params:,}")
print("emptied blocks:", plan.emptied_blocks(), " removed layers:", plan.removed_layers())
plots.publish(plots.kept_fraction_per_layer, summary, title=f"{METHOD}, {RATIO:.0%} of {RATIO_OF}: kept fraction per layer",
              name=f"kept_fraction_{METHOD}_{RATIO:g}", to=exp)

# %% [markdown]
# ### Decide here: the panel
#
# Every change re-scores from the cached importance (milliseconds). The dashed lines are the plan above
# ("pin as reference" replaces them by the plan on display, to compare with the previous setting); the
# title names the settings; the preset switches to "(custom)" after a manual edit. "Evaluate PPL" prunes a
# copy by the plan on display (about a minute on the default model); "Save plan" writes it into this
# experiment (`analysis/panel_plan.json`). With `USE_PANEL_PLAN = True` the cells below prune by it. T and
# tau need each block's removal loss: "compute block-removal loss" measures it here (cached; one pass per block).

# %%
rescorer = Rescorer(imp, Budget.of(model))
box, state = panel(rescorer, ScoringConfig(method=METHOD), ratio=RATIO, reference=plan,
                   reference_name=f"{METHOD} {RATIO:.0%}",
                   evaluate=lambda p: perplexity_after(model, tokenizer, p, seq_len=SEQ_LEN, max_windows=EVAL_WINDOWS,
                                                       progress=False).ppl,
                   save=lambda p: exp.write_json("analysis/panel_plan.json", p.to_dict()),
                   block_loss=lambda: block_removal_loss(model, samples[:BLOCK_LOSS_SAMPLES], progress=False))
box

# %% [markdown]
# The plan on display as a static figure (a saved notebook keeps it; re-run this cell after a change).

# %%
plots.export(plots.kept_fraction_per_layer(layer_summary(state["plan"]), backend="paper", title=state["title"]),
             state["figure_name"], exp)
plan = state["plan"] if USE_PANEL_PLAN else plan

# %% [markdown]
# ### Prune physically, then reconstruct
#
# Pruning removes the units' columns from `o_proj` / `down_proj`. Reconstruction re-fits the kept columns
# (and an output bias) so each pruned block's output matches the dense block's output on calibration tokens:
# ridge least squares in closed form, from one dense pass, no training (`workbench.surgery.reconstruct`). Its
# statistics are taken before the model is pruned in place, and cached. Set `RECONSTRUCT = False` to compare.
# With `CV_FOLDS` each block chooses its own ridge by cross-validation: `rec.ridge_counts()` says which.

# %%
rec_cfg = (ReconstructConfig(cv_folds=CV_FOLDS) if CV_FOLDS else ReconstructConfig(damping=DAMPING, toward=TOWARD)
           ) if RECONSTRUCT else None
rec_samples = calibration_samples(tokenizer, CalibrationConfig(num_samples=RECONSTRUCT_SAMPLES, seq_len=SEQ_LEN))
report, rec = prune_and_reconstruct(model, plan, rec_samples, rec_cfg)
print("ridges chosen by cross-validation:", rec.ridge_counts() if rec else None)
pruned_ppl = perplexity(model, tokenizer, seq_len=SEQ_LEN, max_windows=EVAL_WINDOWS)
pd.DataFrame({"dense": [dense_ppl.ppl, report.params_before], "pruned": [pruned_ppl.ppl, report.params_after]},
             index=["perplexity", "parameters"]).style.format("{:,.2f}", subset=(["perplexity"], slice(None))).format(
    "{:,.0f}", subset=(["parameters"], slice(None)))

# %%
plots.publish(plots.params_per_layer, dense_anatomy, pruned=anatomy(model), removed_layers=plan.removed_layers(),
              title=f"parameters per layer: dense (outline) and {METHOD} {RATIO:.0%}",
              name=f"params_dense_vs_pruned_{METHOD}_{RATIO:g}", to=exp)

# %%
print(f"achieved: {report.ratio_total:.2%} of all parameters, {report.ratio_prunable:.2%} of attention+MLP")
print("reload max |Δlogit|:", save_and_check(model, exp, samples[:2], tokenizer=tokenizer, plan=plan, report=report))

# %%
exp.write_json("evaluation/perplexity.json", plans_record(dense_ppl, {"pruned": pruned_ppl}, {"pruned": plan},
                                                      method=METHOD, ratio=RATIO, ratio_of=RATIO_OF,
                                                      report=report.to_dict(),
                                                      reconstruction=rec.summary() if rec else None))
