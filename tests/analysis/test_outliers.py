import numpy as np
import pytest
import torch

from workbench.analysis.outliers import (
    plan_outliers,
    tensor_stats,
    unit_outliers,
    warn_removed_outliers,
    weight_histograms,
    weight_stats,
)
from workbench.core.arch import layer_widths
from workbench.core.testing import tiny_model
from workbench.plans.allocation import compare_allocation, owl_ratios
from workbench.plans.plan import Plan
from workbench.plans.selection import Budget, SelectionConfig, build_table, select
from workbench.scoring.activations import activation_stats
from workbench.scoring.layer_importance import layer_outlier_ratio


def _samples(n=6, length=16, seed=0):
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def _planted(family="llama"):
    """A tiny model with one outlier weight (layer 1, MLP channel 7) and one massive hidden dimension (5)."""
    model = tiny_model(family, n_layers=3)
    with torch.no_grad():
        g = model.model.layers[1].mlp.gate_proj.weight
        g[7, 3] = 60 * g.std()
        model.model.embed_tokens.weight[:, 5] *= 400.0
    return model


def test_tensor_stats_match_numpy():
    x = torch.randn(5000, generator=torch.Generator().manual_seed(0)) ** 3
    s = tensor_stats(x, k_sigma=3)
    a = x.double().numpy()
    d = a - a.mean()
    assert s["std"] == pytest.approx(a.std()) and s["mean"] == pytest.approx(a.mean())
    assert s["kurtosis"] == pytest.approx((d ** 4).mean() / a.var() ** 2 - 3)
    assert s["max_over_std"] == pytest.approx(np.abs(a).max() / a.std())
    assert s["beyond_k_sigma"] == pytest.approx((np.abs(d) > 3 * a.std()).mean())


def test_planted_weight_and_activation_outliers_are_found():
    model = _planted()
    w = weight_stats(model)
    top = w.sort_values("max_over_std", ascending=False).iloc[0]
    assert (top.layer, top.module) == (1, "gate") and top.max_over_std > 30
    hist = weight_histograms(model, bins=51)
    assert hist.groupby("module")["count"].sum()["gate"] == sum(l.mlp.gate_proj.weight.numel() for l in model.model.layers)
    acts = activation_stats(model, _samples(), batch_size=3, progress=False, cache=False)
    dims = acts.outlier_dims("residual", min_layers=2)
    assert dims.dim.iloc[0] == 5 and dims.n_layers.iloc[0] == 3
    massive = acts.massive("residual")
    assert (massive.top_dims.str[0] == 5).all() and (massive.ratio_to_median > 100).all()
    units = unit_outliers(model, acts)
    row = units.query("layer == 1 and block == 'mlp' and unit == 7").iloc[0]
    assert row.is_outlier and row.weight_max_z > 30
    assert units.query("block == 'mlp'").weight_max_z.nlargest(2).iloc[1] < 10
    assert units.is_outlier.sum() == 1  # nothing else in a random model crosses the relative bounds


def test_a_massive_mlp_channel_is_an_outlier_unit():
    model = tiny_model("qwen3", n_layers=3)
    with torch.no_grad():  # channel 11 of layer 2: its intermediate activation grows ~ 400×
        model.model.layers[2].mlp.up_proj.weight[11] *= 400.0
    units = unit_outliers(model, activation_stats(model, _samples(), progress=False, cache=False), k_sigma=1e9)
    flagged = units[units.is_outlier]
    assert list(zip(flagged.layer, flagged.block, flagged.unit)) == [(2, "mlp", 11)]
    assert flagged.act_over_median.iloc[0] > 100


