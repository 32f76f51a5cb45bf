import pytest

from workbench import plots
from workbench.models import anatomy, layer_widths, tiny_model
from workbench.selection import layer_summary, random_plan


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
