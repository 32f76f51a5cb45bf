"""An ipywidgets panel over `Rescorer`: every change re-scores from the cache and redraws.

The panel holds no logic: `settings_from_values` turns widget values into the same frozen configs a
test or a script passes to `Rescorer.plan`.
"""
from __future__ import annotations

import warnings
from copy import deepcopy
from typing import Callable

import pandas as pd

from workbench import plots
from workbench.plans.normalize import LEVELS, NORMALIZERS, PRESETS, TAU_OVER_BUDGET, ScoringConfig
from workbench.plans.plan import EXTREME_THRESHOLD, Plan, PlanProvenance, layer_summary
from workbench.plans.rescore import Rescorer
from workbench.plans.selection import RATIO_OF, SelectionConfig
from workbench.scoring.methods import available_methods


def settings_from_values(v: dict) -> tuple[ScoringConfig, SelectionConfig]:
    scoring = ScoringConfig(method=v["method"], normalization=v["normalization"], level=v["level"],
                            clip_low=v["clip"][0], clip_high=v["clip"][1], temperature=v["temperature"],
                            tau=v["tau"] if v["use_tau"] else None, tau_over_budget=v["tau_over_budget"])
    return scoring, SelectionConfig(ratio=v["ratio"], ratio_of=v["ratio_of"])


def _setting_parts(scoring: ScoringConfig) -> list[str]:
    """The non-default scoring settings, each as a short word of a file name."""
    parts = [scoring.method]
    if scoring.normalization != "none":
        parts.append(f"{scoring.normalization}-{scoring.level}")
    if (scoring.clip_low, scoring.clip_high) != (0.0, 100.0):
        parts.append(f"clip{scoring.clip_low:g}-{scoring.clip_high:g}")
    if scoring.temperature:
        parts.append(f"T{scoring.temperature:g}")
    if scoring.tau is not None:
        parts.append(f"tau{scoring.tau:g}-{scoring.tau_over_budget}")
    return parts


def settings_title(scoring: ScoringConfig, selection: SelectionConfig) -> str:
    """One line naming the settings on display (the panel's figure title, and the static figure's)."""
    label = PlanProvenance("global", method=scoring.method, scoring=scoring.to_dict()).label
    return f"{label}; {selection.ratio:.0%} of {selection.ratio_of}"


def matching_preset(scoring: ScoringConfig) -> str:
    """The preset whose settings `scoring` has (tau and tau_over_budget aside), else "(custom)"."""
    fields = ("method", "normalization", "level", "clip_low", "clip_high", "temperature")
    for name, p in PRESETS.items():
        if all(getattr(p, f) == getattr(scoring, f) for f in fields) and scoring.tau is None:
            return name
    return CUSTOM


CUSTOM = "(custom)"
RATIO_MAX = 0.95  # the ratio slider's range is [0, RATIO_MAX]
TAU_RANGE = (1e-5, 10.0)  # the tau slider's range (log scale: tau = 0 cannot be shown; tau off is "tau on" unticked)


def figure_name(scoring: ScoringConfig, selection: SelectionConfig) -> str:
    """A file-name form of the settings on display, for the panel plan's static figure.

    >>> figure_name(PRESETS["blockwise"], SelectionConfig(ratio=0.35))
    'panel_plan_taylor_minmax-block_0.35_total'
    """
    return "_".join(["panel_plan", *_setting_parts(scoring), f"{selection.ratio:g}",
                     selection.ratio_of])


def _check_initial(initial: ScoringConfig, ratio: float) -> None:
    """Initial values the controls cannot show are an error, never a silent clamp."""
    if not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= RATIO_MAX:
        raise ValueError(f"ratio={ratio!r} is outside the panel's slider [0, {RATIO_MAX}]")
    if initial.tau is not None and not TAU_RANGE[0] <= initial.tau <= TAU_RANGE[1]:
        raise ValueError(f"tau={initial.tau!r} is outside the panel's tau slider [{TAU_RANGE[0]:g}, {TAU_RANGE[1]:g}] "
                         "(a log scale); use tau=None (off) or a value in that range")


