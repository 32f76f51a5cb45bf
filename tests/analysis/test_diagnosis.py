import numpy as np
import pandas as pd
import pytest
import torch

from workbench.analysis.diagnosis import diagnose, gradient_stats, recommend, scale_ratios
from workbench.core.arch import decoder_layers
from workbench.core.testing import tiny_model
from workbench.plans.normalize import NORMALIZERS, PRESETS, ScoringConfig, clip_percentiles, score_table
from workbench.plans.plan import Plan, extreme_blocks, layer_summary
from workbench.plans.rescore import Rescorer
from workbench.plans.selection import Budget, SelectionConfig, build_table, select
from workbench.scoring.importance import compute_importance
from workbench.scoring.removal import block_removal_loss, bypassed
from workbench.surgery.prune import apply_plan


def _constructed_table(n_layers=4, groups=2, channels=10, seed=0):
    rng = np.random.default_rng(seed)
    scales = 10.0 ** np.arange(n_layers)  # layer scales 1, 10, 100, 1000
    scores = {"attn": [torch.tensor(rng.random(groups) * s) for s in scales],
              "mlp": [torch.tensor(rng.random(channels) * s) for s in scales]}
    costs = {"attn": [100] * n_layers, "mlp": [10] * n_layers}
    budget = Budget([(groups, channels)] * n_layers, costs, total_params=n_layers * (groups * 100 + channels * 10) + 500)
    return build_table(scores, costs), budget


def test_ratios_and_extreme_counts_on_known_scales():
    grad = pd.DataFrame({"layer": [0, 0, 1, 1, 2, 2], "block": ["attn", "mlp"] * 3,
                         "grad_mean_abs": [1e-4, 1e-4, 1e-2, 1e-2, 1e-1, 1e-1], "grad_norm": [1.0, 1.0, 2.0, 2.0, 4.0, 4.0]})
    r = scale_ratios(grad)
    assert r["mean_ratio"] == pytest.approx(1000) and r["norm_ratio"] == pytest.approx(4)
    assert (r["max_mean_layer"], r["min_mean_layer"]) == (2, 0)
    plan = Plan.from_units([(2, 10)] * 3, {"mlp": {0: list(range(10)), 1: list(range(9)), 2: list(range(5))},
                                           "attn": {0: [0, 1]}})
    ext = extreme_blocks(plan, 0.9)  # 100 % and 100 % exceed 0.9; 90 % does not
    assert sorted(zip(ext.layer, ext.block)) == [(0, "attn"), (0, "mlp")]
    assert len(extreme_blocks(plan, 0.85)) == 3


@pytest.mark.parametrize("ratio,n_extreme,expected", [
    (5000, 0, "log"), (500, 0, "minmax"), (50, 0, "none"), (50, 6, "log")])
def test_recommendation_rules(ratio, n_extreme, expected):
    rec = recommend(ratio, n_extreme)
    assert rec.normalization == expected
    assert (rec.clip is True) == (n_extreme > 5)
    assert str(int(ratio)) in rec.rule or str(n_extreme) in rec.rule


@pytest.mark.parametrize("name", list(NORMALIZERS))
@pytest.mark.parametrize("level", ["layer", "block"])
def test_normalization_keeps_order_within_level(name, level):
    table, _ = _constructed_table()
    scored = score_table(table, ScoringConfig(normalization=name, level=level))
    key = ["layer"] if level == "layer" else ["layer", "block"]
    for _, g in scored.groupby(key, observed=True):
        a, b = g.score.to_numpy(), g.final_score.to_numpy()
        assert (np.argsort(a, kind="stable") == np.argsort(b, kind="stable")).all()


def test_layer_normalization_evens_out_scales():
    table, budget = _constructed_table()
    naive = select(table, budget, SelectionConfig(ratio=0.4, ratio_of="prunable"))
    scored = score_table(table, ScoringConfig(normalization="minmax", level="block"))
    evened = select(scored, budget, SelectionConfig(ratio=0.4, ratio_of="prunable"), score_column="final_score")
    assert len(extreme_blocks(naive)) > len(extreme_blocks(evened))


