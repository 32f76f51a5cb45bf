"""The one figure style: colors, the matplotlib paper style, axis helpers and labels."""
from __future__ import annotations

from workbench.core.registry import check_choice

BACKENDS = ("plotly", "paper")


COLORS = {"attn": "#1f77b4", "mlp": "#ff7f0e", "norms": "#7f7f7f", "dense": "#7f7f7f", "pruned": "#d62728",
          "embeddings": "#9467bd"}


SERIES_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf"]


PAPER_RC = {
    "figure.figsize": (6.0, 3.0),
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "savefig.bbox": "tight",
    "savefig.dpi": 200,
}


def _check_backend(backend: str) -> None:
    check_choice("backend", backend, BACKENDS)


def _paper_axes(ncols: int = 1, width_per_panel: float | None = None):
    import matplotlib.pyplot as plt  # deferred: plotting libraries load only when drawing
    import seaborn as sns  # deferred: plotting libraries load only when drawing

    sns.set_theme(context="paper", style="whitegrid", rc=PAPER_RC)
    if ncols == 1 and width_per_panel is None:
        return plt.subplots(layout="constrained")
    w, h = PAPER_RC["figure.figsize"]
    return plt.subplots(1, ncols, figsize=((width_per_panel or w / ncols) * ncols, h), squeeze=False,
                        layout="constrained")


def _series_color(i: int) -> str:
    return SERIES_COLORS[i % len(SERIES_COLORS)]


def _legend_outside(ax, **kw) -> None:
    """The legend to the right of the axes, never over the data."""
    ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0), **kw)


def _layer_ticks(ax, n_layers: int, every: int = 5) -> None:
    """Readable layer ticks on a heatmap's x axis: every `every`-th layer, at the cell centres."""
    ticks = list(range(0, n_layers, every))
    ax.set_xticks([t + 0.5 for t in ticks], [str(t) for t in ticks], rotation=0)


VALUE_LABELS = {
    "max_over_std": "max |w| / std", "kurtosis": "kurtosis", "outlier_share": "share beyond kσ",
    "max_abs": "max |activation|", "mean_abs": "mean |activation|", "ppl": "perplexity",
}


def _words(name: str) -> str:
    return VALUE_LABELS.get(name) or STAT_LABELS.get(name) or name.replace("_", " ")


STAT_LABELS = {
    "grad_mean_abs": "mean |g|", "grad_norm": "gradient norm", "grad_max_abs": "max |g|",
    "imp_mean": "mean importance per unit", "imp_sum": "total importance", "imp_max": "max importance",
    "score_mean": "mean importance / parameter (ranked)",
    "removal_loss": "block removal loss",
    "first": "Σ|w·g| (first order)", "second_batch": "½Σw²F, batch-mean Fisher",
    "second_seq": "½Σw²F, per-sequence Fisher", "batch_over_first": "second (batch) / first",
    "seq_over_first": "second (per sequence) / first",
}
