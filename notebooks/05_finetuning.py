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
# # 05 · Recovery by LoRA (or full) fine-tuning
#
# Prunes the default model globally (Taylor, `RATIO` of all parameters, then the closed-form reconstruction
# of notebook 04 unless `RECONSTRUCT = False`; or loads the pruned checkpoint of an earlier experiment), then
# trains LoRA adapters through peft on every linear of attention and MLP —
# each layer's adapters take that layer's own pruned shapes — and merges them into the weights. The result
# is saved in the same pruned-checkpoint format and reloads exactly.
#
# Training text is the *calibration* part of the offline corpus (never its evaluation part); with internet,
# `DATA = "alpaca"` trains on Alpaca-style instructions (prompt tokens masked). A stopped run resumes from
# `checkpoints/` of the experiment when the cell is run again with the same settings.
#
# Expected runtime on 2 CPU cores with SmolLM2-135M: 11.2 min with the defaults (100 LoRA steps); smoke mode: seconds.

# %% tags=["parameters"]
MODEL = None
SMOKE = False
PRUNED_EXPERIMENT = None  # name of an experiment whose model/ holds a pruned checkpoint; None: prune here
RATIO = 0.2
IMPORTANCE = "taylor"     # when pruning here: the importance method of the global plan
NUM_SAMPLES = 64
CALIB_SEQ_LEN = 128       # when pruning here: calibration window length
RECONSTRUCT = True        # when pruning here: closed-form reconstruction first (notebook 04), then training
METHOD = "lora"           # "lora" or "full"
DATA = "pydoc"            # a text source (calibration part), "alpaca", or a .json/.jsonl instruction file
MAX_STEPS = 100
SEQ_LEN = 128
BATCH_SIZE = 4
GRAD_ACCUM = 2
LR = 2e-4
LORA_R = 8
EVAL_EVERY = 20
EVAL_WINDOWS = 50
EVAL_SEQ_LEN = 128        # perplexity windows: the same protocol as notebooks 04 and 06
EXPERIMENT = "nb05-finetuning"

# %%
import pandas as pd
import torch

from workbench import (
    CalibrationConfig,
    Experiment,
    FinetuneConfig,
    ReconstructConfig,
    SelectionConfig,
    finetune,
    load,
    perplexity,
    plots,
    pruned_model,
    recovery_table,
    save_and_check,
    timed,
)

# %%
model, tokenizer = load(MODEL, SMOKE)  # SMOKE: a tiny random model (seconds; what the tests run)

# %%
exp = Experiment.create(EXPERIMENT, exist_ok=True)
ppl = lambda m: perplexity(m, tokenizer, seq_len=EVAL_SEQ_LEN, max_windows=EVAL_WINDOWS)  # one protocol for all three
dense_ppl = ppl(model)
model, plan = pruned_model(model, tokenizer, experiment=PRUNED_EXPERIMENT, method=IMPORTANCE,
                           calibration=CalibrationConfig(num_samples=NUM_SAMPLES, seq_len=CALIB_SEQ_LEN),
                           selection=SelectionConfig(ratio=RATIO),
                           reconstruction=ReconstructConfig() if RECONSTRUCT else None)
pruned_ppl = ppl(model)
print(f"dense PPL {dense_ppl.ppl:.2f} → pruned {pruned_ppl.ppl:.2f}")

# %% [markdown]
# ### Fine-tune (progress bar shows the training and held-out loss)

# %%
cfg = FinetuneConfig(method=METHOD, data=DATA, max_steps=MAX_STEPS, seq_len=SEQ_LEN, batch_size=BATCH_SIZE,
                     grad_accum=GRAD_ACCUM, lr=LR, lora_r=LORA_R, lora_alpha=2 * LORA_R,
                     eval_every=EVAL_EVERY, save_every=EVAL_EVERY, warmup_steps=max(1, MAX_STEPS // 10))
with timed("fine-tuning"):
    result = finetune(model, tokenizer, cfg, exp.checkpoints)
model = result.model
pd.Series(result.summary()).drop("config")

# %%
plots.publish(plots.loss_curve, result.history, result.evals, title=f"{METHOD} on the pruned model", name="loss_curve", to=exp)

# %%
recovered_ppl = ppl(model)
recovery_table(dense_ppl, pruned_ppl, recovered_ppl, f"pruned + {METHOD}")

# %% [markdown]
# ### Save the merged model in the pruned-checkpoint format and check the reload

# %%
probe = torch.randint(0, len(tokenizer), (2, 32))
print("reload max |Δlogit|:", save_and_check(model, exp, probe, tokenizer=tokenizer, plan=plan))

# %%
exp.write_json("config.json", dict(finetune=cfg.to_dict(), pruned_experiment=PRUNED_EXPERIMENT, ratio=RATIO,
                                   reconstruct=RECONSTRUCT and PRUNED_EXPERIMENT is None))
exp.write_table("analysis/loss_history.csv", result.history)
exp.write_table("analysis/eval_loss.csv", result.evals)
exp.write_json("evaluation/finetune.json", dict(summary=result.summary(), dense=dense_ppl.to_dict(),
                                                pruned=pruned_ppl.to_dict(), recovered=recovered_ppl.to_dict()))