def test_clipping_hits_requested_percentiles():
    x = np.random.default_rng(1).lognormal(size=10_000)
    y = clip_percentiles(x, 5, 95)
    assert y.min() == pytest.approx(np.percentile(x, 5)) and y.max() == pytest.approx(np.percentile(x, 95))
    assert (y[(x > np.percentile(x, 5)) & (x < np.percentile(x, 95))]
            == x[(x > np.percentile(x, 5)) & (x < np.percentile(x, 95))]).all()


def _loss_frame(n_layers=4, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"layer": np.repeat(np.arange(n_layers), 2), "block": ["attn", "mlp"] * n_layers,
                         "removal_loss": rng.random(2 * n_layers) * 0.5 + 0.01})


def test_temperature_zero_and_one():
    table, budget = _constructed_table()
    loss = _loss_frame()
    cfg0 = ScoringConfig(normalization="log", temperature=0.0)
    plain = select(score_table(table, cfg0), budget, SelectionConfig(0.3, "prunable"), score_column="final_score")
    with_loss = select(score_table(table, cfg0, loss), budget, SelectionConfig(0.3, "prunable"), score_column="final_score")
    assert plain.removed == with_loss.removed
    scored = score_table(table, ScoringConfig(temperature=1.0), loss)
    totals = scored.groupby(["layer", "block"], observed=True).final_score.sum().reset_index()
    merged = totals.merge(loss.astype({"block": "category"}), on=["layer", "block"])
    np.testing.assert_allclose(merged.final_score, merged.removal_loss, rtol=1e-10)


def test_tau_removes_exactly_the_blocks_below_it():
    table, budget = _constructed_table()
    loss = _loss_frame()
    loss.loc[(loss.layer == 2) & (loss.block == "mlp"), "removal_loss"] = 0.001
    loss.loc[(loss.layer == 3) & (loss.block == "attn"), "removal_loss"] = 0.002
    scored = score_table(table, ScoringConfig(tau=0.005), loss)
    assert set(map(tuple, scored[scored.forced][["layer", "block"]].drop_duplicates().astype(str).to_numpy())) == {
        ("2", "mlp"), ("3", "attn")}
    plan = select(scored, budget, SelectionConfig(0.3, "prunable"), score_column="final_score")
    assert {(2, "mlp"), (3, "attn")} <= set(plan.emptied_blocks())


def test_block_removal_loss_of_a_zero_block_is_zero(tokenizer):
    model = tiny_model("llama", n_layers=3)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.zero_()
    samples = torch.randint(0, 256, (4, 16))
    loss = block_removal_loss(model, samples, batch_size=2, progress=False, cache=False)
    assert len(loss) == 6
    assert loss.query("layer == 1 and block == 'mlp'").removal_loss.item() == 0.0
    assert (loss.query("not (layer == 1 and block == 'mlp')").removal_loss.abs() > 0).all()
    x = samples[:1]
    before = model(x).logits
    with bypassed(model, 0, "attn"):
        pass
    assert torch.equal(model(x).logits, before)  # restored


def test_diagnosis_on_real_pass():
    model = tiny_model("qwen3", n_layers=3)
    imp = compute_importance(model, torch.randint(0, 256, (4, 16)), batch_size=2, progress=False)
    grad = gradient_stats(imp)
    assert len(grad) == 6 and (grad.grad_mean_abs > 0).all() and (grad.grad_zero_share < 0.5).all()
    plan = select(build_table(imp.scores("taylor"), Budget.of(model).costs), model, SelectionConfig(0.3))
    d = diagnose(imp, plan)
    assert d["mean_ratio"] >= 1 and d["recommendation"]["rule"] and len(d["per_block"]) == 6


