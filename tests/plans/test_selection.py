import numpy as np
import pytest
import torch

from workbench.core.arch import layer_widths
from workbench.core.models import parameter_count
from workbench.core.testing import tiny_model
from workbench.plans.plan import Plan, layer_summary
from workbench.plans.selection import Budget, SelectionConfig, build_table, prunable_params, select, unit_costs
from workbench.scoring.importance import compute_importance
from workbench.surgery.prune import apply_plan


def _scores(widths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"attn": [torch.rand(a, generator=g) for a, _ in widths], "mlp": [torch.rand(m, generator=g) for _, m in widths]}


def test_table_has_one_row_per_unit_with_score():
    model = tiny_model("llama", n_layers=3)
    table = build_table(_scores(layer_widths(model)), unit_costs(model))
    assert len(table) == 3 * (2 + 96)
    assert list(table.columns) == ["layer", "block", "unit", "importance", "cost", "score"]
    np.testing.assert_allclose(table.score, table.importance / table.cost)


def test_selection_removes_lowest_scores_until_target():
    model = tiny_model("llama", n_layers=3)
    table = build_table(_scores(layer_widths(model)), unit_costs(model))
    cfg = SelectionConfig(ratio=0.3, ratio_of="prunable")
    plan = select(table, model, cfg)
    prunable = prunable_params(unit_costs(model), layer_widths(model))
    target = int(np.ceil(0.3 * prunable))
    chosen = {(b, i, u) for b in ("attn", "mlp") for i, us in enumerate(plan.removed[b]) for u in us}
    is_chosen = np.array([(r.block, r.layer, r.unit) in chosen for r in table.itertuples()])
    # every removed unit scores no higher than every kept one
    assert table.score[is_chosen].max() <= table.score[~is_chosen].min()
    removed_cost = int(table.cost[is_chosen].sum())
    assert removed_cost == plan.selected_params >= target
    assert removed_cost - table.cost[is_chosen].max() < target  # smallest prefix reaching the target


def test_both_achieved_ratios_after_pruning():
    model = tiny_model("mistral", n_layers=3)
    table = build_table(_scores(layer_widths(model), 1), unit_costs(model))
    plan = select(table, model, SelectionConfig(ratio=0.25, ratio_of="total"))
    report = apply_plan(model, plan)
    assert report.ratio_total >= 0.25 and report.ratio_prunable > report.ratio_total
    assert report.params_after == parameter_count(model)


def test_min_units_per_block_keeps_every_block():
    model = tiny_model("llama", n_layers=3)
    scores = _scores(layer_widths(model))
    scores["attn"][1] *= 0  # layer 1's attention would go first and empty
    scores["mlp"][1] *= 0
    table = build_table(scores, unit_costs(model))
    free = select(table, model, SelectionConfig(ratio=0.3, ratio_of="prunable"))
    assert (1, "attn") in free.emptied_blocks()
    kept = select(table, model, SelectionConfig(ratio=0.3, ratio_of="prunable", min_units_per_block=1))
    assert not kept.emptied_blocks()
    summary = layer_summary(kept)
    assert (summary.kept >= 1).all()


def test_impossible_and_invalid_ratios_are_errors():
    model = tiny_model("llama", n_layers=2)
    table = build_table(_scores(layer_widths(model)), unit_costs(model))
    with pytest.raises(ValueError, match=r"ratio=0.9 of total.*max ratio"):
        select(table, model, SelectionConfig(ratio=0.9, ratio_of="total"))
    with pytest.raises(ValueError, match="ratio=1.5"):
        SelectionConfig(ratio=1.5)
    with pytest.raises(ValueError, match="ratio_of='params'"):
        SelectionConfig(ratio_of="params")


def test_zero_ratio_removes_nothing():
    model = tiny_model("llama", n_layers=2)
    plan = select(build_table(_scores(layer_widths(model)), unit_costs(model)), model, SelectionConfig(ratio=0.0))
    assert plan.selected_params == 0 and not any(any(r) for r in plan.removed.values())


def test_end_to_end_with_real_importance(tokenizer):
    from workbench.data.text import CalibrationConfig, calibration_samples
    from workbench.evaluation.evaluate import perplexity

    model = tiny_model("qwen2", n_layers=3)
    samples = calibration_samples(tokenizer, CalibrationConfig(num_samples=4, seq_len=32))
    imp = compute_importance(model, samples, batch_size=2, progress=False)
    table = build_table(imp.scores("taylor"), unit_costs(model))
    plan = select(table, model, SelectionConfig(ratio=0.2))
    report = apply_plan(model, plan)
    assert 0.2 <= report.ratio_total < 0.25
    assert np.isfinite(perplexity(model, tokenizer, seq_len=32, max_windows=2, progress=False).ppl)


