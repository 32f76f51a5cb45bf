"""The deploy stage."""
from workbench.deploy.gguf import GGUF_DTYPES, UNIFORM_ARCH, PER_LAYER_ARCH, ExportError, GGUFLayout, ExportReport, active_sliding_window, gguf_layout, export_gguf, export_models
from workbench.deploy.llamacpp import LlamaCppUnavailable, available, LlamaCppModel, KV_TYPES, load, perplexity, Throughput, throughput, loaded, compare

__all__ = [
    "GGUF_DTYPES",
    "UNIFORM_ARCH",
    "PER_LAYER_ARCH",
    "ExportError",
    "GGUFLayout",
    "ExportReport",
    "active_sliding_window",
    "gguf_layout",
    "export_gguf",
    "export_models",
    "LlamaCppUnavailable",
    "available",
    "LlamaCppModel",
    "KV_TYPES",
    "load",
    "perplexity",
    "Throughput",
    "throughput",
    "loaded",
    "compare",
]