@pytest.mark.slow
def test_widget_callback_gives_the_function_plan():
    pytest.importorskip("ipywidgets")
    from workbench.lab.widgets import panel

    model = tiny_model("llama", n_layers=3)
    imp = compute_importance(model, torch.randint(0, 256, (4, 16)), batch_size=2, progress=False)
    rs = Rescorer(imp, Budget.of(model), _loss_frame(3))
    box, state = panel(rs)
    c = box.controls
    c["normalization"].value = "zscore"
    c["level"].value = "block"
    c["temperature"].value = 0.5
    c["ratio"].value = 0.25
    _, expected = rs.plan(ScoringConfig(normalization="zscore", level="block", temperature=0.5),
                          SelectionConfig(ratio=0.25))
    assert state["plan"].removed == expected.removed
    c["preset"].value = "layerwise"
    _, expected = rs.plan(PRESETS["layerwise"], SelectionConfig(ratio=0.25))
    assert state["plan"].removed == expected.removed
    # only the methods this pass can score are offered; a global plan from raw Wanda scores warns in the status
    assert "taylor2_seq" not in c["method"].options and "wanda" in c["method"].options
    status = box.status
    assert "warning" not in status.value
    c["method"].value, c["normalization"].value = "wanda", "none"
    assert "warning: importance method 'wanda' is not comparable across layers" in status.value


@pytest.mark.slow
def test_panel_title_preset_table_reference_and_buttons(tmp_path):
    pytest.importorskip("ipywidgets")
    from workbench.lab.widgets import panel

    model = tiny_model("llama", n_layers=3)
    imp = compute_importance(model, torch.randint(0, 256, (4, 16)), batch_size=2, progress=False)
    rs = Rescorer(imp, Budget.of(model), _loss_frame(3))
    calls = []
    box, state = panel(rs, PRESETS["layerwise"], ratio=0.2,
                       evaluate=lambda plan: calls.append(plan) or 12.5,
                       save=lambda plan: tmp_path / f"plan-{plan.selected_params}.json")
    c, fig = box.controls, box.figure
    assert c["preset"].value == "layerwise"
    assert fig.layout.title.text == "taylor, minmax/layer; 20% of total"
    c["clip"].value = (5.0, 95.0)  # a manual edit: the settings are no preset's any more
    assert c["preset"].value == "(custom)" and "clip 5–95" in fig.layout.title.text
    c["preset"].value = "taylor"
    assert (c["normalization"].value, c["clip"].value) == ("none", (0.0, 100.0))
    assert c["preset"].value == "taylor" and fig.layout.title.text == "taylor; 20% of total"
    # the per-layer table: one row per layer, kept of total
    assert box.table.value.count("<tr>") == 1 + 3 and " / 2</td>" in box.table.value
    # no reference yet: the dashed traces are empty; pinning copies the plan on display
    assert all(y is None for y in fig.data[2].y)
    first = state["plan"]
    box.buttons["pin"].click()
    c["ratio"].value = 0.4
    assert state["reference"] is first and state["plan"] is not first
    kept = layer_summary(first)
    assert list(fig.data[3].y) == list(kept[kept.block == "mlp"].kept_fraction)
    box.buttons["evaluate"].click()
    assert calls == [state["plan"]] and "PPL <b>12.50</b>" in box.result.value
    assert state["ppl"] == {"taylor; 40% of total": 12.5}
    box.buttons["save"].click()
    expected_file = tmp_path / f"plan-{state['plan'].selected_params}.json"
    assert box.result.value == f"saved: {expected_file}" and state["saved"] == expected_file
    # without callbacks the buttons are off
    plain, _ = panel(rs)
    assert plain.buttons["evaluate"].disabled and plain.buttons["save"].disabled


