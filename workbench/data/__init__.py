"""The data stage."""
from workbench.data.text import SPLITS, FISHER_MODES, ACCUMULATIONS, HubSource, HUB_SOURCES, OFFLINE_SOURCE, SOURCES, load_text, token_stream, CalibrationConfig, calibration_samples, held_out_samples, evaluation_windows, fingerprint
from workbench.data.recovery import ALPACA, ALPACA_PROMPT, TrainData, text_examples, load_instructions, format_prompt, instruction_examples

__all__ = [
    "SPLITS",
    "FISHER_MODES",
    "ACCUMULATIONS",
    "HubSource",
    "HUB_SOURCES",
    "OFFLINE_SOURCE",
    "SOURCES",
    "load_text",
    "token_stream",
    "CalibrationConfig",
    "calibration_samples",
    "held_out_samples",
    "evaluation_windows",
    "fingerprint",
    "ALPACA",
    "ALPACA_PROMPT",
    "TrainData",
    "text_examples",
    "load_instructions",
    "format_prompt",
    "instruction_examples",
]
