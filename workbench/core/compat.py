"""Where the workbench meets the internals of transformers and torch, and the checks that guard it.

Pruned models decode through transformers' own modelling code, so a few things the workbench does depend on
transformers internals (listed in docs/ARCHITECTURE.md, "Where we depend on transformers internals"). This
module keeps those contacts in one place and never relies on a keyword's name where the object can be found
by its type:

    cache = find_cache(args, kwargs)          # (core.hf_modeling) the KV cache a module was handed, by type
    check_cached_decoding(model)              # a few tokens, cached steps against one full pass; raises if wrong

`TESTED` is the range of versions the test suite has passed on; importing `workbench` warns once when
torch, transformers or peft is outside it.
"""
from __future__ import annotations

import inspect
import warnings
from importlib import metadata

import torch
from packaging.version import Version
from torch import nn
from transformers.cache_utils import Cache

# The oldest and newest release of each package that the whole suite has passed on (`make test` on the lock,
# `make test-latest` on the newest releases). pyproject.toml's upper bounds and the lock agree with these
# (tests/core/test_compat.py checks it).
TESTED: dict[str, tuple[str, str]] = {
    "torch": ("2.13.0", "2.13.0"),
    "transformers": ("5.23.0", "5.24.0"),
    "peft": ("0.21.2", "0.21.2"),
}

_warned = False


class DecodingCheckError(RuntimeError):
    """A pruned model's cached decoding disagrees with its own full forward pass."""


def installed_version(package: str) -> str:
    return metadata.version(package)


def _release(version: str) -> tuple[int, ...]:
    return Version(version).release  # "2.13.0+cpu" -> (2, 13, 0): local build labels do not matter


def untested_versions(versions: dict[str, str] | None = None) -> dict[str, str]:
    """The packages whose installed version lies outside `TESTED`, each with a line saying so.

    >>> untested_versions({"transformers": "5.30.0"})
    {'transformers': 'transformers 5.30.0 is outside the tested range 5.23.0 – 5.24.0'}
    """
    versions = versions if versions is not None else {p: installed_version(p) for p in TESTED}
    out = {}
    for package, version in versions.items():
        low, high = TESTED[package]
        if not _release(low) <= _release(version) <= _release(high):
            out[package] = f"{package} {version} is outside the tested range {low} – {high}"
    return out


def warn_untested_versions() -> None:
    """Warn once per process when torch / transformers / peft is outside the tested range."""
    global _warned
    if _warned:
        return
    _warned = True
    lines = untested_versions()
    if lines:
        warnings.warn(
            "prune-workbench: " + "; ".join(lines.values()) + ". Results may differ from the tested setup: "
            "`make setup` installs the locked environment (requirements.lock).", UserWarning, stacklevel=3)


def output_cache(output) -> Cache | None:
    """The KV cache a model's output (or `generate`'s) carries, found by its type."""
    values = output.values() if hasattr(output, "values") else ()
    return next((v for v in values if isinstance(v, Cache)), None)


def cache_keyword(model: nn.Module) -> str:
    """The keyword this transformers' model forward takes its KV cache by (`cache`, or `past_key_values`
    before 5.24)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _scores(output) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    return (logits if logits is not None else output.last_hidden_state).float()


# Cached steps and a full pass differ only by rounding; a broken cache (positions not advancing, the wrong
# layer's keys) differs by the size of the logits. Relative to max(1, max |logit|):
CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6, torch.bfloat16: 5e-2, torch.float16: 2e-2}


@torch.no_grad()
def check_cached_decoding(model: nn.Module, why: str = "", n_tokens: int = 6, prefill: int = 3) -> float:
    """Decode `n_tokens` fixed tokens with the KV cache (a prefill, then one token at a time) and compare
    with one full pass of the same tokens; raise `DecodingCheckError` naming the transformers version when
    they disagree or the cache does not count every position. Returns the largest relative difference.

    `why` names what the model's decoding relies on (e.g. "an emptied attention in layer 0"), for the message.
    """
    param = next(model.parameters())
    device = model.get_input_embeddings().weight.device
    ids = torch.randint(0, model.config.vocab_size, (1, n_tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    key = cache_keyword(model)
    training = model.training
    model.eval()
    try:
        full = _scores(model(input_ids=ids, use_cache=False))
        out = model(input_ids=ids[:, :prefill], use_cache=True)
        steps, cache = [_scores(out)], output_cache(out)
        for t in range(prefill, n_tokens):
            out = model(input_ids=ids[:, t : t + 1], use_cache=True, **{key: cache})
            steps.append(_scores(out))
            cache = output_cache(out)
    finally:
        model.train(training)
    cached = torch.cat(steps, dim=1)
    scale = max(1.0, float(full.abs().max()))
    diff = float((cached - full).abs().max()) / scale
    counted = None if cache is None else int(cache.get_seq_length())
    limit = CHECK_TOLERANCE.get(param.dtype, 5e-2)
    if counted != n_tokens or not diff <= limit:
        version = installed_version("transformers")
        low, high = TESTED["transformers"]
        raise DecodingCheckError(
            f"this pruned model decodes wrongly with the KV cache under transformers {version}"
            + (f" (it relies on {why})" if why else "")
            + f": after {n_tokens} tokens the cache counts {counted} positions, and cached steps differ from a "
            f"full pass by {diff:.3g} of the logits' scale (allowed {limit:g}). The workbench is tested with "
            f"transformers {low} – {high}; install the locked environment (`make setup`) or report this "
            "version. Generation with this model would give wrong tokens, so it is refused."
        )
    return diff