def test_bad_scoring_settings_are_errors():
    with pytest.raises(ValueError, match="normalization='l2'"):
        ScoringConfig(normalization="l2")
    with pytest.raises(ValueError, match="temperature=1.5"):
        ScoringConfig(temperature=1.5)
    with pytest.raises(ValueError, match="clip_low=50"):
        ScoringConfig(clip_low=50, clip_high=10)
    table, _ = _constructed_table()
    with pytest.raises(ValueError, match="block removal loss"):
        score_table(table, ScoringConfig(temperature=0.5))


def test_compare_matches_one_plan_per_setting():
    table, budget = _constructed_table()
    rs = Rescorer(importance=None, budget=budget, block_loss=_loss_frame())  # over the constructed table
    rs._tables["taylor"] = table
    settings = {"naive": PRESETS["taylor"], "blockwise": PRESETS["blockwise"],
                "T=1": ScoringConfig(temperature=1.0)}
    frame, plans = rs.compare(settings, SelectionConfig(0.4, "prunable"))
    assert list(frame.index) == list(settings) and set(plans) == set(settings)
    for name, cfg in settings.items():
        _, plan = rs.plan(cfg, SelectionConfig(0.4, "prunable"))
        assert plans[name].removed == plan.removed
        assert frame.loc[name, "n_extreme"] == len(extreme_blocks(plan))
        mlp = [len(r) / 10 for r in plan.removed["mlp"]]
        assert frame.loc[name, "mlp_max_pruned"] == pytest.approx(max(mlp))
        assert frame.loc[name, "mlp_std_pruned"] == pytest.approx(np.std(mlp))
    assert frame.loc["naive", "n_extreme"] > frame.loc["blockwise", "n_extreme"]


def test_block_removal_loss_cache_keeps_base_loss(tmp_path):
    model = tiny_model("mistral", n_layers=2)
    samples = torch.randint(0, 256, (2, 12))
    first = block_removal_loss(model, samples, batch_size=2, progress=False, cache=tmp_path)
    again = block_removal_loss(model, samples, batch_size=2, progress=False, cache=tmp_path)
    assert len(list(tmp_path.rglob("*.pt"))) == 1
    pd.testing.assert_frame_equal(first, again)
    assert first.base_loss.nunique() == 1 and first.base_loss.iloc[0] > 0


def test_tau_over_the_budget_is_refused_or_capped():
    table, budget = _constructed_table()
    loss = _loss_frame()
    loss["removal_loss"] = np.linspace(0.001, 0.008, len(loss))  # every block below tau=0.01
    sel = SelectionConfig(0.3, "prunable")
    with pytest.raises(ValueError, match=r"tau=0.01 removes 8 whole blocks .* more than the budget ratio=0.3.*'cap'"):
        select(score_table(table, ScoringConfig(tau=0.01), loss), budget, sel, score_column="final_score")
    with pytest.warns(UserWarning, match="capped to the"):
        plan = select(score_table(table, ScoringConfig(tau=0.01, tau_over_budget="cap"), loss), budget, sel,
                      score_column="final_score")
    assert plan.target_params <= plan.selected_params < plan.target_params + max(max(c) for c in budget.costs.values())
    emptied = plan.emptied_blocks()
    order = [tuple(r) for r in loss.sort_values("removal_loss")[["layer", "block"]].itertuples(index=False)]
    assert emptied and set(emptied) == set(order[:len(emptied)])  # the lowest-loss blocks, in order
    with pytest.raises(ValueError, match="tau_over_budget='skip'"):
        ScoringConfig(tau_over_budget="skip")


