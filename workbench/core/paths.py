"""Where the workbench reads and writes, and how it writes: folders resolved when called, atomic files.

Folders come from environment variables at call time (never frozen at import), so a test or a
notebook can redirect them with `WORKBENCH_DATA_CACHE`, `WORKBENCH_EXPERIMENTS`, `WORKBENCH_FIGURES`.
Every file is written under a temporary name and renamed into place, so a reader never sees a
half-written file; `confined` refuses a relative path that would leave its folder.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


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
        plain = Path(os.path.normpath(base / rel))
        if plain == base or base in plain.parents:  # inside by name: a symbolic link leads out
            raise ValueError(f"path {rel!r} under {base} is (or lies under) a symbolic link to {target}, outside "
                             "that folder; links that leave it are not followed (copy or move the files there)")
        raise ValueError(f"path {rel!r} leaves its folder {base}")
    return Path(root) / rel


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """The one atomic writer: a new hidden file beside `path` (named by host and process, see `staging_file`)
    to write inside the block; renamed over `path` when the block ends, removed when it raises. A reader never
    sees a half-written file, and the file gets the umask's permissions.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> with atomic_path(folder / "a.txt") as tmp:
    ...     _ = tmp.write_text("done")
    >>> sorted(p.name for p in folder.iterdir()), (folder / "a.txt").read_text()
    (['a.txt'], 'done')
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_file(path.parent, path.name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write text or bytes atomically (`atomic_path`), synced to disk before the rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
        fh.flush()
        os.fsync(fh.fileno())
    return Path(path)


def torch_save_atomic(obj, path: str | os.PathLike) -> Path:
    """`torch.save` atomically (`atomic_path`)."""
    import torch  # deferred: paths stays importable without torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


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


def _host_tag() -> str:
    return hashlib.sha1(platform.node().encode()).hexdigest()[:8]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_STAGING = re.compile(r"^\..*\.staging-([0-9a-f]{8})-(\d+)-[^/]*$")


def staging_dir(parent: str | os.PathLike, name: str) -> Path:
    """A new hidden folder in `parent` to build `name` in before it is moved into place. Its name carries this
    host and process, so a later start can prove it a dead process's leftover (`clean_staging`); its
    permissions follow the umask (a shared folder stays shared)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.staging-{_host_tag()}-{os.getpid()}-", dir=parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def staging_file(parent: str | os.PathLike, name: str, suffix: str = ".tmp") -> Path:
    """Like `staging_dir`, a new hidden file (for writers that stream into one file, e.g. GGUF)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.staging-{_host_tag()}-{os.getpid()}-", suffix=suffix, dir=parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return Path(tmp)


def process_alive(pid: int) -> bool:
    """Whether a process of this host with this pid exists (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_staging(parent: str | os.PathLike) -> list[Path]:
    """Remove the staging folders and files in `parent` that a process of this host left behind when it died
    (killed mid-run); anything else, another host's or a live process's, is left alone. Returns what went."""
    parent = Path(parent)
    gone = []
    if not parent.is_dir():
        return gone
    for item in parent.iterdir():
        m = _STAGING.match(item.name)
        if m and m[1] == _host_tag() and int(m[2]) != os.getpid() and not process_alive(int(m[2])):
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)
            gone.append(item)
    return gone
