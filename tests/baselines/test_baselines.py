"""Layer importance, per-layer allocation, the Attention:MLP split and search, and the literature baselines:
every one a `Plan` that meets its stated budget rule, on tiny models of the four families."""
import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from workbench.analysis.comparison import Refused, baseline_plans, compare_plans
from workbench.analysis.distribution import best_split, xy_search
from workbench.baselines.registry import (
    BASELINES,
    REFIT_BASELINES,
    default_llm_pruner_range,
    depth_ratios,
    make_plan,
    shortgpt_plan,
    uses_refit_scores,
)
from workbench.core.arch import BLOCKS, decoder_layers, get_spec, layer_parts
from workbench.core.testing import TINY_FAMILIES, byte_tokenizer, tiny_model
from workbench.evaluation.evaluate import perplexity
from workbench.plans.allocation import ALLOCATIONS, LayerwiseConfig, allocate, kind_rates, layerwise_plan
from workbench.plans.normalize import ScoringConfig
from workbench.plans.rescore import Rescorer
from workbench.plans.selection import Budget, SelectionConfig
from workbench.scoring.importance import compute_importance
from workbench.scoring.layer_importance import LAYER_IMPORTANCE, block_influence, layer_importance, layer_removal_loss
from workbench.surgery.checkpoints import CheckpointError, load_pruned, loads_with_plain_transformers, save_pruned
from workbench.surgery.prune import apply_plan, mask_plan
from workbench.surgery.reconstruct import ReconstructConfig, prune_and_reconstruct, solve_reconstruction

N_LAYERS = 6


def _setup(family="llama", seed=0, **kw):
    model = tiny_model(family, n_layers=N_LAYERS, seed=seed, **kw)
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(seed))
    imp = compute_importance(model, ids, progress=False, refit=True)
    scores = {m: layer_importance(model, ids, m, cache=False, progress=False).to_numpy() for m in LAYER_IMPORTANCE}
    return model, ids, Rescorer(imp, Budget.of(model)), scores


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _max_unit(budget, block):
    return max(budget.costs[block])


# ---------------------------------------------------------------------------------------------- layer importance


def test_layer_importance_is_one_cached_value_per_layer(tmp_path):
    model = tiny_model("qwen2", n_layers=4)
    ids = torch.randint(0, 256, (4, 16))
    bi = block_influence(model, ids, cache=tmp_path, progress=False)
    loss = layer_removal_loss(model, ids, cache=tmp_path, progress=False)
    assert len(bi) == len(loss) == 4 and ((bi >= 0) & (bi <= 2)).all() and np.isfinite(loss).all()
    assert {p.parent.name for p in tmp_path.rglob("*.pt")} == {"block_influence", "layer_loss"}
    assert block_influence(model, ids, cache=tmp_path, progress=False).equals(bi)
    with pytest.raises(ValueError, match="measure='cosine'.*allowed"):
        layer_importance(model, ids, "cosine")


def test_block_influence_of_an_identity_layer_is_zero():
    model = tiny_model("llama", n_layers=3)
    spec = get_spec(model)
    with torch.no_grad():  # layer 1 adds nothing: its output projections are zero
        parts = layer_parts(decoder_layers(model, spec)[1], spec)
        parts.o.weight.zero_()
        parts.down.weight.zero_()
    bi = block_influence(model, torch.randint(0, 256, (2, 16)), cache=False, progress=False)
    assert abs(bi[1]) < 1e-6 and bi[0] > 1e-3


# ---------------------------------------------------------------------------------------------- allocation


@pytest.mark.parametrize("strategy", list(ALLOCATIONS))
def test_allocation_meets_the_budget_and_orders_layers(strategy):
    imp = np.array([5.0, 1.0, 3.0, 0.5, 2.0, 4.0])
    p = np.full(6, 1000.0)
    r = allocate(imp, p, 1500, LayerwiseConfig(strategy=strategy, alpha=1.0))
    assert abs((r * p).sum() - 1500) < 1e-6
    if strategy == "inverse":
        assert r[3] > r[1] > r[4] > r[2] > r[5] > r[0]
    elif strategy == "proportional":
        assert r[0] > r[5] > r[2] > r[4] > r[1] > r[3]
    else:
        assert np.allclose(r, 0.25)