def test_clipping_that_changes_nothing_says_why():
    model = tiny_model("llama", n_layers=3)
    imp = compute_importance(model, torch.randint(0, 256, (4, 16)), batch_size=2, progress=False)
    rs = Rescorer(imp, Budget.of(model))
    sel = SelectionConfig(ratio=0.2)
    assert rs.clipping_note(ScoringConfig(), sel) is None  # no clipping
    # the cut-off (about the 20th percentile of scores) lies inside 1–99: the tails go the same way either way
    note = rs.clipping_note(ScoringConfig(clip_low=1, clip_high=99), sel)
    assert rs.plan(ScoringConfig(clip_low=1, clip_high=99), sel)[1].removed == rs.plan(ScoringConfig(), sel)[1].removed
    assert note is not None and "changes nothing here" in note
    # tying the lowest 60 % puts the cut-off inside the tie: the plan changes, and nothing is said
    assert rs.plan(ScoringConfig(clip_low=60), sel)[1].removed != rs.plan(ScoringConfig(), sel)[1].removed
    assert rs.clipping_note(ScoringConfig(clip_low=60), sel) is None


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_removal_losses_from_kept_layer_inputs_equal_full_passes(family, monkeypatch):
    """Running only the layers from the first bypassed one (fed its kept input) gives the full-pass numbers."""
    import workbench.scoring.removal as diagnosis

    model = tiny_model(family, n_layers=4)
    samples = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(0))
    targets = [[(0, "attn")], [(2, "mlp")], [(3, "attn"), (3, "mlp")], [(1, "mlp"), (3, "attn")]]
    base, fast = diagnosis.removal_losses(model, samples, targets, batch_size=4, progress=False)
    monkeypatch.setattr(diagnosis, "INPUT_CACHE_BYTES", 0)  # forces full passes
    base_full, full = diagnosis.removal_losses(model, samples, targets, batch_size=4, progress=False)
    assert base == pytest.approx(base_full, abs=1e-6)
    assert fast == pytest.approx(full, abs=1e-5)
    assert len(decoder_layers(model)) == 4  # the layer list is restored


@pytest.mark.parametrize("level", ["layer", "block"])
@pytest.mark.parametrize("normalization", ["minmax", "zscore", "log", "sqrt"])
def test_scores_do_not_depend_on_the_table_row_order(normalization, level):
    """Groups read as slices (a table as built) and groups found by sorting (any other order) score alike."""
    table, _ = _constructed_table()
    cfg = ScoringConfig(normalization=normalization, level=level, temperature=0.5, tau=0.05)
    loss = _loss_frame()
    shuffled = table.sample(frac=1.0, random_state=0)
    a = score_table(table, cfg, loss)
    b = score_table(shuffled, cfg, loss).loc[a.index]
    np.testing.assert_allclose(b.final_score, a.final_score, rtol=1e-12)
    assert (b.forced == a.forced).all() and "final_score" not in table  # the given table is left as it was


def test_temperature_needs_the_loss_of_every_scored_block():
    table, _ = _constructed_table()
    with pytest.raises(ValueError, match="lacks blocks the table scores"):
        score_table(table, ScoringConfig(temperature=0.5), _loss_frame(n_layers=2))


# ---------------------------------------------------------------------------------------------- plan makers under bad input


@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_temperature_keeps_the_order_inside_a_block_whose_removal_lowers_the_loss(temperature):
    """L_b < 0 used to reverse a block's order (correlation −1): its most important units went first."""
    table, _ = _constructed_table()
    loss = _loss_frame()
    loss.loc[(loss.layer == 1) & (loss.block == "mlp"), "removal_loss"] = -0.2
    scored = score_table(table, ScoringConfig(temperature=temperature), loss)
    for (layer, block), g in scored.groupby(["layer", "block"], observed=True):
        a, b = g.score.to_numpy(), g.final_score.to_numpy()
        assert (np.argsort(a, kind="stable") == np.argsort(b, kind="stable")).all(), (layer, block)
    total = scored[(scored.layer == 1) & (scored.block == "mlp")]
    if temperature == 1.0:  # the block's total is its (negative) removal loss
        assert total.final_score.sum() == pytest.approx(-0.2)
        assert (total.final_score < 0).any()


