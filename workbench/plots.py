"""Figures: one function per figure kind, plotly for interactive views, matplotlib for paper export.

Every figure function takes `backend="plotly"` (interactive, for notebooks) or `backend="paper"`
(matplotlib, consistent style, for `export`). `export` writes PDF/PNG/SVG atomically, by one rule: into
an experiment's `figures/` and, named after the experiment, into the project's `figures/`.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from workbench.experiments import Experiment
from workbench.paths import figures_root

BACKENDS = ("plotly", "paper")
EXPORT_FORMATS = ("pdf", "png", "svg")

# One palette and size for every figure, interactive or exported.
COLORS = {"attn": "#1f77b4", "mlp": "#ff7f0e", "norms": "#7f7f7f", "dense": "#7f7f7f", "pruned": "#d62728",
          "embeddings": "#9467bd"}
# Series without a fixed color (settings, models, methods) take these in order.
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
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not allowed; allowed: {list(BACKENDS)}")


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


# Words for statistic column names on axes and colour bars.
VALUE_LABELS = {
    "max_over_std": "max |w| / std", "kurtosis": "kurtosis", "outlier_share": "share beyond kσ",
    "max_abs": "max |activation|", "mean_abs": "mean |activation|", "ppl": "perplexity",
}


def _words(name: str) -> str:
    return VALUE_LABELS.get(name) or STAT_LABELS.get(name) or name.replace("_", " ")


# Axis labels of the diagnosis statistics (columns of `diagnosis.diagnose(...)["per_block"]`).
STAT_LABELS = {
    "grad_mean_abs": "mean |g|", "grad_norm": "gradient norm", "grad_max_abs": "max |g|",
    "imp_mean": "mean importance per unit", "imp_sum": "total importance", "imp_max": "max importance",
    "score_mean": "mean importance / parameter (ranked)",
    "removal_loss": "block removal loss",
    "first": "Σ|w·g| (first order)", "second_batch": "½Σw²F, batch-mean Fisher",
    "second_seq": "½Σw²F, per-sequence Fisher", "batch_over_first": "second (batch) / first",
    "seq_over_first": "second (per sequence) / first",
}


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


def kept_fraction_per_layer(summary: pd.DataFrame, backend: str = "plotly", title: str | None = None):
    """Per-layer kept fraction of attention groups and MLP channels (summary from `selection.layer_summary`)."""
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

    `summaries` maps a setting's name to its `selection.layer_summary(plan)`.
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


def grouped_bars(frame: pd.DataFrame, backend: str = "plotly", *, ylabel: str = "", title: str = "",
                 log_y: bool = False):
    """Bars for a table: the index along the x axis, one colored bar per column (e.g. tasks × models)."""
    _check_backend(backend)
    if frame.empty:
        raise ValueError("frame is empty: nothing to draw")
    if backend == "plotly":
        import plotly.graph_objects as go  # deferred: plotting libraries load only when drawing

        fig = go.Figure([go.Bar(x=[str(i) for i in frame.index], y=frame[c], name=str(c), marker_color=_series_color(i))
                         for i, c in enumerate(frame.columns)])
        fig.update_layout(barmode="group", title=title, yaxis_title=ylabel, template="plotly_white")
        if log_y:
            fig.update_yaxes(type="log")
        return fig
    fig, ax = _paper_axes()
    n = len(frame.columns)
    width = 0.8 / n
    x = range(len(frame.index))
    for i, c in enumerate(frame.columns):
        ax.bar([xi - 0.4 + width * (i + 0.5) for xi in x], frame[c], width=width, label=str(c), color=_series_color(i))
    ax.set_xticks(list(x), [str(i) for i in frame.index], rotation=30 if len(frame.index) > 4 else 0, ha="right"
                  if len(frame.index) > 4 else "center")
    if log_y:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _legend_outside(ax)
    return fig


def styled(table: pd.DataFrame):
    """A table as a notebook shows it: perplexities and losses to 2 decimals, counts with thousands
    separators, importance / score columns in scientific notation, fractions as percentages, text whole."""
    formats = {}
    for col in table.columns:
        name, values = str(col).lower(), table[col]
        if pd.api.types.is_bool_dtype(values) or not pd.api.types.is_numeric_dtype(values):
            continue
        if pd.api.types.is_integer_dtype(values):
            formats[col] = "{:,}"
        elif "ppl" in name or "loss" in name or "perplexity" in name:
            formats[col] = "{:,.2f}"
        elif "fraction" in name or "pruned" in name or "share" in name or name.startswith("ratio"):
            formats[col] = "{:.1%}"
        elif any(k in name for k in ("imp", "score", "grad", "fisher", "first", "second")):
            formats[col] = "{:.3e}"
        else:
            formats[col] = "{:,.4g}"
    return table.style.format(formats, na_rep="–").set_properties(**{"white-space": "pre-wrap"})


def ppl_bars(ppl: pd.Series, backend: str = "plotly", *, dense: float | None = None, title: str = "Perplexity",
             log_y: bool = True):
    """Perplexity per plan/setting: bars sorted best first, value labels, log axis, the dense model as a line."""
    _check_backend(backend)
    if ppl.empty:
        raise ValueError("ppl is empty: nothing to draw")
    ppl = ppl.astype(float).sort_values()
    names, values = [str(i) for i in ppl.index], ppl.to_numpy()
    if backend == "plotly":
        import plotly.graph_objects as go  # deferred: plotting libraries load only when drawing

        fig = go.Figure(go.Bar(x=names, y=values, text=[f"{v:,.2f}" for v in values], textposition="outside",
                               marker_color=COLORS["pruned"], name="pruned"))
        if dense is not None:
            fig.add_hline(y=dense, line_dash="dash", line_color=COLORS["dense"], annotation_text=f"dense {dense:,.2f}",
                          annotation_position="top left")
        fig.update_layout(title=title, yaxis_title="perplexity" + (" (log)" if log_y else ""), template="plotly_white",
                          showlegend=False)
        if log_y:
            fig.update_yaxes(type="log")
        return fig
    fig, ax = _paper_axes()
    bars = ax.bar(range(len(values)), values, color=COLORS["pruned"], width=0.7)
    ax.bar_label(bars, labels=[f"{v:,.2f}" for v in values], fontsize=7, padding=2)
    if dense is not None:
        ax.axhline(dense, ls="--", lw=0.8, color=COLORS["dense"], label=f"dense ({dense:,.2f})")
        _legend_outside(ax)
    rotate = len(values) > 4
    ax.set_xticks(range(len(values)), names, rotation=30 if rotate else 0, ha="right" if rotate else "center")
    if log_y:
        from matplotlib.ticker import FuncFormatter, LogLocator  # deferred: plotting libraries load only when drawing

        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:,.0f}")  # 20, 30, 100, not 2×10¹
        ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 3.0, 5.0)))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    ax.set_ylabel("perplexity" + (" (log)" if log_y else ""))
    ax.set_title(title)
    return fig


def pruned_fraction_heatmap(summaries: dict[str, pd.DataFrame], backend: str = "plotly", title: str | None = None):
    """Setting × layer heatmaps of the pruned fraction, one per block: many settings without tangled lines.

    `summaries` maps a setting's name to its `selection.layer_summary(plan)`; rows keep the dict's order.
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


