"""Evaluation: perplexity over non-overlapping windows, recorded with everything that defines it."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from workbench.data import OFFLINE_SOURCE, evaluation_windows


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    mean_nll: float
    model: str
    source: str
    split: str
    seq_len: int
    windows: int
    tokens: int  # predicted tokens (seq_len - 1 per window)

    def to_dict(self) -> dict:
        return asdict(self)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def window_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 8, progress: bool = True) -> torch.Tensor:
    """Summed next-token NLL (float64) and count over a stack of windows, as a 2-vector."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be a positive integer")
    device = _device_of(model)
    total, count = torch.zeros((), dtype=torch.float64), 0
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress, leave=False):
            batch = windows[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits.float()
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum")
            total += nll.double().cpu()
            count += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    return torch.stack([total, torch.tensor(float(count), dtype=torch.float64)])


def perplexity(
    model: nn.Module,
    tokenizer,
    source: str = OFFLINE_SOURCE,
    *,
    seq_len: int = 128,
    max_windows: int | None = 50,
    batch_size: int = 8,
    progress: bool = True,
    hub_root=None,
) -> PerplexityResult:
    """exp(mean next-token NLL) over the evaluation part of `source` in windows of `seq_len`."""
    windows = evaluation_windows(tokenizer, source, seq_len, max_windows, hub_root=hub_root)
    total, count = window_nll(model, windows, batch_size, progress).tolist()
    mean = total / count
    return PerplexityResult(
        ppl=math.exp(mean) if mean < 700 else math.inf,
        mean_nll=mean,
        model=str(getattr(model.config, "name_or_path", "")),
        source=source,
        split="evaluation",
        seq_len=seq_len,
        windows=len(windows),
        tokens=int(count),
    )


def perplexity_after(model: nn.Module, tokenizer, plan, source: str = OFFLINE_SOURCE, **kwargs) -> PerplexityResult:
    """Perplexity of a pruned copy of `model` under `plan`; `model` itself is left unchanged.

    Used to compare plans side by side (one copy at a time, so peak memory is twice the model).
    """
    import copy

    from workbench.prune import apply_plan

    pruned = copy.deepcopy(model)
    try:
        apply_plan(pruned, plan)
        return perplexity(pruned, tokenizer, source, **kwargs)
    finally:
        del pruned
