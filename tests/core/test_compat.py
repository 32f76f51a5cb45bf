"""The locked environment, the tested version range, and the touch points with transformers internals: a
pruned model that would decode wrongly refuses, with the message a user sees."""
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
import torch
from packaging.requirements import Requirement
from packaging.version import Version
from transformers.cache_utils import DynamicCache

from workbench.core import compat, hf_modeling, models
from workbench.core.arch import layer_widths
from workbench.core.compat import DecodingCheckError, cache_keyword, check_cached_decoding, output_cache
from workbench.core.hf_modeling import PositionsOnlyCacheLayer, find_cache
from workbench.core.testing import tiny_model
from workbench.plans.plan import Plan
from workbench.surgery.checkpoints import load_pruned, save_pruned
from workbench.surgery.prune import apply_plan

ROOT = Path(__file__).resolve().parents[2]


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)$", line.strip())
        if m:
            pins[m[1].lower().replace("_", "-")] = m[2]
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["dev"] + project["optional-dependencies"]["gguf"]
    return [Requirement(r) for r in reqs]


# ---------------------------------------------------------------------------------------------- the lock


def test_every_requirement_is_locked_at_its_upper_bound():
    """pyproject.toml's upper bounds are the newest tested releases, which the lock pins exactly."""
    lock = _lock()
    for req in _requirements():
        name = req.name.lower()
        assert name in lock, f"{name} is not in requirements.lock: run `make lock`"
        version = Version(lock[name])
        assert req.specifier.contains(version, prereleases=True), f"{name}=={version} breaks {req}"
        caps = [s.version for s in req.specifier if s.operator == "<="]
        assert caps, f"{req} has no upper bound (`<=` the newest tested release)"
        assert Version(caps[0]).release == version.release, f"{name}: bound {caps[0]} but locked {version}"


def test_tested_ranges_hold_the_lock_and_end_at_the_bounds():
    lock = _lock()
    caps = {r.name.lower(): next(s.version for s in r.specifier if s.operator == "<=") for r in _requirements()}
    for package, (low, high) in compat.TESTED.items():
        assert Version(low) <= Version(Version(lock[package]).base_version) <= Version(high), package
        assert Version(high) == Version(caps[package]), f"{package}: tested up to {high}, bound {caps[package]}"


def test_the_lock_pins_a_cpu_torch_and_no_cuda_packages():
    lock = _lock()
    assert lock["torch"].endswith("+cpu")
    assert not [p for p in lock if p.startswith(("nvidia-", "triton"))]


def test_environment_yml_installs_the_lock():
    text = (ROOT / "environment.yml").read_text()
    pip_lines = re.findall(r"^\s+- (.+)$", text.split("- pip:")[1], re.M)
    assert "-r requirements.lock" in pip_lines and "-e ." in pip_lines
    assert not [l for l in pip_lines if re.match(r"^[A-Za-z]", l)], "environment.yml pins packages beside the lock"
    assert "python=3.11" in text


@pytest.mark.skipif(os.environ.get("WORKBENCH_LOCKED") != "1", reason="only in the locked environment (make test)")
def test_the_environment_is_the_lock():
    lock = _lock()
    wrong = {}
    for name, version in lock.items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        if have is None or Version(have) != Version(version):
            wrong[name] = (have, version)
    assert not wrong, f"installed ≠ requirements.lock (have, locked): {wrong}; run `make setup`"


def test_latest_requirements_lift_the_upper_bounds_but_keep_torch():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "latest_requirements.py")], capture_output=True,
                         text=True, check=True, env=dict(os.environ, LATEST_TORCH="")).stdout.split()
    assert "transformers>=5.0" in out and "peft>=0.17" in out and "lm-eval>=0.4.13" in out
    assert f"torch=={_lock()['torch']}" in out
    assert not [r for r in out if "<" in r and not r.startswith("torch")]


# ---------------------------------------------------------------------------------------------- versions


def test_untested_versions_are_named_with_the_range():
    low, high = compat.TESTED["transformers"]
    assert compat.untested_versions({"transformers": high, "torch": "2.13.0+cpu"}) == {}
    got = compat.untested_versions({"transformers": "5.99.0", "peft": "0.1.0"})
    assert got == {"transformers": f"transformers 5.99.0 is outside the tested range {low} – {high}",
                   "peft": f"peft 0.1.0 is outside the tested range {' – '.join(compat.TESTED['peft'])}"}


