"""Figures of a model's anatomy: parameters per layer, weight distributions and outliers, activation magnitudes."""
from __future__ import annotations

import numpy as np
import pandas as pd

from workbench.plots.style import (
    COLORS,
    PAPER_RC,
    _check_backend,
    _layer_ticks,
    _legend_outside,
    _paper_axes,
    _series_color,
    _words,
)


def params_per_layer(anatomy_df: pd.DataFrame, backend: str = "plotly", *, pruned: pd.DataFrame | None = None,
                     removed_layers=(), embeddings: int | None = None, title: str | None = None):
    """Stacked bars: parameters of each layer's attention, MLP and norms.

    pruned: the pruned model's `anatomy` — its bars are drawn over the dense ones (dense as grey outlines);
        `removed_layers` (dense indices, e.g. `plan.removed_layers()`) places its layers where they were,
        a removed layer being an empty outline.
    embeddings: the embedding (+ untied head) parameters, drawn as a bar of their own left of layer 0.
    """
    _check_backend(backend)
    wide = anatomy_df.pivot_table(index="layer", columns="block", values="params", aggfunc="sum").fillna(0)
    blocks = [b for b in ("attn", "mlp", "norms") if b in wide.columns]
    shown = wide
    if pruned is not None:
        shown = pruned.pivot_table(index="layer", columns="block", values="params", aggfunc="sum").fillna(0)
        kept = [i for i in wide.index if i not in set(removed_layers)]
        if len(kept) != len(shown):
            raise ValueError(f"pruned has {len(shown)} layers; the dense model's {len(wide)} less removed_layers="
                             f"{list(removed_layers)} leaves {len(kept)}")
        shown = shown.set_axis(kept).reindex(index=wide.index, columns=blocks, fill_value=0)
    dense_total = wide[blocks].sum(axis=1)
    title = title or ("Parameters per layer: dense (outline) and pruned" if pruned is not None
                      else "Parameters per layer and block")
    x = list(wide.index)
    if backend == "plotly":
        import plotly.graph_objects as go  # deferred: plotting libraries load only when drawing

        bars = [go.Bar(x=x, y=shown[b].to_numpy(), name=b, marker_color=COLORS[b]) for b in blocks]
        if embeddings is not None:
            bars.append(go.Bar(x=["embed"], y=[embeddings], name="embeddings", marker_color=COLORS["embeddings"]))
        fig = go.Figure(bars)
        if pruned is not None:
            fig.add_scatter(x=x, y=dense_total, mode="markers", name="dense total",
                            marker=dict(symbol="line-ew-open", size=14, color=COLORS["dense"]))
        fig.update_layout(barmode="stack", title=title, xaxis_title="layer", yaxis_title="parameters",
                          template="plotly_white")
        return fig
    if embeddings is None:
        fig, ax = _paper_axes()
    else:  # the embeddings in a narrow panel of their own scale, left of the layers
        import matplotlib.pyplot as plt  # deferred: plotting libraries load only when drawing

        _paper_axes()  # the shared style
        plt.close()
        fig, (emb, ax) = plt.subplots(1, 2, width_ratios=[1, 9], figsize=PAPER_RC["figure.figsize"],
                                      layout="constrained")
        emb.bar([0], [embeddings], width=0.6, color=COLORS["embeddings"])
        emb.set_xticks([0], ["embeddings"])
        emb.set_xlim(-0.6, 0.6)
        emb.set_ylabel("parameters")
    if pruned is not None:
        ax.bar(x, dense_total, width=0.8, fill=False, edgecolor=COLORS["dense"], linewidth=0.6, label="dense")
    bottom = np.zeros(len(x))
    for b in blocks:
        ax.bar(x, shown[b].to_numpy(), bottom=bottom, label=b, color=COLORS[b], width=0.8)
        bottom = bottom + shown[b].to_numpy()
    ax.set_xticks(range(0, len(x), 5))
    ax.set_xlabel("layer")
    ax.set_ylabel("parameters" if embeddings is None else "")
    ax.set_title(title)
    _legend_outside(ax)
    return fig


MODULE_ORDER = ["embeddings", "q", "k", "v", "o", "gate", "up", "down", "input_norm", "post_attn_norm", "lm_head"]


