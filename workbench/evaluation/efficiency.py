"""What a model costs: parameters per block, checkpoint size, memory, prefill and decode latency, KV cache.

Timings follow one protocol for every model compared: the same random prompt (seeded), `warmup` runs
discarded, then `repeats` runs; prefill is one forward over the prompt with the cache on, decode is one
token at a time with the cache (greedy), and each reported latency is the median. Peak memory over the
timed runs is the CUDA allocator's peak on GPU, and on CPU the process's peak resident memory sampled
every 5 ms (it includes everything else the process holds, so compare models measured in one process
only by the difference); `peak_memory_kind` says which.
"""
from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from workbench.core.arch import decoder_layers, geometry, get_spec, layer_parts, layer_widths
from workbench.core.compat import cache_keyword, output_cache
from workbench.core.models import eval_mode, parameter_count
from workbench.core.registry import check_choice

DECODE_MODES = ("loop", "static")


@dataclass(frozen=True)
class EfficiencyConfig:
    """How efficiency is measured (one protocol for every model compared).

    Args:
        prompt_len: tokens of the seeded random prompt (prefill).
        new_tokens: tokens decoded one at a time with the KV cache (greedy).
        batch_size: prompts decoded together.
        warmup: untimed runs before the timed ones.
        repeats: timed runs; latencies are medians over them.
        seed: seed of the random prompt.
        decode: "loop" (our own greedy loop with transformers' dynamic KV cache) or "static" (transformers'
            `generate` with a static KV cache, which transformers compiles on CUDA: the compiled mode);
            per-token decode time there is (time of prompt + N tokens − time of prompt + 1 token) / (N − 1).
    """

    prompt_len: int = 128
    new_tokens: int = 32
    batch_size: int = 1
    warmup: int = 2
    repeats: int = 5
    seed: int = 0
    decode: str = "loop"

    def __post_init__(self):
        check_choice("decode", self.decode, DECODE_MODES)
        for name in ("prompt_len", "new_tokens", "batch_size", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.warmup < 0:
            raise ValueError(f"warmup={self.warmup} must be >= 0")


class PeakMemory:
    """Context manager: peak CUDA allocation (GPU) or peak process RSS sampled every 5 ms (CPU), in `.peak`."""

    def __init__(self, device: torch.device | str):
        self.device, self.peak = torch.device(device), 0

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.device.type == "cuda" else "process_peak_rss"

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        import psutil  # deferred: needed only on CPU

        proc, self._stop = psutil.Process(), threading.Event()
        self.peak = proc.memory_info().rss

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, proc.memory_info().rss)
                time.sleep(0.005)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            self._thread.join()


def parameter_breakdown(model: nn.Module) -> dict[str, int]:
    """Unique parameters: total, embeddings (+ untied lm_head), attention, MLP, norms."""
    spec = get_spec(model)
    seen: set[int] = set()

    def count(module: nn.Module | None) -> int:
        if module is None:
            return 0
        n = 0
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        return n

    attn = mlp = 0
    for layer in decoder_layers(model, spec):
        parts = layer_parts(layer, spec)  # an emptied block is an EmptyBlock without parameters
        attn += count(parts.attn)
        mlp += count(parts.mlp)
    embeddings = count(model.get_input_embeddings()) + count(model.get_output_embeddings())  # type: ignore[operator]  # an HF model's dynamic attributes
    total = parameter_count(model)
    return dict(total=total, embeddings=embeddings, attn=attn, mlp=mlp, norms=total - embeddings - attn - mlp)


def kv_heads_per_layer(model: nn.Module) -> list[int]:
    """KV heads each layer keeps (0 for an emptied attention block)."""
    return [groups for groups, _ in layer_widths(model)]


def kv_cache_bytes_per_token(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes the KV cache grows by per token and sequence: Σ_layers 2 · kv_heads · head_dim · bytes/element."""
    dtype = dtype or next(model.parameters()).dtype
    size = torch.empty((), dtype=dtype).element_size()
    return sum(2 * h * geometry(model.config).head_dim * size for h in kv_heads_per_layer(model))


def measured_cache_bytes(cache) -> int:
    """Bytes held by a transformers cache object (keys and values of every layer)."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None and hasattr(t, "numel"))


def directory_bytes(directory: str | os.PathLike) -> int:
    return sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int):
    return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,  # type: ignore[operator]  # an HF model's dynamic attributes
                          cache_implementation="static", return_dict_in_generate=True,
                          pad_token_id=model.config.eos_token_id or 0)  # type: ignore[union-attr]  # an HF model's dynamic attributes