def test_clipped_layers_pass_their_excess_on_and_frozen_layers_keep_everything():
    imp = np.array([10.0, 0.0, 0.0, 9.0, 8.0, 7.0])
    p = np.full(6, 1000.0)
    r = allocate(imp, p, 3000, LayerwiseConfig(strategy="inverse", alpha=4.0, max_layer_ratio=0.9, freeze_top_n=1))
    assert r[0] == 0 and r[1] == r[2] == pytest.approx(0.9) and abs((r * p).sum() - 3000) < 1e-6
    with pytest.raises(ValueError, match="cannot be met.*frozen layers \\[0, 3\\]"):
        allocate(imp, p, 3800, LayerwiseConfig(freeze_top_n=2, max_layer_ratio=0.9))


@pytest.mark.parametrize("kw, match", [
    (dict(alpha=0), "alpha=0"), (dict(alpha=-1.0), "alpha=-1.0"), (dict(strategy="log"), "strategy='log'"),
    (dict(attn_mlp=(-1, 9)), "attn_mlp"), (dict(attn_mlp=(0, 0)), "not both 0"), (dict(freeze_top_n=-1), "freeze_top_n"),
    (dict(max_layer_ratio=0.0), "max_layer_ratio"),
])
def test_bad_layerwise_settings_name_the_value(kw, match):
    with pytest.raises(ValueError, match=match):
        LayerwiseConfig(**kw)


def test_freeze_all_and_wrong_length_importance_are_errors():
    with pytest.raises(ValueError, match="freeze_top_n=6 must be below the number of layers \\(6\\)"):
        allocate(np.ones(6), np.ones(6), 1, LayerwiseConfig(freeze_top_n=6))
    with pytest.raises(ValueError, match="4 values; the model has 6 layers"):
        allocate(np.ones(4), np.ones(6), 1, LayerwiseConfig())


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("attn_mlp", [(2, 8), (5, 5), (0, 10), None])
def test_layerwise_plan_meets_the_budget_rule(family, attn_mlp):
    model, _, r, scores = _setup(family)
    cfg = LayerwiseConfig(ratio=0.15, attn_mlp=attn_mlp, freeze_top_n=1, max_layer_ratio=0.8)
    plan = layerwise_plan(r.table("taylor"), r.budget, scores["removal"], cfg)
    frozen = int(np.argmax(scores["removal"]))
    assert not plan.removed["attn"][frozen] and not plan.removed["mlp"][frozen]
    over = plan.selected_params - plan.target_params
    if attn_mlp is None:  # each layer overshoots its own target by less than one unit
        assert 0 <= over < N_LAYERS * max(_max_unit(r.budget, b) for b in BLOCKS)
    else:
        assert 0 <= over < _max_unit(r.budget, "mlp")
        x, y = attn_mlp
        rates = kind_rates(plan, r.budget)
        assert abs(rates["attn_share"] - x / (x + y)) <= _max_unit(r.budget, "attn") / rates["removed_params"]
    assert plan.settings["kind"] == "layerwise"
    pruned = copy.deepcopy(model)
    apply_plan(pruned, plan)


@pytest.mark.parametrize("attn_mlp", [(2, 8), (5, 5), (10, 0)])
def test_global_selection_with_two_knapsacks(attn_mlp):
    _, _, r, _ = _setup("mistral")
    _, plan = r.plan(ScoringConfig(), SelectionConfig(ratio=0.1, attn_mlp=attn_mlp))
    x, y = attn_mlp
    gone = {b: sum(len(plan.removed[b][i]) * r.budget.costs[b][i] for i in range(N_LAYERS)) for b in BLOCKS}
    want_attn = int(np.ceil(plan.target_params * x / (x + y)))
    assert 0 <= gone["attn"] - want_attn < _max_unit(r.budget, "attn")
    assert 0 <= gone["mlp"] - (plan.target_params - want_attn) < max(_max_unit(r.budget, "mlp"), 1)
    with pytest.raises(ValueError, match="attn_mlp=\\(10, 0\\) asks attn.*largest feasible ratio"):
        r.plan(ScoringConfig(), SelectionConfig(ratio=0.6, attn_mlp=(10, 0)))


