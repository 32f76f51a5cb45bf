"""Figures: one function per figure kind, by family (model, plans, results), plotly for interactive views, matplotlib
for paper export.

Every figure function takes `backend="plotly"` (interactive, for notebooks) or `backend="paper"`
(matplotlib, consistent style, for `export`). `export` writes PDF/PNG/SVG atomically, by one rule: into
an experiment's `figures/` and, named after the experiment, into the project's `figures/`.
"""
from workbench.plots.export import EXPORT_FORMATS, export, publish
from workbench.plots.model import (
    MODULE_ORDER,
    activation_magnitude,
    outlier_heatmap,
    params_per_layer,
    weight_distribution,
)
from workbench.plots.plans import (
    kept_fraction_per_layer,
    pruned_fraction_by_setting,
    pruned_fraction_heatmap,
    scale_per_layer,
    xy_curve,
)
from workbench.plots.results import correlation_scatter, grouped_bars, loss_curve, ppl_bars, styled, sweep_metric
from workbench.plots.style import BACKENDS, COLORS, PAPER_RC, SERIES_COLORS, STAT_LABELS, VALUE_LABELS

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