def _run_static(model: nn.Module, prompt: torch.Tensor, new_tokens: int):
    """transformers' static-cache generate: (prefill s, per-token s × new_tokens, cache, the tokens fed back)."""
    device = prompt.device
    _sync(device)
    t = time.perf_counter()
    _generate(model, prompt, 1)
    _sync(device)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    out = _generate(model, prompt, new_tokens + 1)
    _sync(device)
    per_token = max(time.perf_counter() - t - prefill, 0.0) / new_tokens
    return prefill, [per_token] * new_tokens, output_cache(out), out.sequences[:, prompt.shape[1]:-1]


def _run_loop(model: nn.Module, prompt: torch.Tensor, new_tokens: int):
    """Our greedy loop with the dynamic cache: (prefill s, each step's s, cache, the tokens fed back)."""
    device = prompt.device
    _sync(device)
    t = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    _sync(device)
    prefill = time.perf_counter() - t
    cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)
    key, steps, tokens = cache_keyword(model), [], []
    for _ in range(new_tokens):
        tokens.append(token)
        t = time.perf_counter()
        out = model(input_ids=token, use_cache=True, **{key: cache})
        _sync(device)
        steps.append(time.perf_counter() - t)
        cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)
    return prefill, steps, cache, torch.cat(tokens, dim=1)


_RUNS = {"loop": _run_loop, "static": _run_static}


def greedy_tokens(model: nn.Module, prompt: torch.Tensor, new_tokens: int, decode: str = "loop") -> torch.Tensor:
    """The `new_tokens` greedy tokens a decode mode feeds back while it is timed (the modes agree; tested)."""
    check_choice("decode", decode, DECODE_MODES)
    with torch.no_grad(), eval_mode(model):
        return _RUNS[decode](model, prompt, new_tokens)[3]


def measure(model: nn.Module, cfg: EfficiencyConfig = EfficiencyConfig(), *,
            checkpoint_dir: str | os.PathLike | None = None) -> dict:
    """One model's efficiency record (see the module docstring for the protocol)."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]  # type: ignore[operator]  # an HF model's dynamic attributes
    prompt = torch.randint(0, vocab, (cfg.batch_size, cfg.prompt_len),
                           generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    run = _RUNS[cfg.decode]
    with eval_mode(model), torch.no_grad():
        for _ in range(cfg.warmup):
            run(model, prompt, cfg.new_tokens)
        prefills, steps = [], []
        with PeakMemory(device) as mem:
            for _ in range(cfg.repeats):
                p, s, cache, _ = run(model, prompt, cfg.new_tokens)
                prefills.append(p)
                steps.extend(s)
    tokens_in_cache = cfg.batch_size * (cfg.prompt_len + cfg.new_tokens)
    decode = statistics.median(steps)
    weights = sum(t.numel() * t.element_size() for t in {id(p): p for p in model.parameters()}.values())
    return dict(
        **{f"params_{k}": v for k, v in parameter_breakdown(model).items()},
        weight_bytes=weights,
        checkpoint_bytes=directory_bytes(checkpoint_dir) if checkpoint_dir is not None else None,
        peak_memory_bytes=mem.peak, peak_memory_kind=mem.kind,
        prefill_ms=1e3 * statistics.median(prefills),
        decode_ms_per_token=1e3 * decode,
        decode_tokens_per_s=cfg.batch_size / decode,
        prefill_tokens_per_s=cfg.batch_size * cfg.prompt_len / statistics.median(prefills),
        kv_cache_bytes_per_token=kv_cache_bytes_per_token(model),
        kv_cache_bytes_measured=measured_cache_bytes(cache),
        kv_cache_tokens=tokens_in_cache,
        device=str(device), dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        threads=torch.get_num_threads(), **{f"cfg_{k}": v for k, v in asdict(cfg).items()},
    )


def compare(models: dict[str, nn.Module], cfg: EfficiencyConfig = EfficiencyConfig(), *,
            checkpoints: dict[str, str | os.PathLike] | None = None) -> pd.DataFrame:
    """Side by side, same prompt and protocol: one column per model, one row per measure."""
    checkpoints = checkpoints or {}
    return pd.DataFrame({name: measure(m, cfg, checkpoint_dir=checkpoints.get(name)) for name, m in models.items()})
