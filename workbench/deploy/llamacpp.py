"""Run a GGUF file in llama.cpp itself (CPU backend), to check and time what `deploy.gguf` writes.

The binding is the prebuilt CPU library of the `llama-cpp-cffi` wheel (the `[gguf]` extra; installed
with `--no-deps` because its Python helpers pin an older transformers). Only its compiled module is
loaded, straight from the file, so none of that package's Python code runs; what we call is llama.cpp's
own C API (`llama.h`): load a model, decode a batch, read logits, tokenize.
"""
from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

from workbench.core.registry import check_choice

_LIB = None
_LOG: list[str] = []
_LOCK = threading.Lock()


class LlamaCppUnavailable(RuntimeError):
    """The llama.cpp binding is not installed (install the `[gguf]` extra; see the README)."""


def _binding():
    """(ffi, lib) of llama.cpp's CPU build, loaded once; llama.cpp's log lines go to `_LOG`."""
    global _LIB
    if _LIB is not None:
        return _LIB
    spec = importlib.util.find_spec("llama")
    folder = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None
    files = sorted(folder.glob("_llama_cpp_cpu*.so")) if folder else []
    if not files:
        raise LlamaCppUnavailable(
            "llama.cpp's Python binding is not installed; run `pip install --no-deps llama-cpp-cffi==0.4.18 cffi` "
            "(what `make setup` does) to run GGUF files in llama.cpp")
    loader = importlib.machinery.ExtensionFileLoader("_llama_cpp_cpu", str(files[0]))
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("_llama_cpp_cpu", files[0],
                                                                                   loader=loader))
    loader.exec_module(module)
    ffi, lib = module.ffi, module.lib

    @ffi.def_extern()
    def llama_cpp_cffi_ggml_log_callback(level, text, user_data):  # noqa: ARG001 - llama.cpp's signature
        _LOG.append(ffi.string(text).decode("utf-8", "replace"))
        del _LOG[:-200]

    lib.llama_log_set(lib.llama_cpp_cffi_ggml_log_callback, ffi.NULL)
    lib.llama_backend_init()
    _LIB = (ffi, lib)
    return _LIB


def available() -> bool:
    """Whether llama.cpp's binding can be loaded here."""
    try:
        _binding()
    except (LlamaCppUnavailable, ImportError, OSError):
        return False
    return True


def _log_tail(n: int = 6) -> str:
    lines = [ln.strip() for ln in _LOG if ln.strip()]
    return " | ".join(lines[-n:])


@dataclass
class LlamaCppModel:
    """A GGUF model loaded in llama.cpp with one context (CPU). Use as a context manager, or call `close()`."""

    path: Path
    n_ctx: int
    n_threads: int
    _model: object = None
    _ctx: object = None

    @property
    def n_vocab(self) -> int:
        ffi, lib = _binding()
        return int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self._model)))

    def meta(self, key: str) -> str | None:
        """A metadata value of the file as llama.cpp read it (None if absent)."""
        ffi, lib = _binding()
        buf = ffi.new("char[]", 4096)
        n = lib.llama_model_meta_val_str(self._model, key.encode(), buf, 4096)
        return None if n < 0 else ffi.string(buf).decode("utf-8", "replace")

    def tokenize(self, text: str, *, add_special: bool = False) -> list[int]:
        """llama.cpp's own tokenization of `text` (the tokenizer stored in the GGUF file)."""
        ffi, lib = _binding()
        data = text.encode("utf-8")
        room = len(data) + 8
        out = ffi.new("int32_t[]", room)
        n = lib.llama_tokenize(lib.llama_model_get_vocab(self._model), data, len(data), out, room, add_special, False)
        if n < 0:
            raise RuntimeError(f"llama.cpp needs {-n} token slots for {text[:40]!r}; it returned an error")
        return [int(out[i]) for i in range(n)]

    def _decode(self, tokens: Sequence[int], start: int, *, all_logits: bool) -> None:
        ffi, lib = _binding()
        batch = lib.llama_batch_init(len(tokens), 0, 1)
        try:
            for i, tok in enumerate(tokens):
                batch.token[i] = int(tok)
                batch.pos[i] = start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if all_logits or i == len(tokens) - 1 else 0
            batch.n_tokens = len(tokens)
            rc = lib.llama_decode(self._ctx, batch)
        finally:
            lib.llama_batch_free(batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} for {len(tokens)} tokens at position {start}: {_log_tail()}")

    def _row(self, i: int) -> np.ndarray:
        ffi, lib = _binding()
        ptr = lib.llama_get_logits_ith(self._ctx, i)
        return np.frombuffer(ffi.buffer(ptr, 4 * self.n_vocab), dtype=np.float32).copy()

    def reset(self) -> None:
        """Forget the KV cache (the next decode starts at position 0)."""
        _binding()[1].llama_kv_cache_clear(self._ctx)

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """float32 logits (len(tokens), vocab) for one sequence, from an empty cache."""
        if not 0 < len(tokens) <= self.n_ctx:
            raise ValueError(f"{len(tokens)} tokens do not fit the context of {self.n_ctx}; allowed: 1..{self.n_ctx}")
        self.reset()
        self._decode(tokens, 0, all_logits=True)
        return np.stack([self._row(i) for i in range(len(tokens))])

    def greedy(self, prompt: Sequence[int], n_new: int) -> list[int]:
        """Greedy continuation of `prompt` by `n_new` tokens, one decode step per token (KV cache)."""
        if len(prompt) + n_new > self.n_ctx:
            raise ValueError(f"prompt {len(prompt)} + {n_new} new tokens exceed the context of {self.n_ctx}")
        self.reset()
        self._decode(prompt, 0, all_logits=False)
        out: list[int] = []
        for step in range(n_new):
            nxt = int(np.argmax(self._row(-1)))
            out.append(nxt)
            if step + 1 < n_new:
                self._decode([nxt], len(prompt) + step, all_logits=False)
        return out

    def close(self) -> None:
        ffi, lib = _binding()
        if self._ctx is not None:
            lib.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            lib.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> "LlamaCppModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


