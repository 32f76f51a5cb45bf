"""What every numbered notebook shares: loading its model in real or smoke mode, in one call."""
from __future__ import annotations

import torch

from workbench.core.timing import timed
from workbench.surgery.checkpoints import TINY_SOURCE, load_model


def load(model: str | None = None, smoke: bool = False, *, dtype: str | torch.dtype = "float32",
         device: str | torch.device = "cpu"):
    """`load_model` with its load time printed: the given or default model, or with `smoke=True` the tiny
    model (seconds; what the test suite runs every notebook on)."""
    with timed("model loaded"):
        return load_model(TINY_SOURCE if smoke else model, dtype=dtype, device=device)
