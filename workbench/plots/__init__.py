"""Figures: one function per figure kind, by family (model, plans, results), plotly for interactive views, matplotlib
for paper export.

Every figure function takes `backend="plotly"` (interactive, for notebooks) or `backend="paper"`
(matplotlib, consistent style, for `export`). `export` writes PDF/PNG/SVG atomically, by one rule: into
an experiment's `figures/` and, named after the experiment, into the project's `figures/`.
"""
from workbench.plots.export import EXPORT_FORMATS, export, publish
from workbench.plots.style import BACKENDS, COLORS, SERIES_COLORS, PAPER_RC, VALUE_LABELS, STAT_LABELS
from workbench.plots.model import (
    params_per_layer,
    MODULE_ORDER,
    weight_distribution,
    outlier_heatmap,
    activation_magnitude,
)
from workbench.plots.plans import (
    kept_fraction_per_layer,
    scale_per_layer,
    pruned_fraction_by_setting,
    pruned_fraction_heatmap,
    xy_curve,
)
from workbench.plots.results import grouped_bars, styled, ppl_bars, sweep_metric, correlation_scatter, loss_curve

__all__ = [
    "EXPORT_FORMATS",
    "export",
    "publish",
    "BACKENDS",
    "COLORS",
    "SERIES_COLORS",
    "PAPER_RC",
    "VALUE_LABELS",
    "STAT_LABELS",
    "params_per_layer",
    "MODULE_ORDER",
    "weight_distribution",
    "outlier_heatmap",
    "activation_magnitude",
    "kept_fraction_per_layer",
    "scale_per_layer",
    "pruned_fraction_by_setting",
    "pruned_fraction_heatmap",
    "xy_curve",
    "grouped_bars",
    "styled",
    "ppl_bars",
    "sweep_metric",
    "correlation_scatter",
    "loss_curve",
]
