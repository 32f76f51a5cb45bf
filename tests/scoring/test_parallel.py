"""Data-parallel calibration: two gloo processes on the CPU give what one process gives."""
import functools

import pytest
import torch

from workbench.core.testing import tiny_model
from workbench.scoring.importance import compute_importance
from workbench.scoring.methods import IMPORTANCE_METHODS
from workbench.scoring.parallel import importance_data_parallel


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-6) -> bool:
    return bool(((a - b).abs() <= rel * b.abs().max().clamp_min(1e-30)).all())


@pytest.mark.slow
@pytest.mark.parametrize("fisher", ["batch", "sequence"])
def test_two_processes_compute_what_one_computes(fisher, tmp_path):
    make = functools.partial(tiny_model, "llama", n_layers=3, seed=5)
    samples = torch.randint(0, 256, (10, 16), generator=torch.Generator().manual_seed(1))  # 3 batches of 4: 2 + 1
    one = compute_importance(make(), samples, batch_size=4, fisher=fisher, progress=False)
    two = importance_data_parallel(make, samples, 2, batch_size=4, fisher=fisher, cache=tmp_path)
    assert (two.acc.batches, two.acc.tokens, two.acc.sequences) == (one.acc.batches, one.acc.tokens, one.acc.sequences)
    methods = [m for m in IMPORTANCE_METHODS if IMPORTANCE_METHODS[m].needs is None
               or (fisher == "sequence" and IMPORTANCE_METHODS[m].needs == "sequence_fisher")]
    for method in methods:
        for block, per_layer in one.scores(method).items():
            for a, b in zip(two.scores(method)[block], per_layer):
                assert _close(a, b), (method, block)
    for col in ("abs_sum", "sq_sum", "max_abs", "zeros"):
        assert torch.allclose(torch.tensor(two.grad_stats[col].to_numpy()), torch.tensor(one.grad_stats[col].to_numpy()),
                              rtol=1e-6, atol=0)
    assert len(list((tmp_path / "importance").glob("*.pt"))) == 1  # rank 0 wrote the cache, once


@pytest.mark.slow
def test_two_processes_compute_the_refit_scores_one_computes(tmp_path):
    """Each process replays its own share of the samples; the layers' Grams and the output Fisher are summed."""
    make = functools.partial(tiny_model, "qwen2", n_layers=3, seed=5)
    samples = torch.randint(0, 256, (10, 16), generator=torch.Generator().manual_seed(1))
    kw = dict(batch_size=4, refit=True, refit_toward="dense", refit_damping=0.05)
    one = compute_importance(make(), samples, progress=False, **kw)
    two = importance_data_parallel(make, samples, 2, cache=tmp_path, **kw)
    assert two.acc.refit_ridge == one.acc.refit_ridge == dict(damping=0.05, toward="dense")
    for block, per_layer in one.acc.refit.items():
        for a, b in zip(two.acc.refit[block], per_layer):
            assert _close(a, b, 1e-5), block
    assert not torch.equal(one.acc.refit["mlp"][0], compute_importance(make(), samples, progress=False, batch_size=4,
                                                                       refit=True).acc.refit["mlp"][0])


def test_data_parallel_needs_a_process_group_and_at_least_one_process():
    model = tiny_model("llama", n_layers=2)
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        compute_importance(model, torch.randint(0, 256, (4, 8)), data_parallel=True, progress=False)
    with pytest.raises(ValueError, match="world_size=0"):
        importance_data_parallel(functools.partial(tiny_model, "llama"), torch.randint(0, 256, (4, 8)), 0)


@pytest.mark.slow
def test_calibrate_command_under_torchrun_caches_what_one_process_computes(tmp_path, capsys):
    """`torchrun --nproc_per_node=2 -m workbench calibrate run.yaml`: rank 0 writes the cache, and a later
    single-process run of the same file reads that entry (same key) instead of computing."""
    import os
    import subprocess
    import sys

    from workbench.runs.cli import main
    from workbench.scoring.importance import load_importance

    (tmp_path / "run.yaml").write_text("model: {name: tiny}\ncalibration: {num_samples: 8, seq_len: 16, batch_size: 2}\n")
    env = dict(os.environ, WORKBENCH_THREADS_PER_PROCESS="1", OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run([*torchrun, "-m", "workbench", "calibrate", str(tmp_path / "run.yaml"), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("importance of 4 batches, 128 tokens") == 1  # printed by rank 0 only
    files = list((tmp_path / "data_cache" / "importance").glob("*.pt"))
    assert len(files) == 1
    shared = load_importance(files[0])
    assert main(["calibrate", str(tmp_path / "run.yaml"), "--quiet"]) == 0
    assert f"cache key {shared.key[:12]}" in capsys.readouterr().out
    from workbench.core.testing import byte_tokenizer
    from workbench.data.text import CalibrationConfig, calibration_samples

    samples = calibration_samples(byte_tokenizer(), CalibrationConfig(num_samples=8, seq_len=16, batch_size=2))
    one = compute_importance(tiny_model("llama", n_layers=4), samples, batch_size=2, progress=False)
    for block, per_layer in one.acc.first.items():
        for a, b in zip(shared.acc.first[block], per_layer):
            assert _close(a, b)


def _model_with_a_cache_per_node(root: str):
    """Each process gets its own data cache, as ranks on different machines do."""
    import os
    from pathlib import Path

    import torch.distributed as dist
    os.environ["WORKBENCH_DATA_CACHE"] = str(Path(root) / f"node{dist.get_rank()}")
    return tiny_model("llama", n_layers=3, seed=5)


@pytest.mark.slow
def test_ranks_agree_on_a_cache_hit_before_the_pass(tmp_path):
    """Rank 0's node holds the entry, rank 1's does not: both compute (rank 0 alone returning early would leave
    rank 1 waiting in the all-reduce forever, or dying)."""
    from workbench.scoring.importance import importance_cached
    samples = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(2))
    one = importance_cached(tiny_model("llama", n_layers=3, seed=5), samples, batch_size=4, progress=False,
                            cache=tmp_path / "node0")
    two = importance_data_parallel(functools.partial(_model_with_a_cache_per_node, str(tmp_path)), samples, 2,
                                   batch_size=4)
    assert two.acc.batches == one.acc.batches
    for block, per_layer in one.scores("taylor").items():
        for a, b in zip(two.scores("taylor")[block], per_layer):
            assert _close(a, b)
    assert not (tmp_path / "node1" / "importance").exists()  # only rank 0 writes
