import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

from workbench.core.testing import TINY_FAMILIES, byte_tokenizer, tiny_model  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(params=TINY_FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def make_model():
    """Factory: a fresh tiny model per call (pruning mutates models; nothing is shared)."""
    return tiny_model


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(autouse=True)
def _isolated_paths(tmp_path, monkeypatch):
    """Caches, figures and experiments of a test go to its own temporary folder (resolved at call time)."""
    import workbench.core.cache as cache

    monkeypatch.setenv("WORKBENCH_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("WORKBENCH_EXPERIMENTS", str(tmp_path / "experiments"))
    monkeypatch.setenv("WORKBENCH_DATA_CACHE", str(tmp_path / "data_cache"))
    monkeypatch.delenv("WORKBENCH_SWEEP_STORAGE", raising=False)  # a developer's database queue is never a test's
    monkeypatch.setattr(cache, "_MEMORY", {})


def _repo_outputs():
    """Every file under the repository's own output folders (the tests must not write there)."""
    from workbench.core.paths import REPO_ROOT

    return {str(p.relative_to(REPO_ROOT)) for d in ("data_cache", "figures", "experiments")
            for p in (REPO_ROOT / d).rglob("*") if (REPO_ROOT / d).exists()}


def pytest_sessionstart(session):
    session.config._repo_outputs_before = _repo_outputs()


def pytest_sessionfinish(session, exitstatus):
    written = _repo_outputs() - session.config._repo_outputs_before
    if written:
        print(f"\nthe test run wrote into the repository's data_cache/, figures/ or experiments/: {sorted(written)[:10]}")
        session.exitstatus = 1
