"""One re-score + selection on a synthetic table shaped like Llama-3-8B (target < 50 ms).

32 layers × (8 KV groups + 14,336 MLP channels) ≈ 459 k units; layer scales spread over 10^3 as
real gradients are. Prints the median of repeated runs for several scoring settings.
"""
import statistics
import time
import warnings

import numpy as np
import pandas as pd
import torch

from workbench.plans.normalize import PRESETS, ScoringConfig
from workbench.plans.rescore import Rescorer
from workbench.plans.selection import Budget, SelectionConfig
from workbench.scoring.methods import Accumulators, Importance

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


def plan_ms(rescorer: Rescorer, cfg: ScoringConfig, ratio: float = 0.2, repeats: int = 7) -> float:
    """Median milliseconds of one re-score + selection (warnings, e.g. tau's cap, are silenced while timed)."""
    times = []
    for _ in range(repeats):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = time.perf_counter()
            rescorer.plan(cfg, SelectionConfig(ratio=ratio))
            times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main():
    rs = synthetic_rescorer()
    n_units = len(rs.table("taylor"))
    print(f"synthetic Llama-3-8B table: {n_units:,} units")
    for name, cfg in settings().items():
        print(f"  {name:40s} median {plan_ms(rs, cfg):7.1f} ms  (target < 50 ms)")


if __name__ == "__main__":
    main()