KV_TYPES = {"f32": 0, "f16": 1}  # ggml_type of the KV cache


def load(path: str | os.PathLike, *, n_ctx: int = 512, n_threads: int | None = None,
         kv_type: str = "f16") -> LlamaCppModel:
    """Load a GGUF file in llama.cpp (CPU, `n_threads` default: all cores). A file llama.cpp refuses
    raises with llama.cpp's own last log lines, which say why.

    kv_type: llama.cpp's KV cache precision; "f16" is its default (what users run), "f32" compares
    exactly against a float32 reference.
    """
    check_choice("kv_type", kv_type, KV_TYPES)
    ffi, lib = _binding()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    n_threads = n_threads or os.cpu_count() or 1
    with _LOCK:
        _LOG.clear()
        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = 0
        model = lib.llama_model_load_from_file(str(path).encode(), mparams)
        if model == ffi.NULL:
            raise RuntimeError(f"llama.cpp could not load {path}: {_log_tail()}")
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n_ctx
        cparams.n_threads = cparams.n_threads_batch = n_threads
        cparams.type_k = cparams.type_v = KV_TYPES[kv_type]
        ctx = lib.llama_init_from_model(model, cparams)
        if ctx == ffi.NULL:
            lib.llama_model_free(model)
            raise RuntimeError(f"llama.cpp could not make a context for {path}: {_log_tail()}")
    return LlamaCppModel(path=path, n_ctx=n_ctx, n_threads=n_threads, _model=model, _ctx=ctx)


def perplexity(model: LlamaCppModel, windows: Sequence[Sequence[int]]) -> float:
    """Perplexity of llama.cpp on token windows (each scored from an empty cache, every next token)."""
    total, count = 0.0, 0
    for window in windows:
        logits = model.logits(window).astype(np.float64)
        shifted = logits[:-1] - logits[:-1].max(axis=1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        targets = np.asarray(window[1:])
        total -= float(logp[np.arange(len(targets)), targets].sum())
        count += len(targets)
    if not count:
        raise ValueError("no tokens to score: every window needs at least 2 tokens")
    return math.exp(total / count)


@dataclass(frozen=True)
class Throughput:
    """llama.cpp's speed on this machine: prompt (prefill) and generation (decode) tokens per second."""

    prompt_tokens: int
    prompt_tok_s: float
    gen_tokens: int
    gen_tok_s: float
    n_threads: int


def throughput(model: LlamaCppModel, prompt: Sequence[int], n_new: int = 64, repeats: int = 3) -> Throughput:
    """Best of `repeats`: prefill of `prompt` in one batch, then `n_new` single-token decode steps."""
    best_p, best_g = math.inf, math.inf
    for _ in range(repeats):
        model.reset()
        t0 = time.perf_counter()
        model._decode(prompt, 0, all_logits=False)
        t1 = time.perf_counter()
        tok = int(np.argmax(model._row(-1)))
        for step in range(n_new):
            model._decode([tok], len(prompt) + step, all_logits=False)
            tok = int(np.argmax(model._row(-1)))
        t2 = time.perf_counter()
        best_p, best_g = min(best_p, t1 - t0), min(best_g, t2 - t1)
    return Throughput(len(prompt), len(prompt) / best_p, n_new, n_new / best_g, model.n_threads)


@contextlib.contextmanager
def loaded(path: str | os.PathLike, **kwargs) -> Iterator[LlamaCppModel]:
    """`with loaded(path) as m:` — load, use, free."""
    m = load(path, **kwargs)
    try:
        yield m
    finally:
        m.close()


def compare(files: dict[str, str | os.PathLike], windows: Sequence[Sequence[int]], *, prompt_len: int = 128,
            n_new: int = 64, n_threads: int | None = None, repeats: int = 3,
            extra_windows: Mapping[str, Sequence[Sequence[int]]] | None = None):
    """One row per GGUF file, run in llama.cpp: architecture, size, perplexity on `windows`, prompt and
    generation tokens/s (best of `repeats`). The prompt is the first window's first `prompt_len` tokens.
    `extra_windows` ({name: windows}, e.g. another text's evaluation part) adds a column `ppl_<name>` each."""
    if not windows or len(windows[0]) < prompt_len:
        raise ValueError(f"the first window must hold at least prompt_len={prompt_len} tokens")
    extra = dict(extra_windows or {})
    for name, more in extra.items():
        if not more:
            raise ValueError(f"extra_windows[{name!r}] holds no window")
    n_ctx = max(max(len(w) for w in [*windows, *(w for more in extra.values() for w in more)]), prompt_len + n_new)
    rows = []
    for name, path in files.items():
        with loaded(path, n_ctx=n_ctx, n_threads=n_threads) as m:
            speed = throughput(m, list(windows[0][:prompt_len]), n_new=n_new, repeats=repeats)
            rows.append(dict(model=name, arch=m.meta("general.architecture"), size_mib=Path(path).stat().st_size / 2**20,
                             ppl=perplexity(m, windows), **{f"ppl_{text}": perplexity(m, more) for text, more in extra.items()},
                             prompt_tok_s=speed.prompt_tok_s, gen_tok_s=speed.gen_tok_s, threads=speed.n_threads))
    return pd.DataFrame(rows).set_index("model")