@pytest.mark.slow
def test_import_warns_once_when_a_version_is_outside_the_tested_range():
    code = ("import importlib.metadata as m, warnings; real = m.version\n"
            "m.version = lambda p: '9.9.9' if p == 'peft' else real(p)\n"
            "warnings.simplefilter('always')\n"
            "import workbench, workbench.core.compat as c\n"
            "c.warn_untested_versions()\n")  # a second call says nothing
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    low, high = compat.TESTED["peft"]
    assert err.count("outside the tested range") == 1
    assert f"peft 9.9.9 is outside the tested range {low} – {high}" in err and "make setup" in err
    clean = subprocess.run([sys.executable, "-W", "always", "-c", "import workbench"], capture_output=True, text=True)
    assert "tested range" not in clean.stderr  # the locked environment is inside it


# ---------------------------------------------------------------------------------------------- touch points


def test_the_cache_is_found_by_its_type_whatever_the_keyword():
    cache = DynamicCache()
    assert find_cache((), {"cache": cache}) is cache
    assert find_cache((), {"past_key_values": cache}) is cache
    assert find_cache((torch.zeros(1), cache), {}) is cache
    assert find_cache((torch.zeros(1),), {"use_cache": True, "cache": None}) is None
    model = tiny_model("llama", n_layers=2)
    out = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
    assert output_cache(out) is not None and output_cache(out).get_seq_length() == 3
    assert cache_keyword(model) in ("cache", "past_key_values")
    assert cache_keyword(model) in __import__("inspect").signature(model.forward).parameters


def test_positions_only_layer_crops_in_both_conventions_and_resets():
    layer = PositionsOnlyCacheLayer()
    empty = torch.zeros(1, 0, 7, 4)
    layer.update(empty, empty)
    assert layer.get_seq_length() == 7
    layer.crop(-2)  # drop the last two (transformers 5.24)
    assert layer.get_seq_length() == 5 and layer.keys.shape[-2] == 5
    layer.crop(3)  # keep the first three (before 5.24)
    assert layer.get_seq_length() == 3 and layer.keys.shape[-2] == 3
    layer.reset()
    assert layer.get_seq_length() == 0


FRAGILE = {"attn": {0: [0, 1], 2: [1]}, "mlp": {1: [1, 2, 3]}}  # layer 0's attention emptied, per-layer KV heads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_decoding_check_passes_on_every_family_and_dtype(family, dtype):
    model = tiny_model(family, n_layers=3).to(dtype)
    apply_plan(model, Plan.from_units(layer_widths(model), FRAGILE))
    assert models.decoding_touch_points(model) == ["an emptied attention in layer 0", "per-layer KV heads"]
    assert check_cached_decoding(model) <= compat.CHECK_TOLERANCE[dtype]


def _ignore_the_cache(monkeypatch):
    """The failure transformers 5.24 caused: an emptied attention that no longer sees the KV cache."""
    monkeypatch.setattr(hf_modeling, "find_cache", lambda args, kwargs: None)


def test_a_broken_cache_is_refused_when_the_model_is_pruned(monkeypatch):
    model = tiny_model("llama", n_layers=3)
    _ignore_the_cache(monkeypatch)
    with pytest.raises(DecodingCheckError) as err:
        apply_plan(model, Plan.from_units(layer_widths(model), FRAGILE))
    msg = str(err.value)
    version = metadata.version("transformers")
    assert f"decodes wrongly with the KV cache under transformers {version}" in msg
    assert "it relies on an emptied attention in layer 0 and per-layer KV heads" in msg
    assert "the cache counts 0 positions" in msg and "make setup" in msg and "refused" in msg


def test_a_broken_cache_is_refused_when_the_model_is_loaded(monkeypatch, tmp_path):
    model = tiny_model("qwen2", n_layers=3)
    apply_plan(model, Plan.from_units(layer_widths(model), FRAGILE))
    save_pruned(model, tmp_path / "ckpt")
    assert load_pruned(tmp_path / "ckpt") is not None
    _ignore_the_cache(monkeypatch)
    with pytest.raises(DecodingCheckError, match="emptied attention in layer 0"):
        load_pruned(tmp_path / "ckpt")


def test_models_that_rely_on_nothing_are_not_checked(monkeypatch):
    calls = []
    monkeypatch.setattr(models, "check_cached_decoding", lambda m, why="": calls.append(why))
    model = tiny_model("llama", n_layers=3)
    apply_plan(model, Plan.from_units(layer_widths(model), {"attn": {0: [1], 1: [1], 2: [1]}, "mlp": {1: [4]}}))
    assert calls == []  # uniform KV heads, nothing emptied
    model = tiny_model("llama", n_layers=3)
    apply_plan(model, Plan.from_units(layer_widths(model), {"attn": {1: [0, 1]}, "mlp": {1: list(range(96))}}))
    assert calls == ["removed layers"]
    model = tiny_model("llama", n_layers=3)
    apply_plan(model, Plan.from_units(layer_widths(model), FRAGILE), check_decoding=False)
    assert calls == ["removed layers"]
