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
# # 06 · Evaluation: dense vs pruned vs recovered
#
# Perplexity (one protocol for all), zero-shot accuracy through lm-evaluation-harness on the models in
# memory, and efficiency measured side by side with the same prompts and settings (warm-up, repeats,
# median). Everything goes to `evaluation/evaluation_results.json` with each model's hash and the library
# versions.
#
# Zero-shot tasks: the GAQ-Aware-Prune study's seven (`STUDY_TASKS`: BoolQ, PIQA, HellaSwag, WinoGrande, ARC-Easy,
# ARC-Challenge, OpenBookQA) need the hub; offline, the project's own `pydoc_cloze` task (sentence
# completion on the evaluation part of the offline corpus, 4 choices, chance 25 %) runs the same way, and any
# local task YAML path works too.
#
# Expected runtime on 2 CPU cores with SmolLM2-135M: 5.1 min (zero-shot and efficiency of 3 models; GGUF export and llama.cpp runs 70 s); smoke mode: seconds.

# %% tags=["parameters"]
MODEL = None
SMOKE = False
PRUNED_EXPERIMENT = "nb04-global-pruning"   # its model/ is the pruned model
RECOVERED_EXPERIMENT = "nb05-finetuning"    # its model/ is the fine-tuned model (None to skip)
TASKS = ["pydoc_cloze"]                     # or list(STUDY_TASKS) with internet
LIMIT = None                                # examples per task (None = all)
EVAL_WINDOWS = 50
EVAL_SEQ_LEN = 128                          # perplexity windows: the same protocol as notebooks 04 and 05
PROMPT_LEN = 128
NEW_TOKENS = 32
GGUF_DTYPE = "f16"                          # GGUF export for llama.cpp: "f16", "q8_0" or "f32" (None to skip)
EXPERIMENT = "nb06-evaluation"

# %%
from workbench import (
    EfficiencyConfig,
    Experiment,
    ZeroShotConfig,
    accuracy_table,
    efficiency_ratios,
    evaluate_models,
    evaluation_windows,
    experiment_models,
    export_models,
    llamacpp,
    load,
    plots,
    results_table,
    timed,
)

# %%
model, tokenizer = load(MODEL, SMOKE)  # SMOKE: a tiny random model (seconds; what the tests run)

# %%
exp = Experiment.create(EXPERIMENT, exist_ok=True)
models, checkpoints = experiment_models({"pruned": PRUNED_EXPERIMENT, "recovered": RECOVERED_EXPERIMENT})
models = {"dense": model, **models}

# %%
record = evaluate_models(models, tokenizer, checkpoints=checkpoints, seq_len=EVAL_SEQ_LEN, max_windows=EVAL_WINDOWS,
                         zero_shot_cfg=ZeroShotConfig(tasks=tuple(TASKS), limit=LIMIT),
                         efficiency_cfg=EfficiencyConfig(prompt_len=PROMPT_LEN, new_tokens=NEW_TOKENS))
exp.write_json("evaluation/evaluation_results.json", record)
table = results_table(record)
table

# %%
acc = accuracy_table(table)
plots.publish(plots.grouped_bars, acc, ylabel="accuracy", title="zero-shot accuracy (acc)", name="zero_shot", to=exp)

# %%
efficiency_ratios(table)

# %%
plots.export(plots.ppl_bars(table.loc["ppl"].drop("dense"), backend="paper", dense=table.loc["ppl", "dense"],
                            title="perplexity (pydoc evaluation part)"), "perplexity", exp)

# %% [markdown]
# ## Outside this workbench: the same models in llama.cpp
#
# Each model is exported to GGUF (`export_gguf`; the CLI is `workbench export-gguf DIR OUT.gguf`): a model
# whose layers all have the same widths as the family's own llama.cpp architecture, a per-layer one as
# llama.cpp's `deci` architecture (per-layer head counts and MLP widths; emptied blocks included). llama.cpp
# then runs each file on this CPU: perplexity on the same evaluation windows as above, prompt (prefill) and
# generation tokens per second. The files stay in this experiment's `evaluation/gguf/`.

# %%
if GGUF_DTYPE:
    with timed("GGUF export"):
        gguf_files = export_models(models, tokenizer, exp.path("evaluation/gguf"), dtype=GGUF_DTYPE,
                                   checkpoints=checkpoints)
    windows = evaluation_windows(tokenizer, seq_len=EVAL_SEQ_LEN, max_windows=EVAL_WINDOWS).tolist()
    with timed("llama.cpp runs"):
        in_llamacpp = llamacpp.compare(gguf_files, windows, prompt_len=PROMPT_LEN, n_new=NEW_TOKENS)
    exp.write_table("evaluation/llamacpp.csv", in_llamacpp.reset_index())
    display(in_llamacpp.style.format({"size_mib": "{:,.1f}", "ppl": "{:,.2f}", "prompt_tok_s": "{:,.0f}",
                                      "gen_tok_s": "{:,.1f}"}))
