"""One re-score + selection on a synthetic table shaped like Llama-3-8B (target < 50 ms).

32 layers × (8 KV groups + 14,336 MLP channels) ≈ 459 k units; layer scales spread over 10^3 as
real gradients are. Prints the median of repeated runs for several scoring settings.
"""
import statistics
import time

import numpy as np
import pandas as pd
import torch

from workbench.methods import Accumulators, Importance
from workbench.normalize import PRESETS, ScoringConfig
from workbench.rescore import Rescorer
from workbench.selection import Budget, SelectionConfig

L, G, C, HIDDEN, HD, R = 32, 8, 14_336, 4096, 128, 4


def synthetic_rescorer() -> Rescorer:
    g = torch.Generator().manual_seed(0)
    scale = 10 ** torch.linspace(0, 3, L)
    first = {"attn": [torch.rand(G, generator=g) * s for s in scale], "mlp": [torch.rand(C, generator=g) * s for s in scale]}
    acc = Accumulators(first=first, fisher=first, magnitude=first, wanda=first, fluctuation=first, batches=1, tokens=1)
    imp = Importance(acc=acc, grad_stats=pd.DataFrame(), widths=[(G, C)] * L, model="synthetic-llama3-8b")
    costs = {"attn": [2 * R * HD * HIDDEN + 2 * HD * HIDDEN] * L, "mlp": [3 * HIDDEN] * L}
    budget = Budget([(G, C)] * L, costs, total_params=8_030_261_248)
    loss = pd.DataFrame({"layer": np.repeat(np.arange(L), 2), "block": ["attn", "mlp"] * L,
                         "removal_loss": np.random.default_rng(0).random(2 * L)})
    return Rescorer(imp, budget, loss)


def settings() -> dict[str, ScoringConfig]:
    """The scoring settings timed: every preset, and every correction at once."""
    return {**{f"preset {k}": v for k, v in PRESETS.items()},
            "log/block + clip 1-99 + T=0.5 + tau": ScoringConfig(normalization="log", level="block", clip_low=1,
                                                                 clip_high=99, temperature=0.5, tau=0.05)}


def main():
    rs = synthetic_rescorer()
    n_units = len(rs.table("taylor"))
    print(f"synthetic Llama-3-8B table: {n_units:,} units")
    for name, cfg in settings().items():
        times = []
        for _ in range(7):
            t = time.perf_counter()
            rs.plan(cfg, SelectionConfig(ratio=0.2))
            times.append(time.perf_counter() - t)
        print(f"  {name:40s} median {statistics.median(times) * 1e3:7.1f} ms  (target < 50 ms)")


if __name__ == "__main__":
    main()
