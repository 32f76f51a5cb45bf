"""Figures: one function per figure kind, plotly for interactive views, matplotlib for paper export.

Every figure function takes `backend="plotly"` (interactive, for notebooks) or `backend="paper"`
(matplotlib, consistent style, for `export`). `export` writes PDF/PNG/SVG atomically into `figures/`
or an experiment's `figures/` folder.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from workbench.models import REPO_ROOT

FIGURES = Path(os.environ.get("WORKBENCH_FIGURES", REPO_ROOT / "figures"))
BACKENDS = ("plotly", "paper")
EXPORT_FORMATS = ("pdf", "png", "svg")

# One palette and size for every figure, interactive or exported.
COLORS = {"attn": "#1f77b4", "mlp": "#ff7f0e", "norms": "#7f7f7f", "dense": "#7f7f7f", "pruned": "#d62728"}
PAPER_RC = {
    "figure.figsize": (6.0, 3.0),
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "savefig.bbox": "tight",
    "savefig.dpi": 200,
}


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not allowed; allowed: {list(BACKENDS)}")


def _paper_axes():
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", rc=PAPER_RC)
    fig, ax = plt.subplots()
    return fig, ax


def params_per_layer(anatomy_df: pd.DataFrame, backend: str = "plotly"):
    """Stacked bars: parameters of each layer's attention, MLP and norms."""
    _check_backend(backend)
    wide = anatomy_df.pivot_table(index="layer", columns="block", values="params", aggfunc="sum").fillna(0)
    blocks = [b for b in ("attn", "mlp", "norms") if b in wide.columns]
    if backend == "plotly":
        import plotly.graph_objects as go

        fig = go.Figure([go.Bar(x=wide.index, y=wide[b], name=b, marker_color=COLORS[b]) for b in blocks])
        fig.update_layout(barmode="stack", title="Parameters per layer and block", xaxis_title="layer",
                          yaxis_title="parameters", template="plotly_white")
        return fig
    fig, ax = _paper_axes()
    bottom = None
    for b in blocks:
        ax.bar(wide.index, wide[b], bottom=bottom, label=b, color=COLORS[b], width=0.8)
        bottom = wide[b] if bottom is None else bottom + wide[b]
    ax.set_xlabel("layer")
    ax.set_ylabel("parameters")
    ax.set_title("Parameters per layer and block")
    ax.legend(frameon=False)
    return fig


def kept_fraction_per_layer(summary: pd.DataFrame, backend: str = "plotly", title: str | None = None):
    """Per-layer kept fraction of attention groups and MLP channels (summary from `selection.layer_summary`)."""
    _check_backend(backend)
    title = title or "Kept fraction per layer"
    if backend == "plotly":
        import plotly.graph_objects as go

        fig = go.Figure()
        for block in ("attn", "mlp"):
            part = summary[summary.block == block]
            fig.add_trace(go.Scatter(
                x=part.layer, y=part.kept_fraction, mode="lines+markers", name=block, marker_color=COLORS[block],
                customdata=part[["kept", "units"]].to_numpy(),
                hovertemplate="layer %{x}<br>kept %{customdata[0]} of %{customdata[1]}<br>fraction %{y:.2f}",
            ))
        fig.update_layout(title=title, xaxis_title="layer", yaxis_title="kept fraction", yaxis_range=[-0.02, 1.02],
                          template="plotly_white")
        return fig
    fig, ax = _paper_axes()
    for block in ("attn", "mlp"):
        part = summary[summary.block == block]
        ax.plot(part.layer, part.kept_fraction, marker="o", ms=3, label=block, color=COLORS[block])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("layer")
    ax.set_ylabel("kept fraction")
    ax.set_title(title)
    ax.legend(frameon=False)
    return fig


def export(fig, name: str, directory: str | os.PathLike | None = None, formats=("pdf", "png")) -> list[Path]:
    """Write a paper figure (matplotlib) as `name.<fmt>` for each format; returns the paths."""
    bad = [f for f in formats if f not in EXPORT_FORMATS]
    if bad:
        raise ValueError(f"formats {bad} are not allowed; allowed: {list(EXPORT_FORMATS)}")
    if not hasattr(fig, "savefig"):
        raise TypeError("export takes a paper figure: call the figure function with backend='paper'")
    directory = Path(directory or FIGURES)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = directory / f"{name}.{fmt}"
        tmp = path.with_name(f".{path.name}.tmp")
        fig.savefig(tmp, format=fmt)
        os.replace(tmp, path)
        paths.append(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return paths
