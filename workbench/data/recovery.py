"""Training examples for recovery: windows of a text source's calibration part, or Alpaca-style instructions.

Plain text never comes from a source's evaluation part. Instruction data (`alpaca` from the hub, or a local
JSON / JSON Lines file of {instruction, input, output}) is formatted with the Alpaca prompt; the prompt
tokens are masked from the loss unless asked otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.core.paths import data_cache
from workbench.data.text import token_stream

ALPACA = "yahma/alpaca-cleaned"  # hub dataset used for `data="alpaca"`
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{paired}. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


@dataclass
class TrainData:
    """Fixed-length examples: token ids, labels (-100 = not learned) and attention mask."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    source: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, idx: torch.Tensor) -> TrainData:
        return TrainData(self.input_ids[idx], self.labels[idx], self.attention_mask[idx], self.source)

    def split(self, val_fraction: float, seed: int) -> tuple[TrainData, TrainData]:
        """A seeded hold-out for the evaluation loss (the rest is trained on)."""
        n_val = max(1, int(round(len(self) * val_fraction)))
        if len(self) - n_val < 1:
            raise ValueError(f"{len(self)} examples are too few to hold out {n_val} for validation")
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return self.subset(perm[n_val:].sort().values), self.subset(perm[:n_val].sort().values)


def text_examples(tokenizer, source: str, seq_len: int) -> TrainData:
    """Consecutive windows of the calibration part of a text source (never its evaluation part)."""
    tokens = token_stream(tokenizer, source, "calibration")
    n = tokens.numel() // seq_len
    if n < 2:
        raise ValueError(f"the calibration part of {source!r} has {tokens.numel()} tokens: fewer than two windows "
                         f"of seq_len={seq_len}")
    ids = tokens[: n * seq_len].view(n, seq_len).clone()
    return TrainData(ids, ids.clone(), torch.ones_like(ids), source=f"{source}:calibration")


def load_instructions(source: str) -> list[dict]:
    """Alpaca-style records from the hub (`alpaca`) or a local .json / .jsonl file."""
    from datasets import load_dataset  # deferred: datasets loads in seconds

    if source == "alpaca":
        ds = load_dataset(ALPACA, split="train", cache_dir=str(data_cache("datasets")))
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"instruction file {path} does not exist")
        ds = load_dataset("json", data_files=str(path), split="train", cache_dir=str(data_cache("datasets")))
    missing = {"instruction", "output"} - set(ds.column_names)
    if missing:
        raise ValueError(f"instruction data {source!r} lacks fields {sorted(missing)}; it has {ds.column_names}")
    return [dict(r) for r in ds]


def format_prompt(record: dict) -> str:
    inp = (record.get("input") or "").strip()
    return ALPACA_PROMPT.format(paired=", paired with an input that provides further context" if inp else "",
                                instruction=record["instruction"].strip(),
                                input_block=f"### Input:\n{inp}\n\n" if inp else "")


def instruction_examples(tokenizer, records: list[dict], seq_len: int, train_on_inputs: bool,
                         source: str = "") -> TrainData:
    """Prompt + response + EOS per example, truncated to seq_len and right-padded; prompt masked unless asked."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, labels, masks = [], [], []
    for r in records:
        prompt = tokenizer(format_prompt(r), add_special_tokens=False)["input_ids"]
        answer = tokenizer(r["output"].strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seq = (prompt + answer)[:seq_len]
        lab = (seq if train_on_inputs else [-100] * len(prompt) + answer)[:seq_len]
        if all(t == -100 for t in lab[1:]):
            continue  # the prompt alone fills the window: nothing to learn
        n = len(seq)
        ids.append(seq + [pad] * (seq_len - n))
        labels.append(lab + [-100] * (seq_len - n))
        masks.append([1] * n + [0] * (seq_len - n))
    if len(ids) < 2:
        raise ValueError(f"only {len(ids)} instruction example(s) fit seq_len={seq_len}; need at least 2")
    t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return TrainData(t(ids), t(labels), t(masks), source=source)
