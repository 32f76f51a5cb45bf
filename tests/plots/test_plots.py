import pytest

from workbench import plots
from workbench.core.arch import layer_widths
from workbench.core.models import anatomy
from workbench.core.testing import tiny_model
from workbench.plans.plan import layer_summary, random_plan


@pytest.fixture
def summary():
    return layer_summary(random_plan(layer_widths(tiny_model("llama", n_layers=4)), 0.3, empty_blocks=1))


def test_interactive_figures_carry_the_data(summary):
    anat = anatomy(tiny_model("llama", n_layers=4))
    fig = plots.params_per_layer(anat)
    assert [t.name for t in fig.data] == ["attn", "mlp", "norms"]
    assert list(fig.data[1].y) == anat[anat.block == "mlp"].params.tolist()
    kept = plots.kept_fraction_per_layer(summary)
    assert list(kept.data[0].y) == summary[summary.block == "attn"].kept_fraction.tolist()


@pytest.mark.slow
def test_export_writes_each_format(tmp_path, summary):
    paths = plots.export(plots.kept_fraction_per_layer(summary, backend="paper"), "kf", tmp_path,
                         formats=("pdf", "png", "svg"))
    assert [p.suffix for p in paths] == [".pdf", ".png", ".svg"]
    assert all(p.stat().st_size > 500 for p in paths)
    assert paths[1].read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob(".*"))


def test_bad_backend_and_format_are_errors(tmp_path, summary):
    with pytest.raises(ValueError, match="backend='bokeh'"):
        plots.kept_fraction_per_layer(summary, backend="bokeh")
    with pytest.raises(ValueError, match=r"\['jpg'\]"):
        plots.export(plots.kept_fraction_per_layer(summary, backend="paper"), "x", tmp_path, formats=("jpg",))
    with pytest.raises(TypeError, match="backend='paper'"):
        plots.export(plots.kept_fraction_per_layer(summary), "x", tmp_path)


def test_scale_plot_uses_log_axes_and_drops_non_positive(tmp_path):
    import pandas as pd

    per_block = pd.DataFrame({"layer": [0, 0, 1, 1], "block": ["attn", "mlp"] * 2,
                              "grad_mean_abs": [1e-3, 0.0, 1e-1, 2e-1], "imp_mean": [1.0, 2.0, 3.0, 4.0]})
    fig = plots.scale_per_layer(per_block)
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis2.type == "log"
    mlp_grad = [t for t in fig.data if t.name == "mlp"][0]
    assert mlp_grad.y[0] is None or mlp_grad.y[0] != mlp_grad.y[0]  # 0 is a gap, not a point
    assert plots.export(plots.scale_per_layer(per_block, backend="paper"), "scale", tmp_path)
    with pytest.raises(ValueError, match="grad_norm"):
        plots.scale_per_layer(per_block, columns=("grad_norm",))


def test_setting_comparison_and_bars(tmp_path, summary):
    import pandas as pd

    other = layer_summary(random_plan(layer_widths(tiny_model("llama", n_layers=4)), 0.1, seed=3))
    fig = plots.pruned_fraction_by_setting({"a": summary, "b": other})
    assert [t.name for t in fig.data] == ["a", "a", "b", "b"]
    assert list(fig.data[3].y) == other[other.block == "mlp"].pruned_fraction.tolist()
    assert plots.export(plots.pruned_fraction_by_setting({"a": summary}, backend="paper"), "cmp", tmp_path)
    frame = pd.DataFrame({"dense": [0.5, 0.6], "pruned": [0.4, 0.55]}, index=["boolq", "piqa"])
    bars = plots.grouped_bars(frame, ylabel="acc")
    assert [t.name for t in bars.data] == ["dense", "pruned"] and list(bars.data[1].y) == [0.4, 0.55]
    assert plots.export(plots.grouped_bars(frame, backend="paper"), "bars", tmp_path)
    with pytest.raises(ValueError, match="empty"):
        plots.pruned_fraction_by_setting({})


def test_loss_curve(tmp_path):
    import pandas as pd

    hist = pd.DataFrame({"step": [1, 2, 3, 4], "loss": [3.0, 2.5, 2.2, 2.0]})
    evals = pd.DataFrame({"step": [2, 4], "eval_loss": [2.6, 2.1]})
    fig = plots.loss_curve(hist, evals)
    assert [t.name for t in fig.data] == ["train loss", "train (moving avg)", "held-out loss"]
    assert list(fig.data[2].y) == [2.6, 2.1]
    assert plots.export(plots.loss_curve(hist, evals, backend="paper"), "loss", tmp_path)
    with pytest.raises(ValueError, match="empty"):
        plots.loss_curve(hist.iloc[:0])


