"""Where the workbench reads and writes, and how it writes: folders resolved when called, atomic files.

Folders come from environment variables at call time (never frozen at import), so a test or a
notebook can redirect them with `WORKBENCH_DATA_CACHE`, `WORKBENCH_EXPERIMENTS`, `WORKBENCH_FIGURES`.
Every file is written under a temporary name and renamed into place, so a reader never sees a
half-written file; `confined` refuses a relative path that would leave its folder.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def data_cache(*parts: str) -> Path:
    """`data_cache/` (or `$WORKBENCH_DATA_CACHE`), optionally a sub-folder of it."""
    return Path(os.environ.get("WORKBENCH_DATA_CACHE") or REPO_ROOT / "data_cache").joinpath(*parts)


def experiments_root() -> Path:
    """`experiments/` (or `$WORKBENCH_EXPERIMENTS`): one directory per run."""
    return Path(os.environ.get("WORKBENCH_EXPERIMENTS") or REPO_ROOT / "experiments")


def figures_root() -> Path:
    """`figures/` (or `$WORKBENCH_FIGURES`): paper figures exported for the whole project."""
    return Path(os.environ.get("WORKBENCH_FIGURES") or REPO_ROOT / "figures")


def confined(root: str | os.PathLike, relpath: str | os.PathLike) -> Path:
    """`root / relpath`, refusing absolute paths, `..` that climbs out, and names with control characters."""
    rel = str(relpath)
    if not rel or any(ord(ch) < 32 for ch in rel):
        raise ValueError(f"path {rel!r} is empty or holds a control character (newline, tab, …)")
    if Path(rel).is_absolute():
        raise ValueError(f"path {rel!r} must be relative to {root}")
    base = Path(root).resolve()
    target = (base / rel).resolve()
    if target != base and base not in target.parents:
        raise ValueError(f"path {rel!r} leaves its folder {base}")
    return Path(root) / rel


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write text or bytes to a temporary file, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def torch_save_atomic(obj, path: str | os.PathLike) -> Path:
    """`torch.save` to a temporary name, then rename: a reader never sees a half-written file."""
    import torch  # deferred: paths stays importable without torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def replace_dir(new: Path, target: Path) -> None:
    """Put the complete folder `new` at `target`; an existing `target` is swapped out first, removed last.

    Interrupted at any point, either the old or the new folder is at `target` or beside it under a
    hidden name: never neither.
    """
    if not target.exists():
        os.replace(new, target)
        return
    old = target.with_name(f".{target.name}.old.{os.getpid()}")
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