def _complete(table: pd.DataFrame, columns) -> pd.DataFrame:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"columns {missing} are not in the table; available: {list(table.columns)}")
    done = table[table["status"] == "complete"] if "status" in table.columns else table
    done = done.assign(**{c: pd.to_numeric(done[c], errors="coerce") for c in columns[:2]}).dropna(subset=columns[:2])
    if done.empty:
        raise ValueError(f"no complete run has both {columns[0]!r} and {columns[1]!r}: nothing to draw")
    return done


def sweep_metric(table: pd.DataFrame, x: str, y: str = "ppl", by: str = "method", backend: str = "plotly",
                 log_y: bool = True, title: str | None = None):
    """A consolidated sweep: mean `y` against setting `x`, one line per `by` value, one panel per model."""
    _check_backend(backend)
    done = _complete(table, [x, y, by, "model"])
    models = sorted(done["model"].astype(str).unique())
    title = title or f"{y} against {x}"
    groups = sorted(done[by].astype(str).unique())

    def series(model, group):
        part = done[(done["model"].astype(str) == model) & (done[by].astype(str) == group)]
        mean = part.groupby(x)[y].mean().sort_index()
        return mean.index.to_numpy(), mean.to_numpy()

    if backend == "plotly":
        from plotly.subplots import make_subplots  # deferred: plotting libraries load only when drawing

        fig = make_subplots(rows=1, cols=len(models), subplot_titles=models)
        for j, model in enumerate(models, start=1):
            for i, g in enumerate(groups):
                xs, ys = series(model, g)
                fig.add_scatter(x=xs, y=ys, mode="lines+markers", name=g, legendgroup=g, showlegend=j == 1,
                                marker_color=_series_color(i), row=1, col=j)
            fig.update_xaxes(title_text=x.removeprefix("cfg."), row=1, col=j)
            if log_y:
                fig.update_yaxes(type="log", row=1, col=j)
        fig.update_layout(title=title, yaxis_title=y, template="plotly_white")
        return fig
    fig, axes = _paper_axes(len(models), width_per_panel=3.0)
    for ax, model in zip(axes[0], models):
        for i, g in enumerate(groups):
            xs, ys = series(model, g)
            ax.plot(xs, ys, "o-", label=g, color=_series_color(i), ms=3)
        ax.set_title(model)
        ax.set_xlabel(x.removeprefix("cfg."))
        if log_y:
            ax.set_yscale("log")
    axes[0][0].set_ylabel(y)
    _legend_outside(axes[0][-1])
    fig.suptitle(title)
    return fig


