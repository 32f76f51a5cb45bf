"""One directory per experiment with a fixed layout, written atomically.

    <root>/<name>/
        config.json          every setting of the run
        analysis/            importance table, per-layer summary, diagnosis (CSV / JSON)
        evaluation/          perplexity and other results (JSON)
        figures/             exported figures
        model/               optional pruned (or fine-tuned) checkpoint
        checkpoints/         resumable training state of a fine-tuning run

Every file is written to a temporary name and renamed into place, so an interrupted run never
leaves a file that parses but lies. Names and relative paths are confined to the experiments root:
`..`, absolute paths and control characters are refused.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from workbench.core.paths import (
    clean_staging,
    confined,
    experiments_root,
    figures_root,
    replace_dir,
    staging_dir,
    write_atomic,
)

SUBDIRS = ("analysis", "evaluation", "figures", "model", "checkpoints")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_NAME = 200  # file names hold 255 bytes; the staging folder adds its own part


def jsonable(obj):
    """`obj` as plain JSON values: dataclasses as dicts, tuples as lists, numpy / torch scalars as numbers, inf / NaN
    as strings (JSON has none)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)  # JSON has no inf/NaN; keep them readable
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return jsonable(obj.item())
    return obj


class Experiment:
    """A run's directory. Holds only its path; every read and write goes through the fixed layout."""

    def __init__(self, root: str | os.PathLike, name: str | None = None):
        self.root = Path(root)
        self.name = name or self.root.name  # a staged run is written elsewhere under its final name
        # whether `plots.export` also copies figures into the project's figures/ now; a staged run copies them
        # only once it is complete (a failed run leaves none there), a sweep's run never
        self.project_figures = True

    @staticmethod
    def check_new(name: str, *, base: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
        """The folder a new experiment `name` would take; refuses a bad name, or an existing one without overwrite."""
        final = _root_of(name, base)
        if final.exists() and not overwrite:
            raise FileExistsError(f"experiment {final} exists; choose another name or pass overwrite=True")
        return final

    @classmethod
    @contextlib.contextmanager
    def staged(cls, name: str | None = None, *, base: str | os.PathLike | None = None,
               overwrite: bool = False, project_figures: bool = True) -> Iterator[Experiment]:
        """A new run written into a hidden staging folder, moved into place only when the block succeeds.

        A failing run leaves nothing behind (its staging folder is removed, and no figure of it reaches the
        project's figures/); an existing experiment of the same name is refused up front unless
        `overwrite=True`, and then replaced only at the end. So one directory never mixes two runs, and no
        run is left half-written under its name. Its figures are copied into the project's figures/ when it
        is complete, unless `project_figures=False` (a sweep's runs keep theirs inside).
        """
        name = time.strftime("run-%Y%m%d-%H%M%S") if name is None else name
        final = cls.check_new(name, base=base, overwrite=overwrite)
        clean_staging(final.parent)  # what a killed run left here
        staging = staging_dir(final.parent, name)
        exp = cls(staging, name=name)
        exp.project_figures = False  # deferred to the end: a failed run publishes nothing
        for sub in SUBDIRS:
            (staging / sub).mkdir()
        try:
            yield exp
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if final.exists() and not overwrite:  # made by someone else meanwhile
            shutil.rmtree(staging, ignore_errors=True)
            raise FileExistsError(f"experiment {final} appeared while this run was going; its results were discarded")
        replace_dir(staging, final)
        exp.root = final
        exp.project_figures = project_figures
        if project_figures:
            publish_figures(exp)

    @classmethod
    def create(cls, name: str | None = None, config: dict | None = None, *, base: str | os.PathLike | None = None,
               exist_ok: bool = False) -> Experiment:
        name = time.strftime("run-%Y%m%d-%H%M%S") if name is None else name
        exp = cls(_root_of(name, base))
        if exp.root.exists() and not exist_ok:
            raise FileExistsError(f"experiment {exp.root} exists; choose another name or pass exist_ok=True")
        for sub in SUBDIRS:
            (exp.root / sub).mkdir(parents=True, exist_ok=True)
        if config is not None:
            exp.write_json("config.json", config)
        return exp

    def path(self, relpath: str) -> Path:
        path = confined(self.root, relpath)
        first = Path(relpath).parts[0]
        if relpath != "config.json" and (first not in SUBDIRS or len(Path(relpath).parts) < 2):
            raise ValueError(f"{relpath!r} is outside the layout: config.json or a file in one of {list(SUBDIRS)}")
        return path

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @classmethod
    def open(cls, name: str, *, base: str | os.PathLike | None = None) -> Experiment:
        """An existing experiment by name (an error naming the folder if there is none)."""
        exp = cls(_root_of(name, base))
        if not exp.root.is_dir():
            raise FileNotFoundError(f"no experiment {name!r} under {exp.root.parent}; run the notebook that makes it first")
        return exp

    def write_json(self, relpath: str, obj) -> Path:
        return write_atomic(self.path(relpath), json.dumps(jsonable(obj), indent=2, ensure_ascii=False))

    def read_json(self, relpath: str):
        return json.loads(self.path(relpath).read_text())

    def write_table(self, relpath: str, df: pd.DataFrame) -> Path:
        if not relpath.endswith(".csv"):
            raise ValueError(f"{relpath!r}: tables are written as .csv")
        return write_atomic(self.path(relpath), df.to_csv(index=False))

    def read_table(self, relpath: str) -> pd.DataFrame:
        return pd.read_csv(self.path(relpath))


def publish_figures(exp: Experiment) -> list[Path]:
    """Copy an experiment's figures into the project's figures/ as `<experiment>_<figure>` (atomically each)."""
    out = []
    if exp.figures.is_dir():
        figures_root().mkdir(parents=True, exist_ok=True)
        for f in sorted(exp.figures.iterdir()):
            if f.is_file() and not f.name.startswith("."):
                out.append(write_atomic(figures_root() / f"{exp.name}_{f.name}", f.read_bytes()))
    return out


def _root_of(name: str, base: str | os.PathLike | None) -> Path:
    """The folder of experiment `name` under `base` (default: the experiments root); the name is checked."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"experiment name {name!r} must be letters, digits, '.', '_' or '-', starting with a "
                         "letter or digit (no path separators, no newline)")
    if len(name) > MAX_NAME:
        raise ValueError(f"experiment name {name[:20]!r}… has {len(name)} characters; at most {MAX_NAME}")
    return confined(Path(base) if base is not None else experiments_root(), name)
