import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

from workbench.testing import TINY_FAMILIES, byte_tokenizer, tiny_model  # noqa: E402

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
    import workbench.cache as cache

    monkeypatch.setenv("WORKBENCH_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("WORKBENCH_EXPERIMENTS", str(tmp_path / "experiments"))
    monkeypatch.setenv("WORKBENCH_DATA_CACHE", str(tmp_path / "data_cache"))
    monkeypatch.setattr(cache, "_MEMORY", {})
