"""Fast re-scoring from cached importance: settings in, plan out, no forward pass.

`Rescorer` holds what a session re-uses (the importance of one calibration pass, the model's budget,
the measured block-removal loss, one unit table per method); widgets and notebooks call `plan`, the
tests call the same.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from workbench.plans.normalize import ScoringConfig, score_table
from workbench.plans.plan import EXTREME_THRESHOLD, Plan, extreme_blocks, layer_summary
from workbench.plans.selection import Budget, SelectionConfig, build_table, select
from workbench.scoring.methods import Importance, global_warning


@dataclass
class Rescorer:
    importance: Importance
    budget: Budget
    block_loss: pd.DataFrame | None = None
    _tables: dict[str, pd.DataFrame] = field(default_factory=dict, repr=False)

    def table(self, method: str) -> pd.DataFrame:
        if method not in self._tables:
            self._tables[method] = build_table(self.importance.scores(method), self.budget.costs)
            self._tables[method].attrs["method"] = method  # plans made from it name their importance method
        return self._tables[method]

    def plan(self, scoring: ScoringConfig, selection: SelectionConfig) -> tuple[pd.DataFrame, Plan]:
        """The scored table and the plan for these settings (a warning when a global plan is built from raw scores
        that are not comparable across layers, e.g. Wanda's)."""
        if selection.layer_ratios is None and (why := global_warning(scoring.method, scoring.normalization)):
            warnings.warn(why, UserWarning, stacklevel=2)
        scored = score_table(self.table(scoring.method), scoring, self.block_loss)
        plan = select(scored, self.budget, selection, score_column="final_score")
        plan.made_by(method=scoring.method, scoring=scoring.to_dict())
        return scored, plan

    def clipping_note(self, scoring: ScoringConfig, selection: SelectionConfig, plan: Plan | None = None) -> str | None:
        """Why percentile clipping leaves the plan unchanged, when it does (None when clipping is off or matters).

        `plan`: the plan of these settings when the caller has it already (it is not made again)."""
        if scoring.clip_low <= 0 and scoring.clip_high >= 100:
            return None
        plan = plan if plan is not None else self.plan(scoring, selection)[1]
        unclipped_table, unclipped = self.plan(dataclasses.replace(scoring, clip_low=0.0, clip_high=100.0), selection)
        if unclipped.removed != plan.removed:
            return None
        lo, hi = np.percentile(unclipped_table["final_score"].to_numpy(), [scoring.clip_low, scoring.clip_high])
        return (f"clipping {scoring.clip_low:g}–{scoring.clip_high:g} changes nothing here: it only ties the scores "
                f"below {lo:.3g} and above {hi:.3g}, and the budget's cut-off lies between them, so the low tail is "
                "removed and the high tail kept either way (clipping matters with a normalization that moves the "
                "cut-off into a tail, or with temperature)")

    def n_extreme(self, plan: Plan, threshold: float = EXTREME_THRESHOLD) -> int:
        return len(extreme_blocks(plan, threshold))

    def compare(self, settings: dict[str, ScoringConfig], selection: SelectionConfig,
                threshold: float = EXTREME_THRESHOLD) -> tuple[pd.DataFrame, dict[str, Plan]]:
        """The same budget under several scoring settings: one row of plan statistics per setting.

        Columns: extreme blocks, emptied blocks, removed layers, the largest per-layer pruned fraction
        and the spread (std) of per-layer pruned fractions for attention and MLP, achieved ratio.
        """
        rows, plans = [], {}
        for name, scoring in settings.items():
            _, plan = self.plan(scoring, selection)
            plans[name] = plan
            s = layer_summary(plan)
            row = dict(setting=name, **scoring.to_dict(), n_extreme=self.n_extreme(plan, threshold),
                       emptied_blocks=len(plan.emptied_blocks()), removed_layers=len(plan.removed_layers()),
                       achieved_ratio=plan.achieved_ratio)
            for block in ("attn", "mlp"):
                frac = s[s.block == block].pruned_fraction
                row[f"{block}_max_pruned"] = float(frac.max())
                row[f"{block}_std_pruned"] = float(frac.std(ddof=0))
            rows.append(row)
        return pd.DataFrame(rows).set_index("setting"), plans
