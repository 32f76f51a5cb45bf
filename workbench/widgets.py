"""An ipywidgets panel over `Rescorer`: every change re-scores from the cache and redraws.

The panel holds no logic: `settings_from_values` turns widget values into the same frozen configs a
test or a script passes to `Rescorer.plan`.
"""
from __future__ import annotations

import warnings
from typing import Callable

import pandas as pd

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


def settings_title(scoring: ScoringConfig, selection: SelectionConfig) -> str:
    """One line naming the settings on display (the panel's figure title, and the static figure's)."""
    parts = [scoring.method]
    if scoring.normalization != "none":
        parts.append(f"{scoring.normalization}/{scoring.level}")
    if (scoring.clip_low, scoring.clip_high) != (0.0, 100.0):
        parts.append(f"clip {scoring.clip_low:g}–{scoring.clip_high:g}")
    if scoring.temperature:
        parts.append(f"T={scoring.temperature:g}")
    if scoring.tau is not None:
        parts.append(f"tau={scoring.tau:g} ({scoring.tau_over_budget})")
    return f"{', '.join(parts)}; {selection.ratio:.0%} of {selection.ratio_of}"


def matching_preset(scoring: ScoringConfig) -> str:
    """The preset whose settings `scoring` has (tau and tau_over_budget aside), else "(custom)"."""
    fields = ("method", "normalization", "level", "clip_low", "clip_high", "temperature")
    for name, p in PRESETS.items():
        if all(getattr(p, f) == getattr(scoring, f) for f in fields) and scoring.tau is None:
            return name
    return CUSTOM


CUSTOM = "(custom)"


