"""Paper export by one rule: PDF/PNG/SVG written atomically into an experiment's `figures/` and, named after the
experiment, the project's `figures/`.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workbench.core.experiments import Experiment
from workbench.core.paths import atomic_path, figures_root

EXPORT_FORMATS = ("pdf", "png", "svg")


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
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format=fmt)
            paths.append(path)
    plt.close(fig)
    png = next((p for p in paths if p.suffix == ".png"), None)
    if show and png is not None:
        _show_inline(png)
    return paths


def publish(figure: Callable[..., Any], *args: Any, name: str, to: Experiment | str | os.PathLike | None = None,
            formats: tuple[str, ...] = ("pdf", "png"), **kwargs: Any) -> Any:
    """One figure, shown and exported from one call: `figure(*args, backend="paper", **kwargs)` is exported by
    `export`'s rule (not shown), and the interactive `figure(*args, **kwargs)` is returned to display. The paper
    gets what the notebook shows: the same data, title and settings.

    >>> import pandas as pd, tempfile
    >>> from workbench.plots import ppl_bars
    >>> fig = publish(ppl_bars, pd.Series({"a": 12.0, "b": 15.0}), dense=10.0, name="ppl", to=tempfile.mkdtemp())
    >>> type(fig).__name__
    'Figure'
    """
    export(figure(*args, backend="paper", **kwargs), name, to, formats, show=False)
    return figure(*args, **kwargs)


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
