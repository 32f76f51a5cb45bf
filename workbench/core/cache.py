"""The one cache for heavy results: compute once, keyed by model content + data + settings; memory and disk.

    result = cached("importance", make_key(model=model, data=samples, settings=dict(batch_size=4)),
                    compute, encode=to_payload, decode=from_payload)

The key hashes every byte of every parameter and the model's config (so zeroing a few weights or
changing `rope_theta` gives a new key), the data tensor and the settings. Results live in memory for
the session and on disk under `data_cache/<kind>/<key>.pt` (written atomically). A cache file that
cannot be read (truncated, another format) is named in a warning and recomputed, never trusted.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from workbench.core.paths import data_cache, torch_save_atomic
from workbench.core.registry import Registry

T = TypeVar("T")
_MEMORY: dict[tuple[str, str], Any] = {}
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_commit_hash", "gguf_source")  # gguf_source: where it was read


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).cpu().numpy())


_ONCE: dict[int, str | None] = {}  # id(model) -> its fingerprint, inside `fingerprint_once(model)`


@contextlib.contextmanager
def fingerprint_once(model: nn.Module) -> Iterator[None]:
    """Inside, `model_fingerprint(model)` reads every weight once and answers from memory after that: for the
    steps of a run that read the model without changing it (calibration, per-layer measures, selection, the
    model card), each cache key then costs no further pass over the weights. The model must not change inside.

    >>> from workbench.core.testing import tiny_model
    >>> m = tiny_model("llama", n_layers=1)
    >>> with fingerprint_once(m):
    ...     model_fingerprint(m) == model_fingerprint(m)
    True
    """
    key = id(model)
    outer = key in _ONCE
    if not outer:
        _ONCE[key] = None
    try:
        yield
    finally:
        if not outer:
            _ONCE.pop(key, None)


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the model's config and every byte of every parameter and persistent buffer (tied once);
    computed once inside `fingerprint_once(model)`."""
    key = id(model)
    if key in _ONCE:
        if _ONCE[key] is None:
            _ONCE[key] = _fingerprint(model)
        return str(_ONCE[key])
    return _fingerprint(model)


def _fingerprint(model: nn.Module) -> str:
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    h = hashlib.blake2b(json.dumps(cfg, sort_keys=True, default=str).encode(), digest_size=16)
    seen: set[int] = set()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()[:20]


def tensor_fingerprint(t: torch.Tensor) -> str:
    """Hash of a tensor's dtype, shape and bytes (calibration samples, evaluation windows)."""
    h = hashlib.blake2b(f"{t.dtype}|{tuple(t.shape)}".encode(), digest_size=16)
    h.update(_tensor_bytes(t))
    return h.hexdigest()[:20]


def make_key(*, model: nn.Module | None = None, data: torch.Tensor | None = None, settings: dict | None = None) -> str:
    """A cache key from the model's content, the data and JSON-able settings (sorted, so order does not matter)."""
    parts = [model_fingerprint(model) if model is not None else "-",
             tensor_fingerprint(data) if data is not None else "-",
             json.dumps(settings or {}, sort_keys=True, default=str)]
    return hashlib.blake2b("|".join(parts).encode(), digest_size=12).hexdigest()


# Every kind of cached result, each a folder of `data_cache/` (docs/ARCHITECTURE.md lists them; a test checks).
CACHE_KINDS = Registry("cache kind", {
    "importance": "the calibration pass's per-unit importance of every method (scoring.importance)",
    "block_loss": "calibration-loss increase with each block bypassed (scoring.removal)",
    "activations": "streamed activation statistics at the tracer's sites (scoring.activations)",
    "layer_loss": "calibration-loss increase with each whole layer bypassed (scoring.layer_importance)",
    "block_influence": "ShortGPT's Block Influence per layer (scoring.layer_importance)",
    "reconstruction": "closed-form re-fit solutions of pruned blocks' output projections (surgery.reconstruct)",
    "xy_point": "one point of the Attention:MLP distribution search (analysis.distribution)",
    "converted": "GGUF files de-quantized once to float32 folders, by file hash (surgery.checkpoints)",
})


