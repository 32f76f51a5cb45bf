"""Figures of plans and their making: kept fraction per layer, gradient/importance scales, settings side by side, the
x:y search.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from workbench.plots.style import (
    COLORS,
    STAT_LABELS,
    _check_backend,
    _layer_ticks,
    _legend_outside,
    _paper_axes,
    _series_color,
)


def kept_fraction_per_layer(summary: pd.DataFrame, backend: str = "plotly", title: str | None = None):
    """Per-layer kept fraction of attention groups and MLP channels (summary from `plans.layer_summary`)."""
    _check_backend(backend)
    title = title or "Kept fraction per layer"
    if backend == "plotly":
        import plotly.graph_objects as go  # deferred: plotting libraries load only when drawing

        fig = go.Figure()
        for block in ("attn", "mlp"):
            part = summary[summary.block == block]
            fig.add_trace(go.Scatter(
                x=part.layer, y=part.kept_fraction, mode="lines+markers", name=block, marker_color=COLORS[block],
                customdata=part[["kept", "units"]].to_numpy(),
                hovertemplate="layer %{x}<br>kept %{customdata[0]} of %{customdata[1]}<br>fraction %{y:.2f}",
            ))
        n_layers = int(summary.layer.max()) + 1 if len(summary) else 1
        fig.update_layout(title=title, xaxis_title="layer", yaxis_title="kept fraction", yaxis_range=[-0.02, 1.02],
                          template="plotly_white", xaxis=dict(tick0=0, dtick=max(1, n_layers // 6)))  # whole layers
        return fig
    fig, ax = _paper_axes()
    for block in ("attn", "mlp"):
        part = summary[summary.block == block]
        ax.plot(part.layer, part.kept_fraction, marker="o", ms=3, label=block, color=COLORS[block])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("layer")
    ax.set_ylabel("kept fraction")
    ax.set_title(title)
    _legend_outside(ax)
    return fig


def scale_per_layer(per_block: pd.DataFrame, columns=("grad_mean_abs", "imp_mean"), backend: str = "plotly",
                    title: str | None = None):
    """Per-layer scale of gradient / importance statistics on log axes: one panel per column, a line per block.

    Non-positive values have no place on a log axis and are left out of the line (shown as gaps).
    """
    _check_backend(backend)
    missing = [c for c in columns if c not in per_block.columns]
    if missing:
        raise ValueError(f"columns {missing} are not in the table; available: {list(per_block.columns)}")
    title = title or "Scale per layer (log axis)"

    def series(col, block):
        part = per_block[per_block.block == block].sort_values("layer")
        y = part[col].astype(float).where(part[col] > 0)
        return part.layer.to_numpy(), y.to_numpy()

    if backend == "plotly":
        from plotly.subplots import make_subplots  # deferred: plotting libraries load only when drawing

        fig = make_subplots(rows=1, cols=len(columns), subplot_titles=[STAT_LABELS.get(c, c) for c in columns])
        for j, col in enumerate(columns, start=1):
            for block in ("attn", "mlp"):
                x, y = series(col, block)
                fig.add_scatter(x=x, y=y, mode="lines+markers", name=block, marker_color=COLORS[block],
                                legendgroup=block, showlegend=j == 1, row=1, col=j)
            fig.update_yaxes(type="log", row=1, col=j)
            fig.update_xaxes(title_text="layer", row=1, col=j)
        fig.update_layout(title=title, template="plotly_white")
        return fig
    fig, axes = _paper_axes(len(columns), width_per_panel=3.0)
    for ax, col in zip(axes[0], columns):
        for block in ("attn", "mlp"):
            x, y = series(col, block)
            ax.plot(x, y, marker="o", ms=2.5, label=block, color=COLORS[block])
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel(STAT_LABELS.get(col, col))
    _legend_outside(axes[0][-1])
    fig.suptitle(title)
    return fig


def pruned_fraction_by_setting(summaries: dict[str, pd.DataFrame], backend: str = "plotly", title: str | None = None):
    """Per-layer pruned fraction under several settings: a panel per block, a line per setting.

    `summaries` maps a setting's name to its `plans.layer_summary(plan)`.
    """
    _check_backend(backend)
    if not summaries:
        raise ValueError("summaries is empty: pass {setting name: layer_summary(plan)}")
    title = title or "Pruned fraction per layer"
    if backend == "plotly":
        from plotly.subplots import make_subplots  # deferred: plotting libraries load only when drawing

        fig = make_subplots(rows=1, cols=2, subplot_titles=["attention (KV groups)", "MLP (channels)"], shared_yaxes=True)
        for i, (name, s) in enumerate(summaries.items()):
            for j, block in enumerate(("attn", "mlp"), start=1):
                part = s[s.block == block]
                fig.add_scatter(x=part.layer, y=part.pruned_fraction, mode="lines+markers", name=name,
                                legendgroup=name, showlegend=j == 1, marker_color=_series_color(i), row=1, col=j)
                fig.update_xaxes(title_text="layer", row=1, col=j)
        fig.update_yaxes(range=[-0.02, 1.02], title_text="pruned fraction", row=1, col=1)
        fig.update_layout(title=title, template="plotly_white")
        return fig
    fig, axes = _paper_axes(2, width_per_panel=3.2)
    for i, (name, s) in enumerate(summaries.items()):
        for ax, block in zip(axes[0], ("attn", "mlp")):
            part = s[s.block == block]
            ax.plot(part.layer, part.pruned_fraction, marker="o", ms=2.5, label=name, color=_series_color(i))
    for ax, label in zip(axes[0], ("attention (KV groups)", "MLP (channels)")):
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("layer")
        ax.set_title(label)
    axes[0][0].set_ylabel("pruned fraction")
    _legend_outside(axes[0][1], fontsize=7)
    fig.suptitle(title)
    return fig


def pruned_fraction_heatmap(summaries: dict[str, pd.DataFrame], backend: str = "plotly", title: str | None = None):
    """Setting × layer heatmaps of the pruned fraction, one per block: many settings without tangled lines.

    `summaries` maps a setting's name to its `plans.layer_summary(plan)`; rows keep the dict's order.
    """
    _check_backend(backend)
    if not summaries:
        raise ValueError("summaries is empty: pass {setting name: layer_summary(plan)}")
    title = title or "Pruned fraction per layer and setting"
    grids = {block: pd.DataFrame({name: s[s.block == block].set_index("layer").pruned_fraction
                                  for name, s in summaries.items()}).T for block in ("attn", "mlp")}
    labels = {"attn": "attention (KV groups)", "mlp": "MLP (channels)"}
    if backend == "plotly":
        from plotly.subplots import make_subplots  # deferred: plotting libraries load only when drawing

        fig = make_subplots(rows=1, cols=2, subplot_titles=[labels["attn"], labels["mlp"]], shared_yaxes=True)
        for j, block in enumerate(("attn", "mlp"), start=1):
            g = grids[block]
            fig.add_heatmap(z=g.to_numpy(), x=list(g.columns), y=list(g.index), zmin=0, zmax=1, colorscale="Reds",
                            showscale=j == 2, colorbar=dict(title="pruned"), row=1, col=j,
                            hovertemplate="%{y}<br>layer %{x}<br>pruned %{z:.2f}<extra></extra>")
            fig.update_xaxes(title_text="layer", dtick=5, row=1, col=j)
        fig.update_layout(title=title, template="plotly_white")
        return fig
    import seaborn as sns  # deferred: plotting libraries load only when drawing

    fig, axes = _paper_axes(2, width_per_panel=3.4)
    for j, (ax, block) in enumerate(zip(axes[0], ("attn", "mlp"))):
        g = grids[block]
        sns.heatmap(g, ax=ax, vmin=0, vmax=1, cmap="Reds", cbar=j == 1, xticklabels=False,
                    yticklabels=j == 0, cbar_kws=dict(label="pruned fraction") if j == 1 else None)
        _layer_ticks(ax, g.shape[1])
        ax.set_xlabel("layer")
        ax.set_ylabel("")
        ax.set_title(labels[block])
    fig.suptitle(title)
    return fig


def xy_curve(result: pd.DataFrame, backend: str = "plotly", title: str = "Attention:MLP distribution search"):
    """PPL on held-out calibration windows against x of x:y (x + y = 10), coarse and fine points apart."""
    _check_backend(backend)
    finite = result[np.isfinite(result["ppl"])]
    if finite.empty:
        raise ValueError("the search has no feasible point: nothing to draw")
    if backend == "plotly":
        import plotly.graph_objects as go  # deferred: plotting libraries load only when drawing

        fig = go.Figure([go.Scatter(x=part["x"], y=part["ppl"], mode="markers+lines" if phase == "coarse" else "markers",
                                    name=phase, marker_color=_series_color(i))
                         for i, (phase, part) in enumerate(finite.groupby("phase", sort=True))])
        fig.update_layout(title=title, xaxis_title="x (attention share of removed parameters, of 10)",
                          yaxis_title="held-out PPL", template="plotly_white")
        fig.update_yaxes(type="log")
        return fig
    fig, ax = _paper_axes()
    for i, (phase, part) in enumerate(finite.groupby("phase", sort=True)):
        ax.plot(part["x"], part["ppl"], "o-" if phase == "coarse" else "o", label=phase, color=_series_color(i), ms=3)
    ax.set_yscale("log")
    ax.set_xlabel("x of x:y (attention share of removed parameters, of 10)")
    ax.set_ylabel("held-out PPL")
    ax.set_title(title)
    _legend_outside(ax)
    return fig