# ---------------------------------------------------------------------------------------------- baselines


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("name", list(BASELINES))
def test_every_baseline_makes_a_plan_that_prunes_exactly(family, name):
    model, ids, r, scores = _setup(family, seed=1)
    plan = make_plan(name, r, 0.15, layer_scores=scores)
    assert plan.settings["baseline"] == name
    assert plan.provenance.method == BASELINES[name].method  # the registry says what chooses the units
    if name != "shortgpt":
        assert plan.selected_params >= plan.target_params
    pruned, masked = copy.deepcopy(model), copy.deepcopy(model)
    apply_plan(pruned, plan)
    mask_plan(masked, plan)
    torch.testing.assert_close(_logits(pruned, ids), _logits(masked, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_uniform_plans_load_with_plain_transformers(tmp_path, family):
    from transformers import AutoModelForCausalLM

    model, ids, r, scores = _setup(family, seed=2)
    for name in ("uniform", "wanda_sp"):
        plan = make_plan(name, r, 0.2)
        widths = {w for w in plan.kept_widths()}
        assert len(widths) == 1
        pruned = copy.deepcopy(model)
        apply_plan(pruned, plan)
        save_pruned(pruned, tmp_path / name, plan=plan)
        assert loads_with_plain_transformers(pruned.config)
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / name)
        torch.testing.assert_close(_logits(plain, ids), _logits(pruned, ids), rtol=0, atol=0)


def test_llm_pruner_keeps_its_first_and_last_layers():
    _, _, r, _ = _setup("llama")
    first, end = default_llm_pruner_range(32)
    assert (first, end) == (4, 30)
    plan = make_plan("llm_pruner", r, 0.1, first=1, end=5)
    assert not plan.removed["mlp"][0] and not plan.removed["mlp"][5]
    assert len({len(plan.removed["mlp"][i]) for i in range(1, 5)}) == 1
    with pytest.raises(ValueError, match="first=5, end=2"):
        make_plan("llm_pruner", r, 0.1, first=5, end=2)


def test_shortgpt_removes_the_least_influential_layers_closest_to_the_budget():
    _, _, r, _ = _setup("qwen3")
    bi = np.array([0.9, 0.1, 0.5, 0.05, 0.3, 0.8])
    per_layer = r.budget.layer_params()[0]
    plan = shortgpt_plan(r.budget, bi, ratio=2.2 * per_layer / r.budget.prunable_params, ratio_of="prunable")
    assert plan.removed_layers() == [1, 3]
    with pytest.raises(ValueError, match="6 finite values"):
        shortgpt_plan(r.budget, bi[:4], 0.1)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_flap_compensation_is_the_masked_model_plus_the_same_biases(tmp_path, family):
    model, ids, r, _ = _setup(family, seed=3)
    plan = make_plan("flap", r, 0.2)
    rec = solve_reconstruction(model, plan, ids, BASELINES["flap"].compensation, cache=False, progress=False)
    assert all(sol["weight"] is None for sol in rec.solutions.values())
    pruned = copy.deepcopy(model)
    prune_and_reconstruct(pruned, plan, ids, BASELINES["flap"].compensation, progress=False)
    masked = copy.deepcopy(model)
    mask_plan(masked, plan)
    spec = get_spec(masked)
    with torch.no_grad():
        for (i, block), sol in rec.solutions.items():
            parts = layer_parts(decoder_layers(masked, spec)[i], spec)
            proj = parts.o if block == "attn" else parts.down
            if proj.bias is None:
                proj.bias = torch.nn.Parameter(torch.zeros(proj.out_features))
            proj.bias.copy_(sol["bias"])  # the compensation replaces the block's own bias
    torch.testing.assert_close(_logits(pruned, ids), _logits(masked, ids), rtol=1e-4, atol=1e-4)
    # saved and reloaded with its biases; without them, a clear error
    save_pruned(pruned, tmp_path / "flap", plan=plan)
    assert torch.equal(_logits(load_pruned(tmp_path / "flap"), ids), _logits(pruned, ids))
    weights = tmp_path / "flap" / "model.safetensors"
    state = {k: v for k, v in load_file(weights).items() if not k.endswith(("o_proj.bias", "down_proj.bias"))}
    save_file(state, weights, metadata={"format": "pt"})
    (tmp_path / "flap" / "checksums.json").unlink()
    if any(json.loads((tmp_path / "flap" / "config.json").read_text())["pruned_layers"][i].get(f"{b}_out_bias")
           for i in range(N_LAYERS) for b in BLOCKS):
        with pytest.raises(CheckpointError, match="records output biases.*lack"):
            load_pruned(tmp_path / "flap", verify=False)  # the manifest is gone: loaded unchecked on purpose


def test_unknown_baseline_and_missing_layer_scores_are_errors():
    _, _, r, _ = _setup("llama")
    with pytest.raises(ValueError, match="baseline 'sparsegpt' is not registered"):
        make_plan("sparsegpt", r, 0.2)
    with pytest.raises(ValueError, match="needs the per-layer importance 'activation'"):
        make_plan("shortgpt", r, 0.2)


# ---------------------------------------------------------------------------------------------- x:y search and table


@pytest.mark.slow
def test_xy_search_resumes_from_cache_and_stops_after_three_rises(tmp_path):
    model, ids, r, _ = _setup("llama", seed=4)
    calls = []

    def plan_of(split):
        calls.append(split)
        return r.plan(ScoringConfig(), SelectionConfig(ratio=0.1, attn_mlp=split))[1]

    held_out = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(9))
    settings = dict(method="taylor", ratio=0.1)
    first = xy_search(model, plan_of, held_out, settings=settings, start=2, cache=tmp_path, progress=False)
    assert set(first.phase) == {"coarse", "fine"} and first.x.is_monotonic_increasing
    coarse = first[first.phase == "coarse"].sort_values("x")
    for direction in (coarse[coarse.x >= 2], coarse[coarse.x <= 2].iloc[::-1]):  # each stops after 3 rises
        p = direction.ppl.to_numpy()
        rises = [int(a > b) for a, b in zip(p[1:], p[:-1])]
        assert sum(rises[-3:]) == 3 or direction.x.isin([0, 10]).any()
    n = len(calls)
    again = xy_search(model, plan_of, held_out, settings=settings, start=2, cache=tmp_path, progress=False)
    assert len(calls) == n  # every point came from the cache
    assert again[["x", "ppl"]].equals(first[["x", "ppl"]])
    assert 0 <= best_split(first)[0] <= 10
    with pytest.raises(ValueError, match="start=11"):
        xy_search(model, plan_of, held_out, settings=settings, start=11)


