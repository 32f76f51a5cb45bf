import math

import pytest
import torch
import torch.nn.functional as F

from workbench.core.testing import tiny_model
from workbench.data.text import evaluation_windows
from workbench.evaluation.evaluate import perplexity


def test_perplexity_equals_exp_mean_token_nll(tokenizer):
    model = tiny_model("llama", vocab_size=260)
    res = perplexity(model, tokenizer, "pydoc", seq_len=32, max_windows=5, batch_size=2, progress=False)
    windows = evaluation_windows(tokenizer, "pydoc", 32, 5)
    nlls = []
    with torch.no_grad():
        for w in windows:  # one window at a time, token by token log-softmax
            logp = torch.log_softmax(model(w[None]).logits[0].double(), -1)
            nlls += [-logp[t, w[t + 1]].item() for t in range(31)]
    expected = math.exp(sum(nlls) / len(nlls))
    assert math.isclose(res.ppl, expected, rel_tol=1e-5)
    assert (res.windows, res.tokens, res.seq_len, res.split, res.source) == (5, 5 * 31, 32, "evaluation", "pydoc")
    assert res.model == "tiny-llama"


def test_perplexity_after_prunes_a_copy(tokenizer):
    from workbench.core.arch import layer_widths
    from workbench.core.models import parameter_count
    from workbench.core.testing import tiny_model
    from workbench.evaluation.evaluate import perplexity_after
    from workbench.plans.plan import random_plan
    from workbench.surgery.prune import apply_plan

    model = tiny_model("qwen2", n_layers=3)
    plan = random_plan(layer_widths(model), 0.4, seed=1, empty_blocks=1)
    before = parameter_count(model)
    got = perplexity_after(model, tokenizer, plan, seq_len=32, max_windows=3, progress=False)
    assert parameter_count(model) == before
    reference = tiny_model("qwen2", n_layers=3)
    apply_plan(reference, plan)
    want = perplexity(reference, tokenizer, seq_len=32, max_windows=3, progress=False)
    assert got.ppl == pytest.approx(want.ppl, rel=1e-6)


@pytest.mark.slow
def test_lm_eval_accuracy_matches_the_models_loglikelihoods(tokenizer):
    import json

    from workbench.evaluation.zeroshot import LOCAL_TASKS, ZeroShotConfig, zero_shot

    model = tiny_model("mistral", n_layers=2, seed=3)
    n = 16
    res = zero_shot(model, tokenizer, ZeroShotConfig(tasks=("pydoc_cloze",), limit=n, batch_size=4), progress=False)
    docs = [json.loads(line) for line in LOCAL_TASKS["pydoc_cloze"].with_suffix(".jsonl").read_text().splitlines()[:n]]
    hits, hits_norm = 0, 0
    with torch.no_grad():
        for d in docs:
            ctx = tokenizer(d["context"], add_special_tokens=False)["input_ids"]
            lls = []
            for choice in d["choices"]:
                whole = tokenizer(d["context"] + " " + choice, add_special_tokens=False)["input_ids"]
                logp = F.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
                lls.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole))))
            hits += max(range(4), key=lambda i: lls[i]) == d["label"]
            hits_norm += max(range(4), key=lambda i: lls[i] / len(d["choices"][i])) == d["label"]
    task = res.tasks["pydoc_cloze"]
    assert task["samples"] == n and task["version"] is not None and res.lm_eval_version
    assert task["acc"] == pytest.approx(hits / n) and task["acc_norm"] == pytest.approx(hits_norm / n)
    assert res.mean_acc == task["acc"]


def test_zero_shot_settings_are_checked(tmp_path):
    from workbench.evaluation.zeroshot import ZeroShotConfig, resolve_task

    with pytest.raises(ValueError, match="limit=0"):
        ZeroShotConfig(limit=0)
    assert resolve_task("boolq") == "boolq"
    local = resolve_task("pydoc_cloze")
    assert local["dataset_kwargs"]["data_files"]["test"].endswith("workbench/tasks/pydoc_cloze.jsonl")
    (tmp_path / "t.yaml").write_text("task: t\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: gone.jsonl\n")
    with pytest.raises(FileNotFoundError, match="gone.jsonl"):
        resolve_task(tmp_path / "t.yaml")


def test_results_record_and_table(tokenizer, tmp_path):
    from workbench.core.experiments import Experiment
    from workbench.evaluation.efficiency import EfficiencyConfig, measure
    from workbench.evaluation.evaluate import model_entry, results_record, results_table

    model = tiny_model("llama", n_layers=2)
    ppl = perplexity(model, tokenizer, seq_len=32, max_windows=2, progress=False)
    eff = measure(model, EfficiencyConfig(prompt_len=8, new_tokens=2, warmup=0, repeats=1))
    rec = results_record({"dense": model_entry(model, perplexity=ppl, efficiency=eff)})
    assert rec["versions"]["torch"] == torch.__version__.split("+")[0] or rec["versions"]["torch"].startswith(
        torch.__version__.split("+")[0])
    assert rec["versions"]["lm-eval"] and rec["models"]["dense"]["model_hash"]
    exp = Experiment.create("r", base=tmp_path)
    exp.write_json("evaluation/evaluation_results.json", rec)
    table = results_table(exp.read_json("evaluation/evaluation_results.json"))
    assert table.loc["ppl", "dense"] == pytest.approx(ppl.ppl)
    assert table.loc["kv_cache_bytes_per_token", "dense"] == eff["kv_cache_bytes_per_token"]
    with pytest.raises(ValueError, match="empty"):
        results_record({})


def test_plans_record_is_one_shape_for_a_series_or_a_dict_and_names_missing_plans():
    import pandas as pd

    from workbench.evaluation.evaluate import plans_record
    from workbench.plans.plan import Plan, PlanProvenance

    plan = Plan.from_units([(2, 8)], {"mlp": {0: [0, 1]}}, target_params=20, selected_params=20, denominator=100,
                           provenance=PlanProvenance("global", method="taylor"))
    a = plans_record(None, pd.Series({"p": 12.5}), {"p": plan}, ratio=0.2)
    b = plans_record(None, {"p": 12.5}, {"p": plan}, ratio=0.2)
    assert a == b and a["plans"]["p"]["label"] == "taylor" and a["plans"]["p"]["achieved_ratio"] == 0.2
    assert a["settings"] == {"ratio": 0.2} and a["dense"] is None
    with pytest.raises(ValueError, match=r"results for \['q'\] without their plans"):
        plans_record(None, {"q": 3.0}, {"p": plan})