def cache_path(kind: str, key: str, cache: bool | str | os.PathLike = True) -> Path | None:
    """Where a result of this kind and key lives on disk (None when `cache` is False)."""
    if cache is False:
        return None
    folder = data_cache(kind) if cache is True else Path(cache) / kind  # kinds apart: one key may serve several
    return folder / f"{key}.pt"


def clear_memory() -> None:
    """Forget every result held in memory (the disk cache stays)."""
    _MEMORY.clear()


def cached(kind: str, key: str, compute: Callable[[], T], *, cache: bool | str | os.PathLike = True,
           encode: Callable[[T], Any] = lambda x: x, decode: Callable[[Any], T] = lambda x: x,
           version: int = 1, write: bool = True) -> T:
    """`compute()` once per (kind, key): from memory, else from disk, else computed and stored in both.

    `cache=True` uses `data_cache/<kind>/`, a path P uses `P/<kind>/`, `False` neither memory nor disk.
    `encode`/`decode` turn the result into something `torch.save` stores (plain containers, tensors).
    `version` is the payload's format: a file of another version is recomputed.
    `write=False` reads the disk but never writes it (the non-zero ranks of a data-parallel pass).
    """
    CACHE_KINDS.check(kind)
    if cache is False:
        return compute()
    value = lookup(kind, key, cache=cache, decode=decode, version=version)
    if value is None:
        value = store(kind, key, compute(), cache=cache, encode=encode, version=version, write=write)
    return value


def lookup(kind: str, key: str, *, cache: bool | str | os.PathLike = True, decode: Callable[[Any], T] = lambda x: x,
           version: int = 1) -> T | None:
    """The stored result of (kind, key), from memory or disk; None when there is none (a damaged or foreign file
    is named in a warning and counts as none)."""
    if cache is False:
        return None
    if (kind, key) in _MEMORY:
        return _MEMORY[(kind, key)]
    path = cache_path(kind, key, cache)
    if not path.exists():
        return None
    try:
        value = decode(read_entry(path, kind, version, key=key))
    except Exception as e:  # a damaged or foreign file is recomputed, whatever the reader raised
        warnings.warn(f"cache file {path} cannot be used ({type(e).__name__}: {e}); recomputing it", stacklevel=3)
        return None
    _MEMORY[(kind, key)] = value
    return value


def store(kind: str, key: str, value: T, *, cache: bool | str | os.PathLike = True,
          encode: Callable[[T], Any] = lambda x: x, version: int = 1, write: bool = True) -> T:
    """Keep `value` as the result of (kind, key): in memory, and on disk unless `write=False`. Returns it."""
    if cache is False:
        return value
    if write:
        write_entry(cache_path(kind, key, cache), kind, key, version, encode(value))
    _MEMORY[(kind, key)] = value
    return value


def write_entry(path: str | os.PathLike, kind: str, key: str, version: int, payload: Any) -> Path:
    """Store one result (its kind, key and format version beside the payload), atomically."""
    return torch_save_atomic(dict(kind=kind, key=key, version=version, payload=payload), path)


def read_entry(path: str | os.PathLike, kind: str, version: int, *, key: str | None = None) -> Any:
    """The payload of a file written by `write_entry`; a clear error naming the file if it is not one."""
    try:
        d = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e}); the file is damaged or not a "
                         f"workbench result") from e
    if not isinstance(d, dict) or d.get("kind") != kind or d.get("version") != version:
        got = (d.get("kind"), d.get("version")) if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"{path} holds {got}, not a {kind} result of format {version}")
    if key is not None and d.get("key") != key:
        raise ValueError(f"{path} holds key {d.get('key')}, not {key}")
    return d["payload"]