def correlation_scatter(table: pd.DataFrame, x: str, y: str, by: str = "method", backend: str = "plotly",
                        title: str | None = None):
    """Complete runs as points (`x` against `y`, colored by `by`) with the least-squares line and Pearson r, n."""
    _check_backend(backend)
    done = _complete(table, [x, y, by])
    if done[x].nunique() < 2:
        raise ValueError(f"{x!r} takes one value over the complete runs: no line to fit")
    slope, intercept = np.polyfit(done[x], done[y], 1)
    r = float(np.corrcoef(done[x], done[y])[0, 1]) if done[y].nunique() > 1 else float("nan")
    line_x = np.linspace(done[x].min(), done[x].max(), 50)
    title = title or f"{y} against {x}: r = {r:.2f}, n = {len(done)}"
    groups = sorted(done[by].astype(str).unique())
    if backend == "plotly":
        import plotly.graph_objects as go  # deferred: plotting libraries load only when drawing

        fig = go.Figure([go.Scatter(x=done[done[by].astype(str) == g][x], y=done[done[by].astype(str) == g][y],
                                    mode="markers", name=g, marker_color=_series_color(i))
                         for i, g in enumerate(groups)])
        fig.add_scatter(x=line_x, y=slope * line_x + intercept, mode="lines", name="least squares",
                        line=dict(color="black", dash="dash"))
        fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, template="plotly_white")
        return fig
    fig, ax = _paper_axes()
    for i, g in enumerate(groups):
        part = done[done[by].astype(str) == g]
        ax.scatter(part[x], part[y], s=12, label=g, color=_series_color(i))
    ax.plot(line_x, slope * line_x + intercept, "k--", lw=1, label="least squares")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    _legend_outside(ax)
    return fig


