"""prune-workbench: GQA-aware global structured pruning of decoder LLMs (see README.md and docs/ARCHITECTURE.md)."""
from workbench.compat import warn_untested_versions

warn_untested_versions()  # once per process, when torch / transformers / peft is outside the tested range