def test_comparison_table_has_every_method(tmp_path):
    model, ids, r, scores = _setup("llama", seed=5)
    plans = baseline_plans(r, 0.15, layer_scores=scores)
    other = tmp_path / "other.txt"  # a second source, as an out-of-domain one is used
    other.write_text("\n\n".join(f"Paragraph {i} of plain English prose, unlike the calibration text." for i in range(60)))
    table = compare_plans(model, byte_tokenizer(), plans, ids, seq_len=32, max_windows=3, progress=False,
                          reconstruction=ReconstructConfig(), extra_sources=(str(other),))
    assert list(table.index) == ["dense", *BASELINES]
    assert table.loc["flap", "compensation"] and (table["ppl"] > 0).all()
    for column in (f"ppl_{other}", f"ppl_reconstructed_{other}"):  # the same models on the other source
        assert (table[column].drop("dense" if "reconstructed" in column else []) > 0).all()
    pruned = copy.deepcopy(model)
    prune_and_reconstruct(pruned, plans["global_taylor"][0], ids, None)
    direct = perplexity(pruned, byte_tokenizer(), str(other), seq_len=32, max_windows=3, progress=False).ppl
    assert table.loc["global_taylor", f"ppl_{other}"] == pytest.approx(direct, rel=1e-6)
    assert table.loc["dense", "params"] > table.loc["global_taylor", "params"]