@pytest.mark.slow
def test_outlier_figures(tmp_path):
    import torch

    from workbench.analysis.outliers import weight_histograms, weight_stats
    from workbench.scoring.activations import activation_stats

    model = tiny_model("llama", n_layers=2)
    hist = weight_histograms(model, bins=21)
    fig = plots.weight_distribution(hist)
    assert fig.layout.yaxis.type == "log" and [t.name for t in fig.data][:3] == ["embeddings", "q", "k"]
    stats = weight_stats(model)
    heat = plots.outlier_heatmap(stats)
    assert list(heat.data[0].y) == ["q", "k", "v", "o", "gate", "up", "down", "input_norm", "post_attn_norm"]
    assert heat.data[0].customdata[4][1] == stats.query("layer == 1 and module == 'gate'").max_over_std.item()
    acts = activation_stats(model, torch.randint(0, 256, (2, 8)), progress=False, cache=False)
    mag = plots.activation_magnitude(acts.frame("residual"))
    assert mag.data[0].z.shape == (2, 48)
    for name, f in [("w", plots.weight_distribution(hist, backend="paper")),
                    ("h", plots.outlier_heatmap(stats, backend="paper")),
                    ("a", plots.activation_magnitude(acts.frame("residual"), backend="paper"))]:
        assert plots.export(f, name, tmp_path)
    with pytest.raises(ValueError, match="kurt"):
        plots.outlier_heatmap(stats, value="kurt")


def test_ppl_bars_sorted_labelled_log_with_dense_line(tmp_path):
    import pandas as pd

    ppl = pd.Series({"b": 90.5, "a": 35.391, "c": 1234.0})
    fig = plots.ppl_bars(ppl, dense=22.77, title="t")
    assert list(fig.data[0].x) == ["a", "b", "c"] and list(fig.data[0].text) == ["35.39", "90.50", "1,234.00"]
    assert fig.layout.yaxis.type == "log" and fig.layout.shapes[0].y0 == 22.77
    paper = plots.ppl_bars(ppl, backend="paper", dense=22.77)
    ax = paper.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"] and ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.texts] == ["35.39", "90.50", "1,234.00"]
    legend = ax.get_legend()
    assert legend.get_texts()[0].get_text() == "dense (22.77)" and legend.get_bbox_to_anchor().x0 > ax.bbox.x1 - 1
    assert plots.export(paper, "ppl", tmp_path, show=False)
    with pytest.raises(ValueError, match="empty"):
        plots.ppl_bars(pd.Series(dtype=float))


def test_setting_heatmap_rows_are_settings_and_columns_layers(tmp_path, summary):
    other = layer_summary(random_plan(layer_widths(tiny_model("llama", n_layers=4)), 0.1, seed=3))
    fig = plots.pruned_fraction_heatmap({"a": summary, "b": other})
    attn = fig.data[0]
    assert list(attn.y) == ["a", "b"] and list(attn.x) == [0, 1, 2, 3]
    assert list(attn.z[1]) == other[other.block == "attn"].pruned_fraction.tolist()
    assert plots.export(plots.pruned_fraction_heatmap({"a": summary, "b": other}, backend="paper"), "hm", tmp_path,
                        show=False)


def test_params_figure_dense_vs_pruned_with_embeddings(tmp_path):
    from workbench.evaluation.efficiency import parameter_breakdown
    from workbench.plans.plan import Plan
    from workbench.surgery.prune import apply_plan

    model = tiny_model("llama", n_layers=4)
    dense = anatomy(model)
    plan = Plan.from_units(layer_widths(model), {"attn": {1: [0, 1]}, "mlp": {1: list(range(96)), 2: [0, 1]}})
    apply_plan(model, plan)  # layer 1 removed
    fig = plots.params_per_layer(dense, pruned=anatomy(model), removed_layers=plan.removed_layers(),
                                 embeddings=parameter_breakdown(model)["embeddings"])
    mlp = [t for t in fig.data if t.name == "mlp"][0]
    assert list(mlp.x) == [0, 1, 2, 3] and mlp.y[1] == 0 and mlp.y[2] == 94 * 48 * 3
    assert [t for t in fig.data if t.name == "embeddings"][0].y[0] == 2 * 260 * 48
    paper = plots.params_per_layer(dense, backend="paper", pruned=anatomy(model), removed_layers=plan.removed_layers(),
                                   embeddings=parameter_breakdown(model)["embeddings"])
    assert [t.get_text() for t in paper.axes[0].get_xticklabels()] == ["embeddings"]  # its own panel
    assert plots.export(paper, "params", tmp_path, show=False)
    with pytest.raises(ValueError, match="removed_layers=\\[\\]"):
        plots.params_per_layer(dense, pruned=anatomy(model))


def test_heatmap_ticks_every_fifth_layer_and_words_on_axes():
    import pandas as pd

    stats = pd.DataFrame([dict(layer=i, module=m, max_over_std=float(i + 1)) for i in range(12) for m in ("q", "down")])
    fig = plots.outlier_heatmap(stats, backend="paper")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "5", "10"]
    assert ax.get_ylabel() == "weight matrix" and "max |w| / std" in fig.axes[1].get_ylabel()


def test_styled_tables_format_by_column_meaning():
    import pandas as pd

    t = pd.DataFrame({"ppl": [35.391234], "params": [107611776], "mlp_max_pruned": [0.4567], "imp_mean": [1.234e-7],
                      "method": ["a long name that stays whole"]})
    html = plots.styled(t).to_html()
    for text in ("35.39", "107,611,776", "45.7%", "1.234e-07", "a long name that stays whole"):
        assert text in html
