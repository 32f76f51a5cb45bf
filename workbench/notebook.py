"""What every numbered notebook shares: loading its model in real or smoke mode, in one call."""
from __future__ import annotations

import contextlib
import time

import torch

from workbench.checkpoints import load_model, place
from workbench.models import as_dtype
from workbench.testing import byte_tokenizer, tiny_model


def load(model: str | None = None, smoke: bool = False, *, dtype: str | torch.dtype = "float32",
         device: str | torch.device = "cpu"):
    """(model, tokenizer) for a notebook: the given or default model, or with `smoke=True` a tiny random
    4-layer Llama with a byte tokenizer (seconds; what the test suite runs every notebook on), in `dtype` too."""
    with timed("model loaded"):
        if smoke:
            return place(tiny_model("llama", n_layers=4).to(as_dtype(dtype)), device), byte_tokenizer()
        return load_model(model, dtype=dtype, device=device)


@contextlib.contextmanager
def timed(label: str):
    """Print one line `label: N.N s` when the block ends: saved notebooks and papermill logs keep it, unlike a
    progress-bar widget, so a long cell never looks hung after the fact."""
    t0 = time.perf_counter()
    yield
    print(f"{label}: {time.perf_counter() - t0:.1f} s", flush=True)
