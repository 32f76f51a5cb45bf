"""The lab stage."""
from workbench.lab.notebook import load
from workbench.lab.widgets import (
    CUSTOM,
    RATIO_MAX,
    TAU_RANGE,
    figure_name,
    matching_preset,
    panel,
    per_layer_table,
    settings_from_values,
    settings_title,
)

__all__ = [
    "load",
    "settings_from_values",
    "settings_title",
    "matching_preset",
    "CUSTOM",
    "RATIO_MAX",
    "TAU_RANGE",
    "figure_name",
    "panel",
    "per_layer_table",
]
