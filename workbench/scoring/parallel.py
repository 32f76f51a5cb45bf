"""Data-parallel calibration: one importance pass split over several processes (torch.distributed).

Under torchrun, call `importance_cached(..., data_parallel=True)` in every process after
`torch.distributed.init_process_group` (`init_from_env` does it from torchrun's variables). From a notebook
or a script on one machine, `importance_data_parallel` starts the processes itself (gloo on CPUs, NCCL on
GPUs: one process per GPU) and returns the result, the same as one process computes (up to summation order).
"""
from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from workbench.core.registry import check_choice
from workbench.scoring.importance import importance_cached, load_importance, save_importance
from workbench.scoring.methods import Importance


def init_from_env(backend: str | None = None) -> bool:
    """Join torchrun's process group when launched by it (WORLD_SIZE > 1); return whether this is data-parallel."""
    import torch.distributed as dist  # deferred: only data-parallel runs need it

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, backend: str, make_model: Callable[[], nn.Module],
            samples: torch.Tensor, kwargs: dict, out: str) -> None:
    import torch.distributed as dist  # deferred: only data-parallel runs need it

    torch.set_num_threads(max(1, int(os.environ.get("WORKBENCH_THREADS_PER_PROCESS", "1"))))
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
        if backend == "nccl":
            torch.cuda.set_device(device)
        model = make_model().to(device)
        imp = importance_cached(model, samples, data_parallel=True, progress=rank == 0, **kwargs)
        if rank == 0:
            save_importance(imp, out)
    finally:
        dist.destroy_process_group()


def importance_data_parallel(make_model: Callable[[], nn.Module], samples: torch.Tensor, world_size: int, *,
                             backend: str | None = None, **kwargs) -> Importance:
    """The importance pass over `world_size` processes on this machine; returns rank 0's result.

    make_model: a picklable function building the same model in every process (a module-level function such as
        `def make(): return load_model(path)[0]`, or `functools.partial(tiny_model, "llama")`); kwargs go to
        `importance_cached` (batch_size, fisher, cache).
    backend: "gloo" (CPU, the default without CUDA) or "nccl" (one GPU per process).
    """
    import torch.multiprocessing as mp  # deferred: only data-parallel runs need it

    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be a positive integer")
    backend = backend or ("nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo")
    check_choice("backend", backend, ("gloo", "nccl"))
    with tempfile.TemporaryDirectory(prefix="workbench-dp-") as tmp:
        out = str(Path(tmp) / "importance.pt")
        mp.spawn(_worker, args=(world_size, _free_port(), backend, make_model, samples, kwargs, out),
                 nprocs=world_size, join=True)
        return load_importance(out)
