"""Recovery after pruning: LoRA (peft) or full fine-tuning, resumable, on pruned models of any shape.

Training examples are built by `workbench.data.recovery`.

LoRA adapters are attached by peft to every linear of attention and MLP (names from the family's
`ArchSpec`, so layers of different widths each get adapters of their own shapes), trained, then merged
into the weights: the result is a plain (pruned) model that `surgery.save_pruned` writes in the one
checkpoint format. Training data is plain text (a `workbench.data.text` source, its calibration part only;
never the evaluation part) or Alpaca-style instruction data (`alpaca` from the hub, or a local JSON /
JSON Lines file of {instruction, input, output}).

A run writes `state.pt` into its checkpoint folder every `save_every` steps and when it stops; calling
`finetune` again with the same settings continues from there, bit for bit.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from workbench.core.arch import get_spec
from workbench.core.cache import model_fingerprint, tensor_fingerprint
from workbench.core.loss import summed_nll
from workbench.core.paths import torch_save_atomic
from workbench.core.registry import check_choice
from workbench.data.recovery import TrainData, instruction_examples, load_instructions, text_examples
from workbench.data.text import OFFLINE_SOURCE

FINETUNE_METHODS = ("lora", "full")
SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")
STATE_FILE = "state.pt"


@dataclass(frozen=True)
class FinetuneConfig:
    """A recovery run.

    Args:
        method: "lora" (peft adapters, merged at the end) or "full" (every parameter trains).
        data: a text source (its calibration part), "alpaca", or a .json / .jsonl file of instructions.
        seq_len: tokens per example.
        train_on_inputs: instruction data: also learn the prompt tokens.
        max_steps: optimizer steps.
        batch_size: examples per micro-batch.
        grad_accum: micro-batches per optimizer step.
        lr, weight_decay: AdamW's learning rate and weight decay.
        schedule: transformers' learning-rate schedule (`SCHEDULES`).
        warmup_steps: linear warm-up steps, in [0, max_steps).
        max_grad_norm: gradient clipping norm (None: no clipping).
        val_fraction: share of the examples held out for the evaluation loss.
        eval_every: steps between evaluation losses.
        save_every: steps between resumable states.
        seed: seeds the hold-out, the batch order and the adapters' initialisation.
        lora_r, lora_alpha, lora_dropout: LoRA's rank, scaling and dropout.
        target_modules: module names that get adapters (None: q, k, v, o, gate, up, down of the family).
    """

    method: str = "lora"
    data: str = OFFLINE_SOURCE  # text source (calibration part) | "alpaca" | path to .json/.jsonl instructions
    seq_len: int = 256
    train_on_inputs: bool = False  # instruction data: also learn the prompt tokens
    max_steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 10
    max_grad_norm: float | None = 1.0
    val_fraction: float = 0.05  # of the training examples, held out for the evaluation loss
    eval_every: int = 20
    save_every: int = 50
    seed: int = 0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None  # None: q, k, v, o, gate, up, down of the family

    def __post_init__(self):
        check_choice("method", self.method, FINETUNE_METHODS)
        check_choice("schedule", self.schedule, SCHEDULES)
        for name in ("seq_len", "max_steps", "batch_size", "grad_accum", "eval_every", "save_every", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.seq_len < 2:
            raise ValueError(f"seq_len={self.seq_len} must be at least 2")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.warmup_steps < 0 or self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be in [0, max_steps={self.max_steps})")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm} must be > 0 or None (no clipping)")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction} must be in (0, 1)")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout={self.lora_dropout} must be in [0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)


def training_data(tokenizer, cfg: FinetuneConfig) -> TrainData:
    if cfg.data == "alpaca" or cfg.data.endswith((".json", ".jsonl")):
        return instruction_examples(tokenizer, load_instructions(cfg.data), cfg.seq_len, cfg.train_on_inputs, cfg.data)
    return text_examples(tokenizer, cfg.data, cfg.seq_len)


# ----------------------------------------------------------------------------------------------
# Training


@dataclass
class FinetuneResult:
    model: nn.Module  # merged (LoRA) or trained (full) model; still wrapped by peft while `completed` is False
    history: pd.DataFrame  # per optimizer step: step, loss, lr, grad_norm, tokens
    evals: pd.DataFrame  # step, eval_loss on the held-out examples
    completed: bool
    steps: int
    trainable_params: int
    seconds: float
    config: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return dict(completed=self.completed, steps=self.steps, trainable_params=self.trainable_params,
                    seconds=round(self.seconds, 2), first_loss=_first(self.history, "loss"),
                    last_loss=_last(self.history, "loss"), first_eval_loss=_first(self.evals, "eval_loss"),
                    last_eval_loss=_last(self.evals, "eval_loss"), config=self.config)


def _first(df, col):
    return float(df[col].iloc[0]) if len(df) else None


def _last(df, col):
    return float(df[col].iloc[-1]) if len(df) else None


def lora_targets(model: nn.Module, cfg: FinetuneConfig) -> list[str]:
    if cfg.target_modules is not None:
        return list(cfg.target_modules)
    s = get_spec(model)
    return [s.q, s.k, s.v, s.o, s.gate, s.up, s.down]


def _batch_indices(step: int, micro: int, cfg: FinetuneConfig, n: int, perms: dict) -> torch.Tensor:
    """Examples of one micro-batch: epochs of seeded permutations, a pure function of (step, micro)."""
    start = (step * cfg.grad_accum + micro) * cfg.batch_size
    out = []
    for p in range(start, start + cfg.batch_size):
        epoch = p // n
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        out.append(int(perms[epoch][p % n]))
    return torch.tensor(out)


def eval_loss(model: nn.Module, data: TrainData, batch_size: int) -> float:
    """Mean loss per learned token over `data` (the one loss loop, `core.loss`)."""
    batches = ({"input_ids": b.input_ids, "attention_mask": b.attention_mask, "labels": b.labels}
               for b in (data.subset(torch.arange(s, min(s + batch_size, len(data))))
                         for s in range(0, len(data), batch_size)))
    total, count = summed_nll(model, batches)
    return total / max(count, 1)


def finetune(model: nn.Module, tokenizer, cfg: FinetuneConfig, checkpoint_dir: str | os.PathLike, *,
             data: TrainData | None = None, resume: bool = True, stop_after: int | None = None,
             progress: bool = True, log=print) -> FinetuneResult:
    """Train `model` (mutated in place) for `cfg.max_steps` optimizer steps; merge LoRA when done.

    `checkpoint_dir` holds the resumable state. `stop_after=k` stops once k steps are done in total
    (the state is saved; a later call resumes). `data` overrides `cfg.data` (e.g. a prepared TrainData).
    """
    from transformers import get_scheduler  # deferred: transformers loads in seconds

    checkpoint_dir = Path(checkpoint_dir)
    state_path = checkpoint_dir / STATE_FILE
    if hasattr(model, "peft_config") and hasattr(model, "unload"):
        # a stopped LoRA run returns the peft-wrapped model: continue from its base weights
        model = model.unload()  # type: ignore[operator]  # an HF model's dynamic attributes
    torch.manual_seed(cfg.seed)
    data = data if data is not None else training_data(tokenizer, cfg)
    train, val = data.split(cfg.val_fraction, cfg.seed)
    device = next(model.parameters()).device
    identity = dict(model=model_fingerprint(model), data=_data_fingerprint(data))
    state = None
    if resume and state_path.exists():  # every check before the model is touched
        state = _read_state(state_path)
        _check_same_config(state["config"], cfg)
        _check_same_run(state, identity, state_path)
        identity = dict(state["identity"])  # the run keeps the model and data it started from

    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model  # deferred: peft is needed only for LoRA

        peft_cfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              target_modules=lora_targets(model, cfg), bias="none", task_type="CAUSAL_LM")
        net = get_peft_model(model, peft_cfg)
    else:
        net = model  # type: ignore[assignment]  # an HF model's dynamic attributes
        for p in net.parameters():
            p.requires_grad_(True)
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    trainable = [p for _, p in named]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.schedule, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=cfg.max_steps)
    history, evals, step = [], [], 0
    if state is not None:
        params = dict(named)
        with torch.no_grad():
            for name, value in state["trainable"].items():
                params[name].copy_(value.to(params[name].device))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if torch.cuda.is_available() and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        history, evals, step = state["history"], state["evals"], state["step"]
        log(f"resumed from {state_path} at step {step}")

    def save():
        torch_save_atomic(dict(
            step=step, config=cfg.to_dict(), history=history, evals=evals, identity=identity,
            model_now=model_fingerprint(model) if cfg.method == "full" else identity["model"],
            trainable={n: p.detach().cpu().clone() for n, p in named}, optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(), torch_rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None), state_path)

    if step == 0 and not evals:  # the held-out loss before any update, as the curve's starting point
        evals.append(dict(step=0, eval_loss=eval_loss(net, val, cfg.batch_size)))
    end = cfg.max_steps if stop_after is None else min(cfg.max_steps, stop_after)
    perms: dict = {}
    t0 = time.perf_counter()
    net.train()
    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"{cfg.method} fine-tuning", disable=not progress)
    try:
        while step < end:
            losses, tokens = [], 0
            for micro in range(cfg.grad_accum):
                b = train.subset(_batch_indices(step, micro, cfg, len(train), perms))
                out = net(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device),
                          labels=b.labels.to(device))
                if not torch.isfinite(out.loss):
                    raise FloatingPointError(f"loss is {out.loss.item()} at step {step + 1}; lower lr={cfg.lr}")
                (out.loss / cfg.grad_accum).backward()
                losses.append(float(out.loss.detach()))
                tokens += int((b.labels[:, 1:] != -100).sum())
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm or math.inf)
            optimizer.step()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            history.append(dict(step=step, loss=sum(losses) / len(losses), lr=lr, grad_norm=float(grad_norm),
                                tokens=tokens))
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                evals.append(dict(step=step, eval_loss=eval_loss(net, val, cfg.batch_size)))
            if step % cfg.save_every == 0:
                save()
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}",
                            **({"eval": f"{evals[-1]['eval_loss']:.3f}"} if evals else {}))
    finally:
        bar.close()
    save()
    completed = step >= cfg.max_steps
    n_trainable = sum(p.numel() for p in trainable)
    if completed:
        if cfg.method == "lora":
            model = net.merge_and_unload()
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
    else:
        model = net
    return FinetuneResult(model=model, history=pd.DataFrame(history), evals=pd.DataFrame(evals), completed=completed,
                          steps=step, trainable_params=n_trainable, seconds=time.perf_counter() - t0,
                          config=dict(cfg.to_dict(), train_examples=len(train), val_examples=len(val),
                                      data_source=data.source))


def _data_fingerprint(data: TrainData) -> str:
    return tensor_fingerprint(torch.cat([data.input_ids, data.labels, data.attention_mask], dim=1))


def _read_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e}); the resumable state is damaged: "
                         "delete it to start over, or pass resume=False / another checkpoint_dir") from e
    if not isinstance(state, dict) or "identity" not in state:
        raise ValueError(f"{path} is not a resumable state of this workbench version (no model/data identity); "
                         "delete it to start over, or pass resume=False / another checkpoint_dir")
    return state


def _check_same_run(state: dict, identity: dict, path: Path) -> None:
    """Resume only the same model (its weights and shapes, or a full run's own stopped weights) on the same data."""
    saved = state["identity"]
    if identity["model"] not in (saved["model"], state.get("model_now")):
        raise ValueError(f"{path} was made for another model (weights or shapes differ); nothing was changed. "
                         "Pass the model that run started from, or resume=False / another checkpoint_dir")
    if identity["data"] != saved["data"]:
        raise ValueError(f"{path} was made with other training data; nothing was changed. Use the same data "
                         "(data= / cfg.data) to resume, or resume=False / another checkpoint_dir")


def _check_same_config(saved: dict, cfg: FinetuneConfig) -> None:
    now = cfg.to_dict()
    diff = {f.name: (saved.get(f.name), now[f.name]) for f in fields(cfg)
            if _norm(saved.get(f.name)) != _norm(now[f.name])}
    if diff:
        raise ValueError(f"the checkpoint was made with other settings {diff} (saved, now); "
                         "use the same settings to resume, or a new checkpoint_dir / resume=False")


def _norm(v):
    return list(v) if isinstance(v, tuple) else v
