"""The model card of a saved pruned checkpoint (`README.md`, the Hugging Face Hub's format: YAML metadata, then
text): what it was pruned from, how (the plan's provenance), what was removed, what was measured, how to load it.

>>> card = model_card("llama", {"params_before": 100, "params_after": 80}, plan_label="global taylor",
...                   base={"name": "org/base"}, results={"dense": {"ppl": 20.0}, "pruned": {"ppl": 25.0}})
>>> card.splitlines()[1], "| pruned | 25.00 |" in card
('library_name: transformers', True)
"""
from __future__ import annotations

import json
from typing import Any

CARD_FILE = "README.md"


def _yaml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def model_card(family: str, report: dict[str, Any] | None, *, plan_label: str | None = None,
               plan_provenance: dict[str, Any] | None = None, base: dict[str, Any] | None = None,
               results: dict[str, Any] | None = None, figure: str | None = None, self_contained: bool = True) -> str:
    """The card's text. `report`: `PruneReport.to_dict()` (parameters before/after, emptied blocks, removed layers);
    `base`: {"name", "fingerprint"} of the dense model; `results`: {"dense"|"pruned"|...: {"ppl", "source",
    "windows", "seq_len"}, ...}; `figure`: a file in the folder (the kept fraction per layer)."""
    base = base or {}
    meta = ["---", "library_name: transformers", "pipeline_tag: text-generation",
            f"tags: {_yaml_list(['prune-workbench', 'structured-pruning', 'gqa-pruning', family])}"]
    name = str(base.get("name") or "")
    if name and "/" in name and not name.startswith((".", "/")):  # a hub id
        meta.append(f"base_model: {json.dumps(name)}")
    meta.append("---")
    lines = [*meta, "", f"# {name.rsplit('/', 1)[-1] or family} pruned by prune-workbench", ""]
    lines.append("GQA-aware structured pruning: whole KV-head groups (one KV head with its query heads) and MLP "
                 "channels removed; layers whose attention and MLP were both emptied are removed.")
    lines += ["", "## How it was pruned", ""]
    if plan_label:
        lines.append(f"- method: {plan_label}")
    if base:
        lines.append(f"- base model: `{name or 'unknown'}`" + (f" (content fingerprint `{base['fingerprint']}`)"
                                                                if base.get("fingerprint") else ""))
    if report:
        before, after = report["params_before"], report["params_after"]
        lines.append(f"- parameters: {before:,} → {after:,} ({1 - after / before:.2%} removed)")
        if report.get("emptied_blocks"):
            lines.append(f"- emptied blocks (layer, block): {report['emptied_blocks']}")
        if report.get("removed_layers"):
            lines.append(f"- removed layers: {report['removed_layers']}")
    if plan_provenance:
        lines += ["", "<details><summary>the plan's provenance</summary>", "", "```json",
                  json.dumps(plan_provenance, indent=1, default=str), "```", "", "</details>"]
    if results:
        lines += ["", "## Measured", "", "| model | perplexity | source | windows × tokens |", "|---|---|---|---|"]
        for label, r in results.items():
            if isinstance(r, dict) and "ppl" in r:
                lines.append(f"| {label} | {r['ppl']:.2f} | {r.get('source', '')} | "
                             f"{r.get('windows', '')} × {r.get('seq_len', '')} |")
    if figure:
        lines += ["", f"![kept fraction per layer]({figure})"]
    lines += ["", "## How to load", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "model = AutoModelForCausalLM.from_pretrained(\"PATH_OR_HUB_ID\""
              + (", trust_remote_code=True)" if self_contained else ")"),
              "tokenizer = AutoTokenizer.from_pretrained(\"PATH_OR_HUB_ID\")", "```", ""]
    if self_contained:
        lines.append("Each layer has its own widths (transformers' `per_layer_config`); `modeling_pruned.py` in this "
                     "folder builds them on top of transformers' own classes (transformers ≥ 5.23).")
    return "\n".join(lines) + "\n"