def weight_distribution(hist: pd.DataFrame, backend: str = "plotly", title: str = "Weight distribution (log count)"):
    """Histograms of weights per module kind (from `outliers.weight_histograms`) on a log count axis."""
    _check_backend(backend)
    kinds = [m for m in MODULE_ORDER if m in set(hist.module)] + sorted(set(hist.module) - set(MODULE_ORDER))
    if backend == "plotly":
        import plotly.graph_objects as go  # deferred: plotting libraries load only when drawing

        fig = go.Figure()
        for i, kind in enumerate(kinds):
            h = hist[hist.module == kind]
            fig.add_scatter(x=(h.left + h.right) / 2, y=h["count"].where(h["count"] > 0), mode="lines", name=kind,
                            line=dict(shape="hvh", color=_series_color(i)))
        fig.update_yaxes(type="log", title_text="count")
        fig.update_layout(title=title, xaxis_title="weight", template="plotly_white")
        return fig
    n = len(kinds)
    ncols = min(4, n)
    nrows = -(-n // ncols)
    import matplotlib.pyplot as plt  # deferred: plotting libraries load only when drawing
    import seaborn as sns  # deferred: plotting libraries load only when drawing

    sns.set_theme(context="paper", style="whitegrid", rc=PAPER_RC)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.8 * ncols, 1.6 * nrows), squeeze=False, layout="constrained")
    for ax, kind, i in zip(axes.flat, kinds, range(n)):
        h = hist[hist.module == kind]
        ax.stairs(h["count"].to_numpy(), np.r_[h.left.to_numpy(), h.right.to_numpy()[-1:]], fill=True,
                  color=_series_color(i))
        ax.set_yscale("log")
        ax.set_title(kind, fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig


def outlier_heatmap(stats: pd.DataFrame, value: str = "max_over_std", backend: str = "plotly", log: bool = True,
                    title: str | None = None):
    """Layer × module heatmap of a weight statistic (from `outliers.weight_stats`); layer −1 rows left out."""
    _check_backend(backend)
    if value not in stats.columns:
        raise ValueError(f"value={value!r} is not a column; available: {list(stats.columns)}")
    wide = stats[stats.layer >= 0].pivot_table(index="module", columns="layer", values=value)
    wide = wide.reindex([m for m in MODULE_ORDER if m in wide.index])
    z = np.log10(wide.clip(lower=1e-12)) if log else wide
    label = f"log10 {_words(value)}" if log else _words(value)
    title = title or f"{_words(value)} per layer and module"
    if backend == "plotly":
        import plotly.graph_objects as go  # deferred: plotting libraries load only when drawing

        fig = go.Figure(go.Heatmap(z=z.to_numpy(), x=list(wide.columns), y=list(wide.index), colorscale="Viridis",
                                   customdata=wide.to_numpy(), colorbar=dict(title=label),
                                   hovertemplate="layer %{x}<br>%{y}<br>" + value + " %{customdata:.3g}<extra></extra>"))
        fig.update_layout(title=title, xaxis_title="layer", yaxis_title="weight matrix", template="plotly_white",
                          xaxis=dict(dtick=5))
        return fig
    import seaborn as sns  # deferred: plotting libraries load only when drawing

    fig, ax = _paper_axes()
    sns.heatmap(z, ax=ax, cmap="viridis", cbar_kws=dict(label=label), xticklabels=False)
    _layer_ticks(ax, z.shape[1])
    ax.set_xlabel("layer")
    ax.set_ylabel("weight matrix")
    ax.set_title(title)
    return fig


def activation_magnitude(frame: pd.DataFrame, value: str = "max_abs", backend: str = "plotly",
                         title: str | None = None):
    """Hidden dimension × layer heatmap of an activation statistic (log10), from `ActivationStats.frame`."""
    _check_backend(backend)
    wide = frame.pivot_table(index="layer", columns="dim", values=value)
    z = np.log10(wide.clip(lower=1e-8))
    title = title or f"{_words(value)} per hidden dimension and layer (log10)"
    if backend == "plotly":
        import plotly.graph_objects as go  # deferred: plotting libraries load only when drawing

        fig = go.Figure(go.Heatmap(z=z.to_numpy(), x=list(wide.columns), y=list(wide.index), colorscale="Magma",
                                   customdata=wide.to_numpy(), colorbar=dict(title=f"log10 {_words(value)}"),
                                   hovertemplate="layer %{y}<br>dim %{x}<br>%{customdata:.3g}<extra></extra>"))
        fig.update_layout(title=title, xaxis_title="hidden dimension", yaxis_title="layer", template="plotly_white")
        return fig
    fig, ax = _paper_axes()
    im = ax.imshow(z.to_numpy(), aspect="auto", cmap="magma", interpolation="nearest")
    ax.grid(False)
    fig.colorbar(im, ax=ax, label=f"log10 {_words(value)}")
    ax.set_yticks(range(0, z.shape[0], 5), [str(t) for t in wide.index[::5]])
    ax.set_xlabel("hidden dimension")
    ax.set_ylabel("layer")
    ax.set_title(title)
    return fig
