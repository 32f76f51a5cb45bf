"""The one loss loop: summed next-token NLL and the count of predicted tokens over batches of model inputs.

Perplexity (`evaluation`), the removal losses of blocks and layers (`scoring.removal`), the x:y search and the
fine-tuning evaluation all sum their losses here: float32 logits, float64 sums, labels shifted by one,
`-100` labels ignored.

>>> import torch
>>> from workbench.core.testing import tiny_model
>>> ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
>>> total, count = summed_nll(tiny_model("llama", n_layers=2), token_batches(ids, 2))
>>> count, 4.0 < total / count < 7.0   # random weights: about log(260) nats per token
(60, True)
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from workbench.core.models import eval_mode


def token_batches(ids: torch.Tensor, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """`{"input_ids": ...}` batches of `batch_size` rows of a token-id matrix (labels: the ids themselves)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be a positive integer")
    for start in range(0, len(ids), batch_size):
        yield {"input_ids": ids[start : start + batch_size]}


@torch.no_grad()
def summed_nll(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *, progress: bool = False,
               desc: str = "loss", total: int | None = None,
               keep: Callable[[Any, int], None] | None = None, **forward: Any) -> tuple[float, int]:
    """(Σ next-token NLL, number of predicted tokens) of `model` in eval mode over `batches`.

    Each batch holds the forward's inputs (`input_ids` or `inputs_embeds`, optionally `attention_mask`) and
    optionally `labels` (default: its `input_ids`; `-100` is not predicted). `keep(output, i)` sees each batch's
    model output (e.g. hidden states asked for with `output_hidden_states=True` in `forward`).
    """
    device = next(model.parameters()).device
    nll, count = torch.zeros((), dtype=torch.float64), 0
    with eval_mode(model):
        for i, batch in enumerate(tqdm(batches, desc=desc, total=total, disable=not progress, leave=False)):
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            labels = batch["labels"] if "labels" in batch else batch["input_ids"]
            out = model(**inputs, use_cache=False, **forward)
            if keep is not None:
                keep(out, i)
            logits = out.logits.float()
            target = labels.to(device)[:, 1:]
            nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), target.reshape(-1),
                                   ignore_index=-100, reduction="sum").double().cpu()
            count += int((target != -100).sum())
    return float(nll), count
