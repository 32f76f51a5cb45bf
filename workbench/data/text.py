"""Calibration and evaluation text: named hub sources, local files, and two offline sources.

Offline: `pydoc` (the default: CPython's language reference, shipped with Python) and `jargon` (the Jargon
File 4.4.7, public domain, 1.7 MB of English prose on hacker culture from Debian's `jargon-text` package): the
second is out of the default's domain, to measure what pruning calibrated on one text costs on another.
A calibration source may be a mixture, `"pydoc+jargon"`: equal shares of windows from each part, interleaved.

Every source yields two disjoint parts, `calibration` and `evaluation`. Calibration batches are
drawn reproducibly (seed) from the calibration part only; evaluation windows from the evaluation
part only. Asking for more tokens than a part has is an error, never a silent repeat.
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from workbench.core.paths import data_cache
from workbench.core.registry import Registry, check_choice

SPLITS = ("calibration", "evaluation")
FISHER_MODES = ("batch", "sequence")  # how the importance pass estimates the Fisher diagonal
ACCUMULATIONS = ("eager", "compiled")  # how the importance pass reduces each gradient to per-unit sums
REFIT_TOWARD = ("zero", "dense")  # what the ridge of a least-squares re-fit pulls the re-fitted weights toward
REFIT_DAMPING = 1e-4  # the ridge λ of a re-fit (the reconstruction's and the re-fit scores' default)


@dataclass(frozen=True)
class HubSource:
    """A text corpus on the Hugging Face hub: which repo, config, splits and text field.

    Args:
        path: the dataset repository.
        name: its configuration (None: the default one).
        calibration_split, evaluation_split: the splits that become the calibration and evaluation parts.
        text_field: the column holding the text.
        data_files: per split, the files to read (large corpora such as C4: one shard).
        joiner: how records are joined into one text.
    """

    path: str
    name: str | None
    calibration_split: str
    evaluation_split: str
    text_field: str
    data_files: dict[str, str] | None = None
    joiner: str = "\n\n"


HUB_SOURCES: Registry[HubSource] = Registry("source", {
    "wikitext2": HubSource("Salesforce/wikitext", "wikitext-2-raw-v1", "train", "test", "text", joiner=""),
    "c4": HubSource(
        "allenai/c4", None, "train", "validation", "text",
        data_files={
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
        },
    ),
    "ptb": HubSource("ptb-text-only/ptb_text_only", "penn_treebank", "train", "test", "sentence", joiner="\n"),
})

OFFLINE_SOURCE = "pydoc"
OUT_OF_DOMAIN_SOURCE = "jargon"  # general English prose that no default calibration sees
JARGON_FILE = Path("/usr/share/doc/jargon-text/jargon.txt.gz")  # Debian's jargon-text package
SOURCES = (OFFLINE_SOURCE, OUT_OF_DOMAIN_SOURCE, *HUB_SOURCES)
# Every k-th pydoc topic (in sorted key order) goes to the evaluation part.
_PYDOC_EVAL_EVERY = 4
# The Jargon File in blocks of consecutive paragraphs; every k-th block goes to the evaluation part.
_JARGON_BLOCK, _JARGON_EVAL_EVERY, _JARGON_MIN_WORDS = 12, 4, 8


def _pydoc_text(split: str) -> str:
    """CPython's own language-reference text (ships with every Python), split by topic.

    Some paragraphs recur in several topics; those are kept on the calibration side only, so the
    two parts share no paragraph.
    """
    from pydoc_data.topics import topics  # deferred: 465 KB of text, read only for this source

    keys = sorted(topics)
    is_eval = [i % _PYDOC_EVAL_EVERY == 0 for i in range(len(keys))]
    paras = {k: [p for p in topics[k].strip().split("\n\n") if p.strip()] for k in keys}
    if split == "calibration":
        return "\n\n".join(p for k, e in zip(keys, is_eval) if not e for p in paras[k])
    seen = {p.strip() for k, e in zip(keys, is_eval) if not e for p in paras[k]}
    return "\n\n".join(p for k, e in zip(keys, is_eval) if e for p in paras[k] if p.strip() not in seen)


def _jargon_text(split: str, path: Path | None = None) -> str:
    """The Jargon File's prose: paragraphs of at least 8 words with their wrapped lines joined (headwords, the
    table of contents and pronunciations fall out), in blocks of 12 consecutive paragraphs, every 4th block on
    the evaluation side; a paragraph that recurs stays on the calibration side only."""
    path = path or JARGON_FILE
    if not path.is_file():
        raise FileNotFoundError(f"source 'jargon' reads {path}, from Debian's jargon-text package (the Jargon File "
                                "4.4.7, public domain): `apt-get install jargon-text`")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        raw = f.read()
    paras = [" ".join(line.strip() for line in p.splitlines()) for p in raw.split("\n\n")]
    paras = [p for p in paras if len(p.split()) >= _JARGON_MIN_WORDS]
    is_eval = [(i // _JARGON_BLOCK) % _JARGON_EVAL_EVERY == _JARGON_EVAL_EVERY - 1 for i in range(len(paras))]
    calibration = [p for p, e in zip(paras, is_eval) if not e]
    if split == "calibration":
        return "\n\n".join(calibration)
    seen = set(calibration)
    return "\n\n".join(p for p, e in zip(paras, is_eval) if e and p not in seen)


def _hub_text(src: HubSource, split: str, hub_root: str | os.PathLike | None) -> str:
    from datasets import load_dataset  # deferred: datasets loads in seconds

    path = src.path
    root = hub_root or os.environ.get("WORKBENCH_HUB_MIRROR")
    if root:  # a local folder laid out the way the hub serves the repository
        path = str(Path(root) / src.path)
    hub_split = src.calibration_split if split == "calibration" else src.evaluation_split
    kwargs: dict[str, Any] = {"cache_dir": str(data_cache("datasets"))}
    if src.data_files:
        kwargs["data_files"] = {hub_split: src.data_files[hub_split]}
    ds = load_dataset(path, src.name, split=hub_split, **kwargs)
    return src.joiner.join(ds[src.text_field])


def _local_text(path: Path, split: str) -> str:
    """A local file or a folder of .txt files; the last 10 % of paragraphs form the evaluation part."""
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no .txt files under {path}")
    paragraphs = [p for f in files for p in f.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    if len(paragraphs) < 2:
        raise ValueError(f"{path} has {len(paragraphs)} paragraph(s); at least 2 are needed to split it")
    cut = max(1, int(round(len(paragraphs) * 0.9)))
    cut = min(cut, len(paragraphs) - 1)
    part = paragraphs[:cut] if split == "calibration" else paragraphs[cut:]
    return "\n\n".join(part)


MIXTURE = "+"  # "pydoc+jargon": a calibration mixture of named sources or paths


def mixture_parts(source: str) -> list[str]:
    """The sources of a calibration mixture ("a+b"), or [source] for one source (a path that exists is one).

    >>> mixture_parts("pydoc+jargon"), mixture_parts("pydoc")
    (['pydoc', 'jargon'], ['pydoc'])
    """
    if MIXTURE not in source or Path(source).exists():
        return [source]
    parts = source.split(MIXTURE)
    if any(not p for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(f"source={source!r}: a mixture names two or more different sources joined by "
                         f"'{MIXTURE}', e.g. 'pydoc{MIXTURE}jargon'")
    return parts


def load_text(source: str = OFFLINE_SOURCE, split: str = "calibration", *, hub_root=None) -> str:
    """Raw text of one part (`calibration` or `evaluation`) of a named source or local path."""
    check_choice("split", split, SPLITS)
    if len(mixture_parts(source)) > 1:
        raise ValueError(f"source={source!r} is a mixture, which only calibration samples are drawn from (equal "
                         "shares, `calibration_samples`); evaluate each source on its own (`extra_eval_sources`)")
    if source == OFFLINE_SOURCE:
        return _pydoc_text(split)
    if source == OUT_OF_DOMAIN_SOURCE:
        return _jargon_text(split)
    if source in HUB_SOURCES:
        return _hub_text(HUB_SOURCES[source], split, hub_root)
    path = Path(source)
    if path.exists():
        return _local_text(path, split)
    raise ValueError(f"source={source!r} is neither a named source {list(SOURCES)} nor an existing file or folder")


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_stream(tokenizer, source: str = OFFLINE_SOURCE, split: str = "calibration", *, hub_root=None) -> torch.Tensor:
    """All tokens of one part, cached in memory per (tokenizer, source, split)."""
    key = (getattr(tokenizer, "name_or_path", ""), len(tokenizer), source, split, str(hub_root))
    if key not in _TOKEN_CACHE:
        _TOKEN_CACHE[key] = _tokenize(tokenizer, load_text(source, split, hub_root=hub_root))
    return _TOKEN_CACHE[key]


_TOKEN_CACHE: dict[tuple, torch.Tensor] = {}


@dataclass(frozen=True)
class CalibrationConfig:
    """The calibration samples of an importance pass.

    Args:
        source: a named source (`SOURCES`) or a local text file / folder; only its calibration part is read. A
            mixture "a+b" draws equal shares of windows from each source, interleaved.
        num_samples: how many windows.
        seq_len: tokens per window (>= 2: a window of one token has nothing to predict).
        seed: which windows (a seeded permutation of the disjoint windows of the part).
        batch_size: windows per forward + backward pass.
        fisher: "batch" (the Fisher diagonal from batch-mean gradients, free) or "sequence" (also the empirical
            Fisher over sequences, one backward pass per window; enables the taylor2_seq and fisher_seq methods).
        gradient_checkpointing: recompute each decoder layer during backward (less activation memory, about one
            more forward pass of time; same scores, so not part of the cache key).
        accumulation: "eager" or "compiled" (the per-parameter reduction under `torch.compile`: faster on GPUs,
            a compile on the first batch; same scores, not part of the cache key).
        refit: also compute the reconstruction-aware scores (the `refit` importance method): the pass reads the
            blocks' output gradients, then the dense model is replayed layer by layer for the re-fit order (on
            the default model about 1.8× the plain pass's time in all).
        refit_damping: λ of the ridge re-fit those scores assume (the reconstruction's `damping`).
        refit_toward: what that ridge pulls the re-fitted weights toward (the reconstruction's `toward`): "zero"
            (plain ridge) or "dense" (the dense weights; with a large λ the re-fit stays near them).
    """

    source: str = OFFLINE_SOURCE
    num_samples: int = 128
    seq_len: int = 128
    seed: int = 0
    batch_size: int = 4
    fisher: str = "batch"
    gradient_checkpointing: bool = False
    accumulation: str = "eager"
    refit: bool = False
    refit_damping: float = REFIT_DAMPING
    refit_toward: str = "zero"

    def __post_init__(self):
        for name in ("num_samples", "seq_len", "batch_size", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name}={value!r} must be an integer, not {type(value).__name__}")
        for name in ("num_samples", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.seq_len < 2:
            raise ValueError(f"seq_len={self.seq_len} must be at least 2: the loss predicts each token from the "
                             "ones before it, so a single token has no target")
        check_choice("fisher", self.fisher, FISHER_MODES)
        for name in ("gradient_checkpointing", "refit"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}={getattr(self, name)!r} must be True or False")
        check_choice("accumulation", self.accumulation, ACCUMULATIONS)
        check_choice("refit_toward", self.refit_toward, REFIT_TOWARD)
        if isinstance(self.refit_damping, bool) or not isinstance(self.refit_damping, (int, float)) \
                or not math.isfinite(self.refit_damping) or self.refit_damping < 0:
            raise ValueError(f"refit_damping={self.refit_damping!r} must be a finite number >= 0")


def calibration_samples(tokenizer, cfg: CalibrationConfig, *, hub_root=None) -> torch.Tensor:
    """`num_samples × seq_len` token ids: disjoint windows of the calibration part, chosen by seed.

    >>> from workbench import load_model
    >>> _, tokenizer = load_model("tiny")
    >>> calibration_samples(tokenizer, CalibrationConfig(num_samples=2, seq_len=16)).shape
    torch.Size([2, 16])
    """
    parts = mixture_parts(cfg.source)
    if len(parts) > 1:  # equal shares (the first parts take the remainder), interleaved: a prefix of a larger
        # draw is the smaller draw, so `held_out_samples` stays disjoint from the calibration samples
        if cfg.num_samples < len(parts):
            raise ValueError(f"num_samples={cfg.num_samples} cannot give each of the {len(parts)} sources of "
                             f"{cfg.source!r} a window")
        counts = [cfg.num_samples // len(parts) + (i < cfg.num_samples % len(parts)) for i in range(len(parts))]
        each = [calibration_samples(tokenizer, replace(cfg, source=p, num_samples=n), hub_root=hub_root)
                for p, n in zip(parts, counts)]
        return torch.stack([e[i] for i in range(max(counts)) for e in each if i < len(e)])
    tokens = token_stream(tokenizer, cfg.source, "calibration", hub_root=hub_root)
    n_windows = tokens.numel() // cfg.seq_len
    if cfg.num_samples > n_windows:
        raise ValueError(
            f"num_samples={cfg.num_samples} × seq_len={cfg.seq_len} needs {cfg.num_samples * cfg.seq_len} tokens; "
            f"the calibration part of {cfg.source!r} has {tokens.numel()} ({n_windows} windows). "
            "Use fewer or shorter samples, or a larger source."
        )
    gen = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randperm(n_windows, generator=gen)[: cfg.num_samples] * cfg.seq_len
    return torch.stack([tokens[s : s + cfg.seq_len] for s in starts.tolist()])


def held_out_samples(tokenizer, cfg: CalibrationConfig, n: int, *, hub_root=None) -> torch.Tensor:
    """`n` more windows of the calibration part, disjoint from `calibration_samples(cfg)` (the next ones of the
    same seeded permutation): for choosing settings without touching the evaluation part."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} must be a positive integer")
    wider = CalibrationConfig(source=cfg.source, num_samples=cfg.num_samples + n, seq_len=cfg.seq_len, seed=cfg.seed,
                              batch_size=cfg.batch_size)
    return calibration_samples(tokenizer, wider, hub_root=hub_root)[cfg.num_samples:]


def evaluation_windows(
    tokenizer, source: str = OFFLINE_SOURCE, seq_len: int = 128, max_windows: int | None = None, *, hub_root=None
) -> torch.Tensor:
    """Consecutive non-overlapping windows of the evaluation part (the first `max_windows`)."""
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be at least 2 to predict a token")
    tokens = token_stream(tokenizer, source, "evaluation", hub_root=hub_root)
    n = tokens.numel() // seq_len
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows={max_windows} must be a positive integer or None")
        if max_windows > n:
            raise ValueError(
                f"max_windows={max_windows} of seq_len={seq_len} needs {max_windows * seq_len} tokens; "
                f"the evaluation part of {source!r} has {tokens.numel()} ({n} windows)"
            )
        n = max_windows
    if n == 0:
        raise ValueError(f"the evaluation part of {source!r} has {tokens.numel()} tokens, fewer than seq_len={seq_len}")
    return tokens[: n * seq_len].view(n, seq_len)


def fingerprint(tensor: torch.Tensor) -> str:
    """Short content hash of a token tensor, for cache keys and result records."""
    return hashlib.sha1(tensor.cpu().numpy().tobytes()).hexdigest()[:12]
