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
    apply_plan(pruned, plan)
    return perplexity(pruned, tokenizer, source, **kwargs)


RESULT_LIBRARIES = ("torch", "transformers", "peft", "datasets", "lm-eval", "numpy", "pandas")


def library_versions() -> dict[str, str | None]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for lib in RESULT_LIBRARIES:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            out[lib] = None
    return out


def model_entry(model: nn.Module, *, perplexity: PerplexityResult | None = None, zero_shot=None,
                efficiency: dict | None = None, checkpoint: str | None = None) -> dict:
    """One model's results for `evaluation_results.json` (what is not measured is None)."""
    from workbench.importance import model_fingerprint
    from workbench.models import model_summary

    return dict(model_hash=model_fingerprint(model), summary=model_summary(model), checkpoint=checkpoint,
                perplexity=perplexity.to_dict() if perplexity is not None else None,
                zero_shot=zero_shot.to_dict() if zero_shot is not None else None, efficiency=efficiency)


def results_record(entries: dict[str, dict]) -> dict:
    """The whole `evaluation/evaluation_results.json`: every model's entry plus library versions."""
    import time

    if not entries:
        raise ValueError("entries is empty: pass {name: model_entry(...)}")
    return dict(models=entries, versions=library_versions(), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def results_table(record: dict):
    """A DataFrame: rows = measures (PPL, mean and per-task accuracy, parameters, efficiency), columns = models."""
    import pandas as pd

    cols = {}
    for name, e in record["models"].items():
        col = {"parameters": e["summary"]["parameters"]}
        if e.get("perplexity"):
            col["ppl"] = e["perplexity"]["ppl"]
        zs = e.get("zero_shot")
        if zs:
            col["mean_acc"], col["mean_acc_norm"] = zs["mean_acc"], zs["mean_acc_norm"]
            for task, r in zs["tasks"].items():
                col[f"acc/{task}"], col[f"acc_norm/{task}"] = r["acc"], r["acc_norm"]
        for k in ("prefill_ms", "decode_ms_per_token", "decode_tokens_per_s", "kv_cache_bytes_per_token",
                  "weight_bytes", "checkpoint_bytes", "peak_memory_bytes"):
            if e.get("efficiency") and e["efficiency"].get(k) is not None:
                col[k] = e["efficiency"][k]
        cols[name] = col
    return pd.DataFrame(cols)
