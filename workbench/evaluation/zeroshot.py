"""Zero-shot evaluation through lm-evaluation-harness, on the model in memory (no save/reload round trip).

Tasks are lm-eval task names (the seven zero-shot tasks of the GAQ-Aware-Prune study, `STUDY_TASKS`,
which need hub access) or local task YAML
files; relative `data_files` in a local YAML are resolved against the YAML's folder, so a task and its
JSON Lines data travel together. The project ships one such task, `pydoc_cloze` (`LOCAL_TASKS`), for
tests and the offline demo.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from workbench.core.models import eval_mode
from workbench.core.paths import data_cache

STUDY_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
TASKS_DIR = Path(__file__).resolve().parents[1] / "tasks"
LOCAL_TASKS = {p.stem: p for p in sorted(TASKS_DIR.glob("*.yaml"))}


@dataclass(frozen=True)
class ZeroShotConfig:
    """Zero-shot evaluation settings.

    Args:
        tasks: lm-eval task names or paths of local task YAML files (`LOCAL_TASKS` names the shipped ones).
        batch_size: lm-eval's batch size for log-likelihood requests.
        limit: examples per task: None for all, a count >= 1, or a fraction in (0, 1).
        num_fewshot: in-context examples per question (0 = zero-shot).
        seed: lm-eval's random, numpy, torch and few-shot seeds.
    """

    tasks: tuple[str, ...] = STUDY_TASKS
    batch_size: int = 8
    limit: int | float | None = None  # per task: a count, or a fraction in (0, 1)
    num_fewshot: int = 0
    seed: int = 0

    def __post_init__(self):
        if not self.tasks:
            raise ValueError("tasks is empty; name lm-eval tasks, e.g. STUDY_TASKS, or local YAML files")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be a positive integer")
        if self.limit is not None and not (self.limit > 0):
            raise ValueError(f"limit={self.limit} must be None, a count >= 1 or a fraction in (0, 1)")
        if self.num_fewshot < 0:
            raise ValueError(f"num_fewshot={self.num_fewshot} must be >= 0")


@dataclass
class ZeroShotResult:
    """Per task acc / acc_norm with their stderr, sample count and version; the means; lm-eval's version."""

    tasks: dict[str, dict]  # task -> {acc, acc_stderr, acc_norm, acc_norm_stderr, samples, version}
    mean_acc: float
    mean_acc_norm: float
    lm_eval_version: str
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self):
        return pd.DataFrame(self.tasks).T[["acc", "acc_norm", "samples", "version"]]


def resolve_task(name: str | os.PathLike) -> str | dict:
    """An lm-eval task name as it is, or a local YAML (path or a `LOCAL_TASKS` name) as a config dict."""
    import yaml  # deferred: needed only for local task files

    path = LOCAL_TASKS.get(str(name)) or (Path(name) if str(name).endswith((".yaml", ".yml")) else None)
    if path is None:
        return str(name)
    if not path.exists():
        raise FileNotFoundError(f"task file {path} does not exist")
    cfg = yaml.safe_load(path.read_text())
    files = cfg.get("dataset_kwargs", {}).get("data_files")
    if isinstance(files, dict):
        resolved = {}
        for split, f in files.items():
            p = Path(f) if Path(f).is_absolute() else path.parent / f
            if not p.exists():
                raise FileNotFoundError(f"task {cfg.get('task')!r}: data file {p} ({split}) does not exist")
            resolved[split] = str(p)
        cfg["dataset_kwargs"] = {**cfg["dataset_kwargs"], "data_files": resolved}
    if cfg.get("dataset_path") in ("json", "csv", "parquet", "text"):  # keep the prepared copy in data_cache

        cfg["dataset_kwargs"] = {"cache_dir": str(data_cache("datasets")), **cfg.get("dataset_kwargs", {})}
    return cfg


def zero_shot(model: nn.Module, tokenizer, cfg: ZeroShotConfig = ZeroShotConfig(), *,
              progress: bool = True) -> ZeroShotResult:
    """Run lm-eval's `simple_evaluate` on the model in memory; acc and acc_norm per task and their means."""
    import lm_eval  # deferred: lm-eval loads in seconds
    from lm_eval.models.huggingface import HFLM  # deferred: lm-eval loads in seconds
    from lm_eval.tasks import TaskManager  # deferred: lm-eval loads in seconds

    specs = [resolve_task(t) for t in cfg.tasks]
    local = [s for s in specs if isinstance(s, dict)]
    # Indexing every built-in task takes seconds; local-only runs skip it.
    manager = TaskManager(include_defaults=len(local) < len(specs), verbosity="ERROR")
    device = next(model.parameters()).device
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size, device=str(device))
    logging.getLogger("lm_eval").setLevel(logging.WARNING if progress else logging.ERROR)
    with eval_mode(model), torch.no_grad():
        out = lm_eval.simple_evaluate(
            model=lm, tasks=specs, num_fewshot=cfg.num_fewshot, limit=cfg.limit, task_manager=manager,
            random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
            fewshot_random_seed=cfg.seed, log_samples=False, verbosity="ERROR",
        )
    tasks = {}
    for name, res in out["results"].items():
        if "acc,none" not in res:
            continue  # groups
        tasks[name] = dict(
            acc=float(res["acc,none"]), acc_stderr=_num(res.get("acc_stderr,none")),
            acc_norm=_num(res.get("acc_norm,none")), acc_norm_stderr=_num(res.get("acc_norm_stderr,none")),
            samples=int(out.get("n-samples", {}).get(name, {}).get("effective", 0)),
            version=out.get("versions", {}).get(name),
        )
    accs = [t["acc"] for t in tasks.values()]
    norms = [t["acc_norm"] for t in tasks.values() if t["acc_norm"] is not None]
    return ZeroShotResult(tasks=tasks, mean_acc=sum(accs) / len(accs) if accs else float("nan"),
                          mean_acc_norm=sum(norms) / len(norms) if norms else float("nan"),
                          lm_eval_version=version("lm-eval"),
                          config=asdict(cfg))


def _num(x) -> float | None:
    try:
        return None if x is None or x == "N/A" else float(x)
    except (TypeError, ValueError):
        return None