def panel(rescorer: Rescorer, initial: ScoringConfig = PRESETS["taylor"], ratio: float = 0.2, *,
          reference: Plan | None = None, reference_name: str = "reference",
          evaluate: Callable[[Plan], float] | None = None, save: Callable[[Plan], object] | None = None,
          block_loss: Callable[[], pd.DataFrame] | None = None):
    """Build the panel; returns (widget, state) where state['plan'] is the plan on display (None while the
    settings on display are refused: the chart is then empty and the buttons are off, so what is shown,
    saved and evaluated is always one plan). state['figure_name'] names its static figure by its settings.

    reference: a plan drawn dashed beside the current one ("pin as reference" replaces it by the plan on
        display, to compare with the previous setting).
    evaluate: plan -> perplexity, run by the "Evaluate PPL" button (e.g. `perplexity_after` on the model).
    save: plan -> where it went, run by the "Save plan" button (e.g. `record_plan` into the experiment).
    block_loss: () -> the block-removal loss, run by the "compute block-removal loss" button when the
        rescorer has none (T and tau need it; without it they are off and the panel says why).
    The per-layer table under the chart lists the plan's kept units per layer. An error in a button's
    callback is shown in the panel, in red.
    """
    _check_initial(initial, ratio)
    import ipywidgets as W  # deferred: widgets load only in a notebook
    import plotly.graph_objects as go  # deferred: plotting libraries load only when drawing

    has_loss = rescorer.block_loss is not None
    slider = dict(style={"description_width": "80px"}, layout=W.Layout(width="340px"))
    c = dict(
        preset=W.Dropdown(options=[CUSTOM, *PRESETS], value=matching_preset(initial), description="preset"),
        method=W.Dropdown(options=available_methods(rescorer.importance), value=initial.method, description="importance"),
        normalization=W.Dropdown(options=list(NORMALIZERS), value=initial.normalization, description="normalize"),
        level=W.ToggleButtons(options=list(LEVELS), value=initial.level, description="level"),
        clip=W.FloatRangeSlider(value=(initial.clip_low, initial.clip_high), min=0, max=100, step=0.5,
                                description="clip pct", readout_format=".3g", **slider),
        temperature=W.FloatSlider(value=initial.temperature, min=0, max=1, step=0.05, description="T",
                                  disabled=not has_loss, **slider),
        use_tau=W.Checkbox(value=initial.tau is not None, description="tau on", disabled=not has_loss, indent=False,
                           layout=W.Layout(width="70px")),
        tau_over_budget=W.ToggleButtons(options=list(TAU_OVER_BUDGET), value=initial.tau_over_budget,
                                        description="tau > budget", disabled=not has_loss),
        tau=W.FloatLogSlider(value=1e-3 if initial.tau is None else initial.tau, base=10, min=-5, max=1,
                             description="tau", disabled=not has_loss, readout_format=".2g",
                             style={"description_width": "30px"}, layout=W.Layout(width="270px")),
        ratio=W.FloatSlider(value=ratio, min=0.0, max=RATIO_MAX, step=0.01, description="ratio", **slider),
        ratio_of=W.ToggleButtons(options=list(RATIO_OF), value="total", description="of"),
    )
    buttons = dict(
        pin=W.Button(description="pin as reference", tooltip="draw the plan on display dashed, to compare"),
        evaluate=W.Button(description="Evaluate PPL", disabled=evaluate is None,
                          tooltip="perplexity of the model pruned by the plan on display"),
        save=W.Button(description="Save plan", disabled=save is None, tooltip="save the plan on display"),
        block_loss=W.Button(description="compute block-removal loss", disabled=block_loss is None or has_loss,
                            layout=W.Layout(display="none" if has_loss else None, width="auto"),
                            tooltip="measure each block's removal loss (one pass per block), then T and tau work"),
    )
    for b in ("pin", "evaluate", "save"):
        buttons[b].layout = W.Layout(width="auto")
    status, result, table = W.HTML(), W.HTML(), W.HTML()
    loss_note = W.HTML("" if has_loss else (
        "<i>T and tau are off: they need each block's removal loss, which this panel was not given "
        + ("(press the button below to measure it)" if block_loss is not None else
           "(pass <code>block_loss=</code> to the Rescorer, from <code>workbench.scoring.removal.block_removal_loss</code>, "
           "or <code>block_loss=</code> to <code>panel</code> to measure it here)") + ".</i>"))
    # Traces start empty; the first `redraw` below fills them (one plan per change, none twice).
    empty = layer_summary(Plan.from_units(rescorer.budget.widths, {}))
    fig = go.FigureWidget(plots.kept_fraction_per_layer(empty))
    fig.layout.width, fig.layout.autosize = None, True  # follows its box (the controls keep their width)
    fig.update_layout(legend=dict(orientation="h", x=0, y=-0.22, yanchor="top"),  # below: never cut at the edge
                      margin=dict(l=50, r=20, t=50, b=90))
    for block in ("attn", "mlp"):
        fig.add_scatter(x=empty[empty.block == block].layer, y=[None] * len(rescorer.budget.widths), mode="lines",
                        line=dict(dash="dash", color=plots.COLORS[block]), name=f"{block} ({reference_name})")
    state: dict = {"applying_preset": False, "reference": reference, "ppl": {}, "plan": None}

    def draw_reference():
        ref = state["reference"]
        summary = layer_summary(ref) if ref is not None else None
        with fig.batch_update():
            for trace, block in zip(fig.data[2:], ("attn", "mlp")):
                trace.y = (summary[summary.block == block].kept_fraction.to_numpy() if summary is not None
                           else [None] * len(rescorer.budget.widths))
        _keep_state(fig)

    def redraw(_=None):
        if state["applying_preset"]:
            return
        try:
            scoring, selection = settings_from_values(_values(c))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _, plan = rescorer.plan(scoring, selection)
        except ValueError as e:  # nothing on display: no chart, no table, no buttons acting on an older plan
            state["plan"] = state["scoring"] = state["selection"] = state["title"] = state["figure_name"] = None
            with fig.batch_update():
                for trace in fig.data[:2]:
                    trace.y = [None] * len(rescorer.budget.widths)
                fig.layout.title.text = "refused: see below"
            _keep_state(fig)
            table.value, result.value = "", ""
            buttons["evaluate"].disabled = buttons["save"].disabled = buttons["pin"].disabled = True
            status.value = f"<b style='color:#d62728'>refused: {e}</b>"
            return
        state["plan"], state["scoring"], state["selection"] = plan, scoring, selection
        state["title"] = settings_title(scoring, selection)
        state["figure_name"] = figure_name(scoring, selection)
        buttons["pin"].disabled = False
        buttons["evaluate"].disabled, buttons["save"].disabled = evaluate is None, save is None
        if c["preset"].value != matching_preset(scoring):  # a manual edit leaves the preset's settings
            state["applying_preset"] = True
            c["preset"].value = matching_preset(scoring)
            state["applying_preset"] = False
        summary = layer_summary(plan)
        with fig.batch_update():
            for trace, block in zip(fig.data, ("attn", "mlp")):
                trace.y = summary[summary.block == block].kept_fraction.to_numpy()
            fig.layout.title.text = state["title"]
        _keep_state(fig)
        table.value = per_layer_table(plan).to_html(border=0, max_rows=None)
        result.value = ""
        status.value = (f"removed {plan.selected_params:,} of {plan.denominator:,} ({plan.achieved_ratio:.2%} of "
                        f"{selection.ratio_of}); "
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

    def shown_errors(fn, needs_plan=True):
        """A button callback whose exception is shown in the panel (a notebook would only log it); one that acts
        on the plan does nothing while no plan is on display."""
        def run(_=None):
            if needs_plan and state["plan"] is None:
                result.value = "<b style='color:#d62728'>no plan on display: the settings are refused</b>"
                return
            try:
                fn()
            except Exception as e:
                result.value = f"<b style='color:#d62728'>{type(e).__name__}: {e}</b>"
        return run

    def pin():
        state["reference"] = state["plan"]
        for trace, block in zip(fig.data[2:], ("attn", "mlp")):
            trace.name = f"{block} (pinned: {state['title']})"
        draw_reference()

    def run_evaluate():
        result.value = "<i>evaluating…</i>"
        plan, title = state["plan"], state["title"]
        value = evaluate(plan)
        state["ppl"][title] = value
        result.value = f"PPL <b>{value:,.2f}</b> ({title})"

    def run_save():
        where = save(state["plan"])
        state["saved"] = where
        result.value = f"saved: {where}"

    def measure_block_loss():
        result.value = "<i>measuring the block-removal loss…</i>"
        rescorer.block_loss = block_loss()
        for name in ("temperature", "use_tau", "tau_over_budget", "tau"):
            c[name].disabled = False
        buttons["block_loss"].layout.display = "none"
        loss_note.value, result.value = "", "block-removal loss measured: T and tau are on"

    c["preset"].observe(apply_preset, names="value")
    for name, w in c.items():
        if name != "preset":
            w.observe(redraw, names="value")
    for name, fn in (("pin", pin), ("evaluate", run_evaluate), ("save", run_save), ("block_loss", measure_block_loss)):
        buttons[name].on_click(shown_errors(fn, needs_plan=name != "block_loss"))
    redraw()
    draw_reference()
    controls = W.VBox([c["preset"], c["method"], c["normalization"], c["level"], c["clip"], c["temperature"],
                       W.HBox([c["use_tau"], c["tau"]]), c["tau_over_budget"], loss_note, buttons["block_loss"],
                       c["ratio"], c["ratio_of"],
                       W.HBox([buttons["pin"], buttons["evaluate"], buttons["save"]], layout=W.Layout(flex_flow="row wrap")),
                       result, status], layout=W.Layout(flex="0 0 360px", min_width="360px"))
    fig_box = W.Box([fig], layout=W.Layout(flex="1 1 480px", min_width="420px"))
    # controls beside the chart from about 800 px of notebook width; below it when narrower (they never squeeze)
    row = W.HBox([controls, fig_box], layout=W.Layout(flex_flow="row wrap", width="100%"))
    box = W.VBox([row, W.Accordion(children=[table], titles=("per-layer plan",))])
    box.controls, box.buttons, box.status, box.result, box.table, box.figure = c, buttons, status, result, table, fig
    box.loss_note = loss_note
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


def _keep_state(fig) -> None:
    """Make the figure widget's synced state what it shows now. plotly's FigureWidget syncs its traces and
    layout as of construction and sends later changes as one-off messages, so a reloaded browser tab (which
    renders from the synced state) showed the empty chart it started with; this writes the current figure
    back into that state (tested in tests/analysis/test_diagnosis.py)."""
    fig._widget_layout = deepcopy(fig._layout_obj._props)
    fig._widget_data = deepcopy(fig._data)


def _values(c: dict) -> dict:
    return {k: w.value for k, w in c.items()}