def loss_curve(history: pd.DataFrame, evals: pd.DataFrame | None = None, backend: str = "plotly",
               title: str = "Fine-tuning loss"):
    """Training loss per optimizer step (with a moving average) and the held-out loss at its steps."""
    _check_backend(backend)
    if history.empty:
        raise ValueError("history is empty: no training step was recorded")
    smooth = history.loss.rolling(max(1, len(history) // 20), min_periods=1).mean()
    if backend == "plotly":
        import plotly.graph_objects as go  # deferred: plotting libraries load only when drawing

        fig = go.Figure([
            go.Scatter(x=history.step, y=history.loss, mode="lines", name="train loss", line=dict(color="#c7c7c7")),
            go.Scatter(x=history.step, y=smooth, mode="lines", name="train (moving avg)", line=dict(color=COLORS["attn"])),
        ])
        if evals is not None and len(evals):
            fig.add_scatter(x=evals.step, y=evals.eval_loss, mode="lines+markers", name="held-out loss",
                            marker_color=COLORS["pruned"])
        fig.update_layout(title=title, xaxis_title="optimizer step", yaxis_title="loss", template="plotly_white")
        return fig
    fig, ax = _paper_axes()
    ax.plot(history.step, history.loss, color="#c7c7c7", lw=0.8, label="train loss")
    ax.plot(history.step, smooth, color=COLORS["attn"], label="train (moving avg)")
    if evals is not None and len(evals):
        ax.plot(evals.step, evals.eval_loss, marker="o", ms=3, color=COLORS["pruned"], label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
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


def export(fig, name: str, target: Experiment | str | os.PathLike | None = None,
           formats=("pdf", "png"), show: bool = True) -> list[Path]:
    """Write a paper figure (matplotlib) as `<name>.<fmt>`, by one rule, and close it; returns the paths.

    `target` an experiment: into its `figures/` as `<name>.<fmt>` and into the project's `figures/` as
    `<experiment name>_<name>.<fmt>` (so runs never overwrite each other); a staged run's project copies are
    made when it completes, a sweep run's never (`Experiment.project_figures`). A folder: there only.
    None: the project's `figures/` only. `show`: in a notebook, the exported PNG is shown below the cell
    (what the paper gets, and it stays in a saved notebook).
    """
    import matplotlib.pyplot as plt  # deferred: plotting libraries load only when drawing

    bad = [f for f in formats if f not in EXPORT_FORMATS]
    if bad:
        raise ValueError(f"formats {bad} are not allowed; allowed: {list(EXPORT_FORMATS)}")
    if not hasattr(fig, "savefig"):
        raise TypeError("export takes a paper figure: call the figure function with backend='paper'")
    if not name or Path(name).name != name or any(ord(c) < 32 for c in name):
        raise ValueError(f"figure name {name!r} must be a plain file name (no folders, no control characters)")
    if isinstance(target, Experiment):
        targets = [(target.figures, name)]
        if target.project_figures:
            targets.append((figures_root(), f"{target.name}_{name}"))
    else:
        targets = [(Path(target) if target is not None else figures_root(), name)]
    paths = []
    for folder, stem in targets:
        folder.mkdir(parents=True, exist_ok=True)
        for fmt in formats:
            path = folder / f"{stem}.{fmt}"
            tmp = path.with_name(f".{path.name}.tmp")
            fig.savefig(tmp, format=fmt)
            os.replace(tmp, path)
            paths.append(path)
    plt.close(fig)
    png = next((p for p in paths if p.suffix == ".png"), None)
    if show and png is not None:
        _show_inline(png)
    return paths


def _show_inline(png: Path) -> None:
    """Display a PNG below the current notebook cell (nothing outside a notebook kernel)."""
    try:
        from IPython import get_ipython  # deferred: IPython exists only where notebooks run
        from IPython.display import Image, display  # deferred: as above
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None and getattr(shell, "kernel", None) is not None:
        display(Image(filename=str(png)))