def panel(rescorer: Rescorer, initial: ScoringConfig = PRESETS["taylor"], ratio: float = 0.2, *,
          reference: Plan | None = None, reference_name: str = "reference",
          evaluate: Callable[[Plan], float] | None = None, save: Callable[[Plan], object] | None = None):
    """Build the panel; returns (widget, state) where state['plan'] is the plan on display.

    reference: a plan drawn dashed beside the current one ("pin as reference" replaces it by the plan on
        display, to compare with the previous setting).
    evaluate: plan -> perplexity, run by the "Evaluate PPL" button (e.g. `perplexity_after` on the model).
    save: plan -> where it went, run by the "Save plan" button (e.g. `record_plan` into the experiment).
    The per-layer table under the chart lists the plan's kept units per layer.
    """
    import ipywidgets as W  # deferred: widgets load only in a notebook
    import plotly.graph_objects as go  # deferred: plotting libraries load only when drawing

    has_loss = rescorer.block_loss is not None
    c = dict(
        preset=W.Dropdown(options=[CUSTOM, *PRESETS], value=matching_preset(initial), description="preset"),
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
    buttons = dict(
        pin=W.Button(description="pin as reference", tooltip="draw the plan on display dashed, to compare"),
        evaluate=W.Button(description="Evaluate PPL", disabled=evaluate is None,
                          tooltip="perplexity of the model pruned by the plan on display"),
        save=W.Button(description="Save plan", disabled=save is None, tooltip="save the plan on display"),
    )
    status, result, table = W.HTML(), W.HTML(), W.HTML()
    # Traces start empty; the first `redraw` below fills them (one plan per change, none twice).
    empty = layer_summary(Plan.from_units(rescorer.budget.widths, {}))
    fig = go.FigureWidget(plots.kept_fraction_per_layer(empty))
    for block in ("attn", "mlp"):
        fig.add_scatter(x=empty[empty.block == block].layer, y=[None] * len(rescorer.budget.widths), mode="lines",
                        line=dict(dash="dash", color=plots.COLORS[block]), name=f"{block} ({reference_name})")
    state: dict = {"applying_preset": False, "reference": reference, "ppl": {}}

    def draw_reference():
        ref = state["reference"]
        summary = layer_summary(ref) if ref is not None else None
        with fig.batch_update():
            for trace, block in zip(fig.data[2:], ("attn", "mlp")):
                trace.y = (summary[summary.block == block].kept_fraction.to_numpy() if summary is not None
                           else [None] * len(rescorer.budget.widths))

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
        state["title"] = settings_title(scoring, selection)
        if c["preset"].value != matching_preset(scoring):  # a manual edit leaves the preset's settings
            state["applying_preset"] = True
            c["preset"].value = matching_preset(scoring)
            state["applying_preset"] = False
        summary = layer_summary(plan)
        with fig.batch_update():
            for trace, block in zip(fig.data, ("attn", "mlp")):
                trace.y = summary[summary.block == block].kept_fraction.to_numpy()
            fig.layout.title.text = state["title"]
        table.value = per_layer_table(plan).to_html(border=0, max_rows=None)
        result.value = ""
        achieved = plan.selected_params / plan.denominator
        status.value = (f"removed {plan.selected_params:,} of {plan.denominator:,} ({achieved:.2%} of {selection.ratio_of}); "
                        f"extreme blocks (> {EXTREME_THRESHOLD:.0%} pruned): <b>{rescorer.n_extreme(plan)}</b>; "
                        f"emptied blocks {len(plan.emptied_blocks())}, removed layers {len(plan.removed_layers())}"
                        + "".join(f"<br><b style='color:#d62728'>warning: {w.message}</b>" for w in caught)
                        + (f"<br><i>{note}</i>" if (note := rescorer.clipping_note(scoring, selection, plan)) else ""))

    def apply_preset(change):
        if state["applying_preset"] or change["new"] not in PRESETS:
            return
        p = PRESETS[change["new"]]
        state["applying_preset"] = True  # set every control, then re-score once
        try:
            c["method"].value, c["normalization"].value, c["level"].value = p.method, p.normalization, p.level
            c["clip"].value, c["temperature"].value = (p.clip_low, p.clip_high), p.temperature
            c["use_tau"].value = False
        finally:
            state["applying_preset"] = False
        redraw()

    def pin(_=None):
        state["reference"] = state["plan"]
        draw_reference()

    def run_evaluate(_=None):
        result.value = "<i>evaluating…</i>"
        value = evaluate(state["plan"])
        state["ppl"][state["title"]] = value
        result.value = f"PPL <b>{value:,.2f}</b> ({state['title']})"

    def run_save(_=None):
        where = save(state["plan"])
        state["saved"] = where
        result.value = f"saved: {where}"

    c["preset"].observe(apply_preset, names="value")
    for name, w in c.items():
        if name != "preset":
            w.observe(redraw, names="value")
    buttons["pin"].on_click(pin)
    buttons["evaluate"].on_click(run_evaluate)
    buttons["save"].on_click(run_save)
    redraw()
    draw_reference()
    controls = W.VBox([c["preset"], c["method"], c["normalization"], c["level"], c["clip"], c["temperature"],
                       W.HBox([c["use_tau"], c["tau"]]), c["tau_over_budget"], c["ratio"], c["ratio_of"],
                       W.HBox(list(buttons.values())), result, status])
    box = W.VBox([W.HBox([controls, fig]), W.Accordion(children=[table], titles=("per-layer plan",))])
    box.controls, box.buttons, box.status, box.result, box.table = c, buttons, status, result, table
    return box, state


def per_layer_table(plan: Plan):
    """Per layer: KV groups and MLP channels kept of the total, and the share pruned (the panel's table)."""
    s = layer_summary(plan)
    wide = s.pivot(index="layer", columns="block", values=["kept", "units"])
    out = {"attn groups kept": [f"{k} / {u}" for k, u in zip(wide["kept"]["attn"], wide["units"]["attn"])],
           "MLP channels kept": [f"{k:,} / {u:,}" for k, u in zip(wide["kept"]["mlp"], wide["units"]["mlp"])],
           "attn pruned": [f"{1 - k / u:.0%}" if u else "–" for k, u in zip(wide["kept"]["attn"], wide["units"]["attn"])],
           "MLP pruned": [f"{1 - k / u:.0%}" if u else "–" for k, u in zip(wide["kept"]["mlp"], wide["units"]["mlp"])]}
    return pd.DataFrame(out, index=wide.index)


def _values(c: dict) -> dict:
    return {k: w.value for k, w in c.items()}