def test_plan_round_trips_through_dict():
    model = tiny_model("llama", n_layers=2)
    plan = select(build_table(_scores(layer_widths(model)), unit_costs(model)), model, SelectionConfig(ratio=0.2))
    again = Plan.from_dict(plan.to_dict())
    assert again.removed == plan.removed and again.widths == plan.widths and again.settings == plan.settings


@pytest.mark.parametrize("n,distinct", [(0, 3), (1, 3), (7, 2), (5000, 5), (5000, 10**9)])
def test_fast_argsort_is_stable_on_ties(n, distinct):
    from workbench.plans.selection import stable_argsort

    x = np.random.default_rng(n).integers(0, distinct, n).astype(np.float64)
    assert (stable_argsort(x) == np.argsort(x, kind="stable")).all()


def test_a_table_in_another_row_order_selects_the_same_plan(make_model):
    """select reads units in (block, layer, unit) order without a sort when the table is as built; a shuffled
    table gives the same plan."""
    model = make_model("llama", n_layers=3)
    budget = Budget.of(model)
    g = torch.Generator().manual_seed(0)
    scores = {"attn": [torch.rand(2, generator=g) for _ in range(3)], "mlp": [torch.rand(96, generator=g) for _ in range(3)]}
    table = build_table(scores, budget.costs)
    shuffled = table.sample(frac=1.0, random_state=0)
    for cfg in (SelectionConfig(ratio=0.3), SelectionConfig(ratio=0.3, min_units_per_block=1)):
        assert select(shuffled, budget, cfg).removed == select(table, budget, cfg).removed


@pytest.mark.parametrize("seed", range(6))
def test_partial_selection_equals_a_full_stable_sort(make_model, seed, monkeypatch):
    """select sorts only the units whose score is at most the k-th smallest that reaches the budget; with many
    ties and mixed costs it must give exactly the plan of a full stable sort."""
    import workbench.plans.selection as selection

    model = make_model("llama", n_layers=4)
    budget = Budget.of(model)
    rng = np.random.default_rng(seed)
    scores = {"attn": [torch.tensor(rng.integers(0, 5, 2), dtype=torch.float32) for _ in range(4)],
              "mlp": [torch.tensor(rng.integers(0, 5, 96), dtype=torch.float32) for _ in range(4)]}
    table = build_table(scores, budget.costs)
    table["score"] = np.floor(table["score"] * 1e4) / 1e4  # many exact ties across blocks of different cost
    for ratio in (0.05, 0.2, 0.4):
        fast = select(table, budget, SelectionConfig(ratio=ratio))
        monkeypatch.setattr(selection, "_lowest_reaching", lambda score, cost, idx, rest: idx)  # full sort
        assert select(table, budget, SelectionConfig(ratio=ratio)).removed == fast.removed
        monkeypatch.undo()


def _layer_costs(plan, costs, layer):
    return sum(len(plan.removed[b][layer]) * costs[b][layer] for b in ("attn", "mlp"))


def test_per_layer_selection_lands_within_one_small_unit_of_each_layer_target():
    """A KV group that would pass a layer's target by more than one MLP channel is skipped for the next channels;
    when the channels run out first, the skipped group is taken after all, so no layer falls short."""
    model = tiny_model("llama", n_layers=3)
    widths, costs = layer_widths(model), unit_costs(model)
    scores = _scores(widths, 3)
    for i in range(3):
        scores["attn"][i][0] = 0.0  # each layer's first group goes first, then channels: the target lands on one
    table = build_table(scores, costs)
    layer_params = [a * costs["attn"][i] + m * costs["mlp"][i] for i, (a, m) in enumerate(widths)]
    ratios = (0.3, 0.45, 0.35)
    plan = select(table, model, SelectionConfig(layer_ratios=ratios))
    for i, r in enumerate(ratios):
        want = int(np.ceil(r * layer_params[i]))
        over = _layer_costs(plan, costs, i) - want
        assert 0 <= over < costs["mlp"][i], (i, over)
        assert 0 in plan.removed["attn"][i] and len(plan.removed["attn"][i]) == 1  # later groups were skipped
    assert plan.selected_params - plan.target_params < 3 * costs["mlp"][0]
    # every channel scores 0: the channels run out below this target, so the cheapest group is taken after all
    scores = {"attn": [torch.arange(1.0, a + 1) for a, _ in widths], "mlp": [torch.zeros(m) for _, m in widths]}
    table = build_table(scores, costs)
    mlp_share = widths[0][1] * costs["mlp"][0] / layer_params[0]
    with pytest.warns(UserWarning, match="over by more than the tolerance"):  # said, not silent
        plan = select(table, model, SelectionConfig(layer_ratios=(mlp_share + 0.01,) * 3))
    for i in range(3):
        assert plan.removed["attn"][i] == [0] and len(plan.removed["mlp"][i]) == widths[i][1]
        assert _layer_costs(plan, costs, i) >= int(np.ceil((mlp_share + 0.01) * layer_params[i]))
