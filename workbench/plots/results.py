"""Figures and tables of results: perplexity and accuracy bars, styled tables, training curves, sweep metrics and correlations."""
from __future__ import annotations

import numpy as np
import pandas as pd

from workbench.plots.style import (
    COLORS,
    _check_backend,
    _legend_outside,
    _paper_axes,
    _series_color,
)


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