def test_layer_ratios_that_protected_units_cannot_meet_are_refused():
    table, budget = _constructed_table()
    with pytest.raises(ValueError, match=r"per-layer selection: asked to remove .* short by more than the tolerance"
                                         r".*min_units_per_block=8 keeps units.*layer 0: 0.900 asked"):
        select(table, budget, SelectionConfig(layer_ratios=(0.9, 0.9, 0.9, 0.9), min_units_per_block=8))
    plan = select(table, budget, SelectionConfig(layer_ratios=(0.3, 0.3, 0.3, 0.3), min_units_per_block=1))
    assert abs(plan.achieved_ratio - plan.asked_ratio) < 0.05


def test_tau_with_protected_units_is_refused():
    table, budget = _constructed_table()
    loss = _loss_frame()
    loss.loc[(loss.layer == 2) & (loss.block == "mlp"), "removal_loss"] = 0.001
    scored = score_table(table, ScoringConfig(tau=0.005), loss)
    with pytest.raises(ValueError, match=r"tau removes 1 blocks whole, but min_units_per_block=1"):
        select(scored, budget, SelectionConfig(0.3, "prunable", min_units_per_block=1), score_column="final_score")


def test_shortgpt_refuses_a_ratio_below_half_a_layer():
    from workbench.baselines.registry import shortgpt_plan
    _, budget = _constructed_table()
    with pytest.raises(ValueError, match=r"ShortGPT: asked to remove 0.0500 .* removes 0.0000 .*: nothing; whole "
                                         r"layers only: the nearest layer count .* is 0"):
        shortgpt_plan(budget, [0.1, 0.2, 0.3, 0.4], 0.05, "prunable")
    plan = shortgpt_plan(budget, [0.1, 0.2, 0.3, 0.4], 0.25, "prunable")
    assert plan.settings["layers_removed"] == [0] and plan.achieved_ratio == pytest.approx(0.25)


def test_a_plan_far_over_its_budget_is_warned_of():
    from workbench.plans.allocation import plan_from_counts
    table, budget = _constructed_table()
    counts = np.array([[2, 10], [2, 10], [0, 0], [0, 0]])  # two whole layers for a budget of ~5 %
    target, denominator = budget.target(0.05, "prunable")
    with pytest.warns(UserWarning, match=r"over by more than the tolerance"):
        plan = plan_from_counts(table, budget, counts, target=target, denominator=denominator)
    assert plan.achieved_ratio == pytest.approx(0.5)


def _panel(**kw):
    pytest.importorskip("ipywidgets")
    from workbench.lab.widgets import panel

    model = tiny_model("llama", n_layers=3)
    imp = compute_importance(model, torch.randint(0, 256, (4, 16)), batch_size=2, progress=False)
    rs = Rescorer(imp, Budget.of(model), kw.pop("block_loss_frame", _loss_frame(3)))
    return (*panel(rs, **kw), rs, model)


def test_a_refused_setting_leaves_nothing_on_display_to_save_or_evaluate():
    calls = []
    box, state, _, _ = _panel(evaluate=lambda p: calls.append(p) or 1.0, save=lambda p: calls.append(p))
    c = box.controls
    assert state["plan"] is not None and not box.buttons["save"].disabled
    c["ratio"].value = 0.95  # more than the tiny model can give
    assert state["plan"] is None and state["title"] is None
    assert "refused" in box.status.value and box.figure.layout.title.text == "refused: see below"
    assert all(y is None for y in box.figure.data[0].y) and box.table.value == ""
    assert box.buttons["save"].disabled and box.buttons["evaluate"].disabled and box.buttons["pin"].disabled
    box.buttons["save"].click()
    box.buttons["evaluate"].click()
    assert calls == []
    c["ratio"].value = 0.2  # a valid setting again: shown and acted on
    box.buttons["save"].click()
    assert calls == [state["plan"]] and not box.buttons["evaluate"].disabled


