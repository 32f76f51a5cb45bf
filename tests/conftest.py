import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

from workbench.models import TINY_FAMILIES, byte_tokenizer, tiny_model  # noqa: E402

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
    """Caches, figures and experiments of a test go to its own temporary folder."""
    import workbench.experiments as ex
    import workbench.importance as imp
    import workbench.models as models
    import workbench.plots as plots

    monkeypatch.setattr(plots, "FIGURES", tmp_path / "figures")
    monkeypatch.setattr(ex, "EXPERIMENTS", tmp_path / "experiments")
    monkeypatch.setattr(imp, "IMPORTANCE_CACHE", tmp_path / "importance")
    monkeypatch.setattr(imp, "_MEMORY_CACHE", {})
    monkeypatch.setattr(models, "DATA_CACHE", tmp_path / "data_cache")