def test_a_method_that_refuses_the_budget_gets_a_row_with_its_reason():
    """ShortGPT cannot remove 5 % of a model whose layers own 20 % each: the table says so and goes on."""
    model, ids, r, scores = _setup("llama", seed=5)
    plans = baseline_plans(r, 0.05, layer_scores=scores)
    table = compare_plans(model, byte_tokenizer(), plans, ids, seq_len=32, max_windows=3, progress=False)
    assert list(table.index) == ["dense", *BASELINES]
    assert "ShortGPT: asked to remove" in table.loc["shortgpt", "refused"] and pd.isna(table.loc["shortgpt", "ppl"])
    assert table.loc["global_taylor", "refused"] == "" and table.loc["global_taylor", "ppl"] > 0
    with pytest.raises(ValueError, match="not registered"):
        baseline_plans(r, 0.05, layer_scores=scores, variants={"x": ("magic", {})})
    # after a pass without the re-fit scores, their plans are refused with the reason, the others made
    plain = Rescorer(compute_importance(model, ids, progress=False), r.budget)
    plans = baseline_plans(plain, 0.15, layer_scores=scores)
    assert REFIT_BASELINES == ("global_refit", "depth_refit", "taylor_counts")  # read from the registry
    assert uses_refit_scores("layerwise", {"method": "refit"}) and not uses_refit_scores("layerwise")
    assert not uses_refit_scores("depth_refit", {"method": "taylor"})
    for name in REFIT_BASELINES:
        assert "needs the re-fit scores; calibrate with refit=True" in plans[name][0].reason
    assert not isinstance(plans["global_taylor"][0], Refused)


def test_depth_ratios_rise_and_meet_the_budget():
    ratios = depth_ratios(np.full(30, 1000.0), 6000, 0.5)
    assert (np.diff(ratios) > 0).all() and ratios[0] == pytest.approx(0.1) and (ratios * 1000).sum() == pytest.approx(6000)
    assert depth_ratios(np.full(30, 1000.0), 6000, 0.0) == pytest.approx(np.full(30, 0.2))
    with pytest.raises(ValueError, match="spread=1.5 must be in"):
        depth_ratios(np.full(30, 1000.0), 6000, 1.5)
    with pytest.raises(ValueError, match="lower the spread or the ratio"):
        depth_ratios(np.full(4, 1000.0), 3000, 1.0)


def test_owl_is_a_plan_maker_a_baseline_and_a_run_setting():
    """OWL (Yin et al., 2024): lower ratios where outliers are more frequent, from a notebook call, the baseline
    registry and a run file alike."""
    from workbench.plans.allocation import owl_plan
    from workbench.runs.pipeline import PruneRunConfig, make_run_plan

    model, ids, r, scores = _setup("llama", seed=2)
    lod = np.array([0.0, 0.5, 0.1, 0.3, 0.2, 0.4])[:N_LAYERS]
    plan = owl_plan(r.table("wanda"), r.budget, lod, 0.3, "prunable", lam=0.1, min_units_per_block=0)
    share = np.array([1 - (plan.n_kept("attn", i) * r.budget.costs["attn"][i] + plan.n_kept("mlp", i)
                           * r.budget.costs["mlp"][i]) / r.budget.layer_params()[i] for i in range(N_LAYERS)])
    assert share[np.argmin(lod)] > share[np.argmax(lod)]  # the layer with the most outliers is pruned least
    assert plan.provenance.source == "owl" and plan.selected_params >= plan.target_params
    made = make_plan("owl", r, 0.3, "prunable", layer_scores={"outlier_ratio": lod}, lam=0.1, min_units_per_block=0)
    assert made.removed == owl_plan(r.table("wanda"), r.budget, lod, 0.3, "prunable", lam=0.1,
                                    min_units_per_block=0).removed and made.provenance.label == "owl"
    _, run_plan, compensation = make_run_plan(model, PruneRunConfig(baseline="owl"), ids, r.importance, progress=False)
    assert run_plan.provenance.baseline == "owl" and compensation is None