@pytest.mark.parametrize("kw, match", [
    (dict(ratio=0.99), r"ratio=0.99 is outside the panel's slider \[0, 0.95\]"),
    (dict(initial=ScoringConfig(tau=0.0)), r"tau=0.0 is outside the panel's tau slider"),
    (dict(initial=ScoringConfig(tau=50.0)), r"tau=50.0 is outside the panel's tau slider"),
])
def test_initial_values_the_controls_cannot_show_are_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        _panel(**kw)
    box, state, _, _ = _panel(ratio=0.8, initial=ScoringConfig(tau=5.0))  # in range: shown as given
    assert box.controls["ratio"].value == 0.8 and box.controls["tau"].value == pytest.approx(5.0)


def test_a_failing_button_shows_its_error_in_the_panel():
    def evaluate(plan):
        raise ValueError("the model no longer has the widths this plan was made for")

    box, _, _, _ = _panel(evaluate=evaluate)
    box.buttons["evaluate"].click()
    assert "ValueError: the model no longer has the widths" in box.result.value and "evaluating" not in box.result.value


def test_evaluating_a_plan_on_an_already_pruned_model_says_what_happened():
    from workbench.core.testing import byte_tokenizer
    from workbench.evaluation.evaluate import perplexity_after
    model = tiny_model("llama", n_layers=3)
    plan = Plan.from_units([(2, 96)] * 3, {"mlp": {0: [1]}})
    apply_plan(model, Plan.from_units([(2, 96)] * 3, {"mlp": {1: [0, 1]}}))
    with pytest.raises(ValueError, match="pruned after the plan was made"):
        perplexity_after(model, byte_tokenizer(), plan, seq_len=16, max_windows=2)


def test_without_the_block_loss_the_panel_says_why_t_and_tau_are_off_and_can_measure_it():
    loss = _loss_frame(3)
    box, state, rs, _ = _panel(block_loss_frame=None, block_loss=lambda: loss)
    c = box.controls
    assert c["temperature"].disabled and c["tau"].disabled
    assert "T and tau are off" in box.loss_note.value and "press the button" in box.loss_note.value
    box.buttons["block_loss"].click()
    assert rs.block_loss is loss and not c["temperature"].disabled and box.loss_note.value == ""
    c["temperature"].value = 0.5
    assert state["plan"] is not None and "T=0.5" in state["title"]
    plain, _, _, _ = _panel(block_loss_frame=None)
    assert "pass <code>block_loss=</code>" in plain.loss_note.value and plain.buttons["block_loss"].disabled


def test_pinning_renames_the_reference_and_figures_are_named_by_the_settings():
    from workbench.lab.widgets import figure_name
    box, state, _, _ = _panel()
    box.controls["ratio"].value = 0.35
    assert state["figure_name"] == "panel_plan_taylor_0.35_total"
    box.buttons["pin"].click()
    assert box.figure.data[2].name == "attn (pinned: taylor; 35% of total)"
    assert figure_name(PRESETS["blockwise"], SelectionConfig(ratio=0.2, ratio_of="prunable")) == \
        "panel_plan_taylor_minmax-block_0.2_prunable"
    assert box.figure.layout.xaxis.dtick == 1 and box.figure.layout.width is None


def test_the_widget_state_a_reloaded_page_renders_is_what_is_shown():
    """A reloaded browser tab draws the figure from its synced state: it must hold the plan on display and the
    pinned reference, not the empty figure the panel started with."""
    box, state, _, _ = _panel()
    box.controls["ratio"].value = 0.3
    fig = box.figure
    kept = layer_summary(state["plan"])
    assert list(fig._widget_data[1]["y"]) == list(kept[kept.block == "mlp"].kept_fraction)
    assert fig._widget_layout["title"]["text"] == state["title"]
    box.buttons["pin"].click()
    assert fig._widget_data[3]["name"] == f"mlp (pinned: {state['title']})"
    assert list(fig._widget_data[3]["y"]) == list(kept[kept.block == "mlp"].kept_fraction)
