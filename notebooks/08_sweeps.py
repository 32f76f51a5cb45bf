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
# # 08 · Sweeps: the study's matrix as one table, best configurations and correlations
#
# A sweep file (`configs/*.yaml`: a base run and a grid or an Optuna search) runs with
# `workbench sweep FILE [--workers N]` (or as a cluster job array: `workbench launch`); this notebook reads its consolidated table (or runs the sweep when
# `RUN = True`), plots PPL / accuracy against the calibration settings per method and model, compares the
# methods, computes the correlations with their n and p-values, and shows the best configurations.
# Expected runtime: seconds for an existing sweep; running `configs/smollm2-small-matrix.yaml` here takes
# ≈ 10 min on 2 CPU cores; smoke mode (a tiny random model): ≈ 1 min.

# %% tags=["parameters"]
SMOKE = False
SWEEP = "../configs/smollm2-small-matrix.yaml"   # the sweep file
SWEEP_DIR = None          # None: experiments/sweeps/<file name>
RUN = False               # run (or resume) the sweep from here first
OBJECTIVE = "ppl"         # a column of the table: ppl, ppl_finetuned, acc_mean, ...
DIRECTION = "minimize"
X = "cfg.calibration.num_samples"   # the setting on the x axis
FACET_BY = "method"

# %%
from pathlib import Path

from workbench import best, consolidate, correlations, experiments_root, plots, queue_status, run_sweep

SWEEP = "../configs/smoke-sweep.yaml" if SMOKE else SWEEP
RUN = RUN or SMOKE
sweep_dir = Path(SWEEP_DIR) if SWEEP_DIR else experiments_root() / "sweeps" / Path(SWEEP).stem
if RUN:
    run_sweep(SWEEP, sweep_dir)
table = consolidate(sweep_dir)
print(f"{sweep_dir}: {len(table)} runs, {(table.status == 'complete').sum()} complete, {(table.status == 'failed').sum()} failed")
table[["key", "status", "model", "method", X, "cfg.selection.ratio", "ppl", "pruning_ratio_total"]].sort_values(["method", X])

# %% [markdown]
# ### The queue while a sweep runs (on many machines: `workbench launch`, README "On a Slurm cluster")
# What waits and what runs where; a worker taken for dead has its run queued again. Empty when nothing is left.

# %%
queue_status(sweep_dir).query("state in ['waiting', 'running']")

# %% [markdown]
# ### The objective against the calibration setting, per method (one panel per model)

# %%
plots.publish(plots.sweep_metric, table, X, OBJECTIVE, by=FACET_BY, name=f"{sweep_dir.name}_{OBJECTIVE}_vs_setting")

# %% [markdown]
# ### Methods compared (best and mean of the objective per model and ratio)

# %%
summary = best(sweep_dir, OBJECTIVE, DIRECTION, table=table)
print(summary["report"])
pivot = table[table.status == "complete"].pivot_table(index="method", columns=["model", "ratio"], values=OBJECTIVE, aggfunc="min")
plots.grouped_bars(pivot, ylabel=f"best {OBJECTIVE}", title=f"best {OBJECTIVE} per method", log_y=True)

# %% [markdown]
# ### Correlations (complete runs; Pearson and Spearman with n and p-values)

# %%
corr = correlations(table)
display(corr.round(4))
plots.publish(plots.correlation_scatter, table, "grad_mean_ratio", OBJECTIVE, name=f"{sweep_dir.name}_correlation")