def test_streaming_equals_all_at_once():
    model = _planted("qwen2")
    x = _samples(n=6)
    one = activation_stats(model, x, batch_size=6, progress=False, cache=False)
    many = activation_stats(model, x, batch_size=1, progress=False, cache=False)
    assert one.sites.keys() == many.sites.keys()
    for k, a in one.sites.items():
        b = many.sites[k]
        assert torch.equal(a.max_abs, b.max_abs) and torch.equal(a.exceed, b.exceed) and torch.equal(a.hist, b.hist)
        assert torch.allclose(a.sum_sq, b.sum_sq, rtol=1e-9) and a.tokens == b.tokens == 6 * 16
    # against the whole activation tensor held at once
    held = {}
    h = model.model.layers[2].mlp.down_proj.register_forward_pre_hook(lambda m, a: held.setdefault("x", a[0].detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    full = held["x"].reshape(-1, held["x"].shape[-1]).abs().double()
    st = one.sites[(2, "mlp_channels")]
    assert torch.equal(st.max_abs, full.max(0).values) and torch.equal(st.exceed, (full > 6.0).sum(0).double())
    assert st.quantile(0.5) >= full.median().item() >= st.quantile(0.5) / 10 ** 0.05 * 0.999


def test_cached_statistics_read_back(tmp_path):
    model = tiny_model("mistral", n_layers=2)
    a = activation_stats(model, _samples(4), progress=False)
    b = activation_stats(model, _samples(4), progress=False)
    assert a.key == b.key
    assert all(torch.equal(a.sites[k].max_abs, b.sites[k].max_abs) for k in a.sites)


def test_removing_a_planted_outlier_unit_warns():
    model = _planted()
    acts = activation_stats(model, _samples(), progress=False, cache=False)
    units = unit_outliers(model, acts)
    plan = Plan.from_units(layer_widths(model), {"mlp": {1: [6, 7, 8]}, "attn": {0: [1]}})
    with pytest.warns(UserWarning, match="layer 1 mlp unit 7"):
        flagged = warn_removed_outliers(plan, units)
    assert (flagged.layer == 1).all() and 7 in flagged.unit.tolist()
    summary, _ = plan_outliers(plan, units)
    mlp = summary.set_index(["block", "part"]).loc["mlp"]
    assert mlp.loc["removed", "units"] == 3 and mlp.loc["removed", "outlier_units"] >= 1
    safe = Plan.from_units(layer_widths(model), {"mlp": {1: [0, 1]}})
    safe_flags = plan_outliers(safe, units)[1]
    assert 7 not in safe_flags.query("layer == 1").unit.tolist()


@pytest.mark.parametrize("lam", [0.02, 0.08, 0.15])
def test_owl_ratios_keep_the_mean_and_the_band(lam):
    d = np.random.default_rng(0).random(12) ** 3
    r = owl_ratios(d, 0.3, lam)
    assert r.mean() == pytest.approx(0.3, abs=1e-9)
    assert (r >= 0.3 - lam - 1e-12).all() and (r <= 0.3 + lam + 1e-12).all()
    assert (np.diff(r[np.argsort(d)]) <= 1e-12).all()  # more outliers, less pruning
    with pytest.raises(ValueError, match="lam=0.5"):
        owl_ratios(d, 0.3, 0.5)


def test_owl_allocation_drives_the_selection():
    model = _planted()
    acts = activation_stats(model, _samples(), progress=False, cache=False)
    lod = layer_outlier_ratio(model, acts)
    assert lod.shape == (3,) and (lod >= 0).all() and (lod < 1).all()
    ratios = owl_ratios(lod, 0.3, 0.1)
    budget = Budget.of(model)
    table = build_table({"attn": [torch.rand(2) for _ in range(3)], "mlp": [torch.rand(96) for _ in range(3)]},
                        budget.costs)
    owl = select(table, budget, SelectionConfig(layer_ratios=tuple(ratios)))
    glob = select(table, budget, SelectionConfig(ratio=0.3, ratio_of="prunable"))
    cmp = compare_allocation(glob, owl, budget, lod)
    assert (cmp.owl_pruned >= ratios - 1e-12).all()
    max_unit = max(max(budget.costs["attn"]), max(budget.costs["mlp"]))
    layer_params = [2 * budget.costs["attn"][i] + 96 * budget.costs["mlp"][i] for i in range(3)]
    assert ((cmp.owl_pruned - ratios) * np.array(layer_params) < max_unit + 1).all()
    with pytest.raises(ValueError, match="layer_ratios has 2"):
        select(table, budget, SelectionConfig(layer_ratios=(0.1, 0.2)))
    # min_units_per_block protects each block's best units under per-layer ratios too (OWL without emptied blocks)
    weak_attn = build_table({"attn": [torch.zeros(2) for _ in range(3)], "mlp": [torch.rand(96) + 1 for _ in range(3)]},
                            budget.costs)
    bare = select(weak_attn, budget, SelectionConfig(layer_ratios=(0.6,) * 3))
    kept = select(weak_attn, budget, SelectionConfig(layer_ratios=(0.6,) * 3, min_units_per_block=1))
    assert sorted(bare.emptied_blocks()) == [(i, "attn") for i in range(3)]
    assert not kept.emptied_blocks() and all(kept.n_kept("attn", i) == 1 for i in range(3))
    assert kept.selected_params >= 0.6 * budget.prunable_params  # each layer's ratio is still met, from the MLP
    with pytest.raises(ValueError, match="tau"):
        select(table.assign(forced=table.unit == 0), budget, SelectionConfig(layer_ratios=tuple(ratios)))
