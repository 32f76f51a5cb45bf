"""An ipywidgets panel over `Rescorer`: every change re-scores from the cache and redraws.

The panel holds no logic: `settings_from_values` turns widget values into the same frozen configs a
test or a script passes to `Rescorer.plan`.
"""
from __future__ import annotations

import warnings

from workbench import plots
from workbench.diagnosis import EXTREME_THRESHOLD
from workbench.methods import available_methods
from workbench.normalize import LEVELS, NORMALIZERS, PRESETS, TAU_OVER_BUDGET, ScoringConfig
from workbench.rescore import Rescorer
from workbench.selection import RATIO_OF, SelectionConfig
from workbench.plans import Plan, layer_summary


def settings_from_values(v: dict) -> tuple[ScoringConfig, SelectionConfig]:
    scoring = ScoringConfig(method=v["method"], normalization=v["normalization"], level=v["level"],
                            clip_low=v["clip"][0], clip_high=v["clip"][1], temperature=v["temperature"],
                            tau=v["tau"] if v["use_tau"] else None, tau_over_budget=v["tau_over_budget"])
    return scoring, SelectionConfig(ratio=v["ratio"], ratio_of=v["ratio_of"])


def panel(rescorer: Rescorer, initial: ScoringConfig = PRESETS["taylor"], ratio: float = 0.2):
    """Build the panel; returns (widget, state) where state['plan'] is the plan on display."""
    import ipywidgets as W  # deferred: widgets load only in a notebook
    import plotly.graph_objects as go  # deferred: plotting libraries load only when drawing


    has_loss = rescorer.block_loss is not None
    c = dict(
        preset=W.Dropdown(options=["(custom)", *PRESETS], value="(custom)", description="preset"),
        method=W.Dropdown(options=available_methods(rescorer.importance), value=initial.method, description="importance"),
        normalization=W.Dropdown(options=list(NORMALIZERS), value=initial.normalization, description="normalize"),
        level=W.ToggleButtons(options=list(LEVELS), value=initial.level, description="level"),
        clip=W.FloatRangeSlider(value=(initial.clip_low, initial.clip_high), min=0, max=100, step=0.5,
                                description="clip pct"),
        temperature=W.FloatSlider(value=initial.temperature, min=0, max=1, step=0.05, description="T",
                                  disabled=not has_loss),
        use_tau=W.Checkbox(value=initial.tau is not None, description="tau on", disabled=not has_loss),
        tau_over_budget=W.ToggleButtons(options=list(TAU_OVER_BUDGET), value=initial.tau_over_budget,
                                        description="tau > budget", disabled=not has_loss),
        tau=W.FloatLogSlider(value=initial.tau or 1e-3, base=10, min=-5, max=1, description="tau",
                             disabled=not has_loss),
        ratio=W.FloatSlider(value=ratio, min=0.0, max=0.7, step=0.01, description="ratio"),
        ratio_of=W.ToggleButtons(options=list(RATIO_OF), value="total", description="of"),
    )
    status = W.HTML()
    # Traces start empty; the first `redraw` below fills them (one plan per change, none twice).
    empty = layer_summary(Plan.from_units(rescorer.budget.widths, {}))
    fig = go.FigureWidget(plots.kept_fraction_per_layer(empty))
    state: dict = {"applying_preset": False}

    def redraw(_=None):
        if state["applying_preset"]:
            return
        try:
            scoring, selection = settings_from_values(_values(c))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _, plan = rescorer.plan(scoring, selection)
        except ValueError as e:
            status.value = f"<b style='color:#d62728'>{e}</b>"
            return
        state["plan"], state["scoring"], state["selection"] = plan, scoring, selection
        summary = layer_summary(plan)
        with fig.batch_update():
            for trace, block in zip(fig.data, ("attn", "mlp")):
                trace.y = summary[summary.block == block].kept_fraction.to_numpy()
        achieved = plan.selected_params / plan.denominator
        status.value = (f"removed {plan.selected_params:,} of {plan.denominator:,} ({achieved:.2%} of {selection.ratio_of}); "
                        f"extreme blocks (> {EXTREME_THRESHOLD:.0%} pruned): <b>{rescorer.n_extreme(plan)}</b>; "
                        f"emptied blocks {len(plan.emptied_blocks())}, removed layers {len(plan.removed_layers())}"
                        + "".join(f"<br><b style='color:#d62728'>warning: {w.message}</b>" for w in caught)
                        + (f"<br><i>{note}</i>" if (note := rescorer.clipping_note(scoring, selection, plan)) else ""))

    def apply_preset(change):
        if change["new"] in PRESETS:
            p = PRESETS[change["new"]]
            state["applying_preset"] = True  # set every control, then re-score once
            try:
                c["method"].value, c["normalization"].value, c["level"].value = p.method, p.normalization, p.level
                c["clip"].value, c["temperature"].value = (p.clip_low, p.clip_high), p.temperature
            finally:
                state["applying_preset"] = False
            redraw()

    c["preset"].observe(apply_preset, names="value")
    for name, w in c.items():
        if name != "preset":
            w.observe(redraw, names="value")
    redraw()
    controls = W.VBox([c["preset"], c["method"], c["normalization"], c["level"], c["clip"], c["temperature"],
                       W.HBox([c["use_tau"], c["tau"]]), c["tau_over_budget"], c["ratio"], c["ratio_of"], status])
    box = W.HBox([controls, fig])
    box.controls = c  # for programmatic use and tests
    return box, state


def _values(c: dict) -> dict:
    return {k: w.value for k, w in c.items()}
