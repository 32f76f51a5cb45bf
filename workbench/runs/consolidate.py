"""A sweep's runs as one table, the best configurations, method comparisons and correlations.

`consolidate(sweep_dir)` reads every `runs/<key>/` (its resolved `run.yaml`, `status.json` and, when complete,
`evaluation/perplexity.json` and `analysis/gradient_diagnosis.json`) into one row per run and writes
`consolidated.csv` and `consolidated.parquet`. `best(sweep_dir)` writes, per model and ratio, `global_best_config.json`,
`method_comparison.json` and a link `run` to the best run's directory (under `best/<model>_<ratio>/`),
`cross_model_comparison.json`, `correlations.csv`
(Pearson and Spearman with n and p-values, computed from the table) and `report.txt`.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pandas as pd

from workbench.core.experiments import jsonable
from workbench.core.paths import write_atomic
from workbench.core.registry import check_choice
from workbench.runs.config import ConfigError, RunConfig, from_dict, read_yaml
from workbench.runs.sweep import DIRECTIONS, RUN_FILE, run_status

# The pairs the GAQ-Aware-Prune study reports (gradient scale vs accuracy, extreme layers vs accuracy), and PPL.
CORRELATION_PAIRS = (
    ("ppl", "acc_mean"), ("grad_mean_ratio", "acc_mean"), ("grad_norm_ratio", "acc_mean"),
    ("extreme_pruning_layers", "acc_mean"), ("grad_mean_ratio", "ppl"), ("grad_norm_ratio", "ppl"),
    ("extreme_pruning_layers", "ppl"),
)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, dict)) else v
    return out


def run_row(run_dir: str | os.PathLike) -> dict:
    """One run directory as one flat row (settings as `cfg.<dotted key>`, results as plain columns)."""
    run_dir = Path(run_dir)
    status = run_status(run_dir) or dict(status="incomplete")
    row = dict(output_dir=str(run_dir), key=run_dir.name, status=status["status"], error=status.get("error"),
               wall_seconds=status.get("seconds"), host=status.get("host"),
               **{f"version.{k}": v for k, v in status.get("versions", {}).items()})
    cfg = read_yaml(run_dir / RUN_FILE) if (run_dir / RUN_FILE).is_file() else {}
    row.update({f"cfg.{k}": v for k, v in _flatten(cfg).items()})
    row["model"] = cfg.get("model", {}).get("name")
    row["method"] = method_label(cfg)
    row["ratio"] = cfg.get("selection", {}).get("ratio")
    if row["status"] != "complete":
        return row
    rec = json.loads((run_dir / "evaluation" / "perplexity.json").read_text())
    diag = json.loads((run_dir / "analysis" / "gradient_diagnosis.json").read_text())
    report = rec["report"]
    row.update(ppl_dense=rec["dense"]["ppl"], ppl=rec["pruned"]["ppl"], ppl_source=rec["pruned"]["source"],
               params_count=report["params_after"], params_before=report["params_before"],
               pruning_ratio_total=report["ratio_total"], pruning_ratio_prunable=report["ratio_prunable"],
               grad_mean_ratio=diag["mean_ratio"], grad_norm_ratio=diag["norm_ratio"],
               extreme_pruning_layers=diag["n_extreme"], emptied_blocks=len(report["emptied_blocks"]),
               removed_layers=len(report["removed_layers"]), reload_max_abs_diff=rec.get("reload_max_abs_diff"),
               importance_seconds=rec.get("importance_seconds"))
    if "finetuned" in rec:
        row["ppl_finetuned"] = rec["finetuned"]["ppl"]
    for source, r in rec.get("extra_sources", {}).items():
        row[f"ppl_dense_{source}"], row[f"ppl_final_{source}"] = r["dense"]["ppl"], r["final"]["ppl"]
        if "pruned" in r:  # records written before the pruned model was measured on other texts have only "final"
            row[f"ppl_pruned_{source}"] = r["pruned"]["ppl"]
    if "zero_shot" in rec:
        zs = rec["zero_shot"]
        row.update(acc_mean=zs["mean_acc"], acc_norm_mean=zs["mean_acc_norm"])
        for task, t in zs["tasks"].items():
            row[f"acc_{task}"], row[f"acc_norm_{task}"] = t["acc"], t["acc_norm"]
    for k, v in rec.get("efficiency", {}).items():
        if not k.startswith("cfg_"):
            row[f"eff_{k}"] = v
    return row


def method_label(cfg: dict) -> str | None:
    """How a run chose its plan, as every plan is labelled (`PlanProvenance.label`: "taylor",
    "taylor (minmax/block)", "flap", "layerwise:inverse", ...); None for a file that is not a run config."""
    if not cfg:
        return None
    try:
        return from_dict(RunConfig, cfg).label
    except (ConfigError, ValueError, TypeError):
        return None


def consolidate(sweep_dir: str | os.PathLike) -> pd.DataFrame:
    """Every run of a sweep as one table, written as `consolidated.csv` and `.parquet` beside the runs."""
    sweep_dir = Path(sweep_dir)
    runs = sweep_dir / "runs"
    if not runs.is_dir():
        raise FileNotFoundError(f"{sweep_dir} has no runs/ folder; is it a sweep directory (workbench sweep ...)?")
    dirs = sorted(p for p in runs.iterdir() if p.is_dir() and not p.name.startswith("."))
    table = pd.DataFrame([run_row(d) for d in dirs])
    if table.empty:
        table = pd.DataFrame(columns=["output_dir", "key", "status"])
    write_atomic(sweep_dir / "consolidated.csv", table.to_csv(index=False))
    write_atomic(sweep_dir / "consolidated.parquet",
                 table.astype({c: str for c in table.columns if table[c].dtype == object}).to_parquet(index=False))
    return table


def correlations(table: pd.DataFrame, pairs=CORRELATION_PAIRS) -> pd.DataFrame:
    """Pearson and Spearman correlation of each pair over the complete runs that have both values, with n and
    two-sided p-values (scipy.stats); pairs with fewer than 3 such runs or a constant column are left out."""
    from scipy import stats  # deferred: only consolidation needs it

    rows = []
    done = table[table.status == "complete"] if "status" in table else table
    for x, y in pairs:
        if x not in done or y not in done:
            continue
        both = done[[x, y]].apply(pd.to_numeric, errors="coerce").dropna()
        if len(both) < 3 or both[x].nunique() < 2 or both[y].nunique() < 2:
            continue
        p = stats.pearsonr(both[x], both[y])
        s = stats.spearmanr(both[x], both[y])
        rows.append(dict(x=x, y=y, n=len(both), pearson_r=float(p.statistic), pearson_p=float(p.pvalue),
                         spearman_rho=float(s.statistic), spearman_p=float(s.pvalue)))
    return pd.DataFrame(rows, columns=["x", "y", "n", "pearson_r", "pearson_p", "spearman_rho", "spearman_p"])


def _safe(name) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("_") or "model"


def _record(row: pd.Series) -> dict:
    return jsonable({k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))})


def _link(link: Path, target: Path) -> None:
    """`link` -> `target` as a relative symbolic link (replacing an earlier link, never a real folder)."""
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        raise FileExistsError(f"{link} exists and is not a link; it is left alone")
    link.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)


def sweep_objective(sweep_dir: str | os.PathLike) -> tuple[str, str]:
    """The objective and direction the sweep file in `sweep_dir` names (ppl, minimize when it names none)."""
    path = Path(sweep_dir) / "sweep.yaml"
    data = read_yaml(path) if path.is_file() else {}
    return data.get("objective") or "ppl", data.get("direction") or "minimize"


def best(sweep_dir: str | os.PathLike, objective: str | None = None, direction: str | None = None,
         table: pd.DataFrame | None = None) -> dict:
    """Best configurations and comparisons of a consolidated sweep, written beside it; returns what it wrote.
    `objective` / `direction` default to the sweep file's own."""
    sweep_dir = Path(sweep_dir)
    file_objective, file_direction = sweep_objective(sweep_dir)
    objective, direction = objective or file_objective, direction or file_direction
    check_choice("direction", direction, DIRECTIONS)
    table = consolidate(sweep_dir) if table is None else table
    done = table[table.status == "complete"].copy() if len(table) else table
    if objective not in done.columns:
        raise ValueError(f"objective {objective!r} is not a column of the consolidated table; numeric columns: "
                         f"{[c for c in done.columns if pd.api.types.is_numeric_dtype(done[c])]}")
    done[objective] = pd.to_numeric(done[objective], errors="coerce")
    done = done.dropna(subset=[objective])
    ascending = direction == "minimize"
    out: dict = dict(objective=objective, direction=direction, models={})
    lines = [f"sweep {sweep_dir}: {len(table)} runs, {int((table.status == 'complete').sum())} complete, "
             f"{int((table.status == 'failed').sum())} failed; objective {objective} ({direction})"]
    cross = {}
    for (model, ratio), part in done.groupby(["model", "ratio"], sort=True):
        part = part.sort_values(objective, ascending=ascending)
        top = part.iloc[0]
        folder = sweep_dir / "best" / f"{_safe(model)}_{ratio:g}"
        methods = {}
        for method, m in part.groupby("method", sort=True):
            m = m.sort_values(objective, ascending=ascending)
            methods[method] = dict(count=len(m), mean=float(m[objective].mean()),
                                   std=float(m[objective].std(ddof=1)) if len(m) > 1 else None,
                                   best=_record(m.iloc[0]))
        write_atomic(folder / "global_best_config.json", json.dumps(_record(top), indent=2))
        write_atomic(folder / "method_comparison.json", json.dumps(methods, indent=2))
        _link(folder / "run", Path(top["output_dir"]))
        cross.setdefault(str(model), {})[f"{ratio:g}"] = {
            meth: dict(best=v["best"][objective], mean=v["mean"], count=v["count"]) for meth, v in methods.items()}
        out["models"][f"{model}_{ratio:g}"] = dict(best=top["key"], value=float(top[objective]), folder=str(folder))
        lines.append(f"\n{model}, ratio {ratio:g}: best {objective} {top[objective]:.4g} by {top['method']} "
                     f"(run {top['key']})")
        lines += [f"  {meth:<28} n={v['count']:<3} best {v['best'][objective]:.4g}  mean {v['mean']:.4g}"
                  for meth, v in methods.items()]
    write_atomic(sweep_dir / "cross_model_comparison.json", json.dumps(cross, indent=2))
    corr = correlations(table)
    write_atomic(sweep_dir / "correlations.csv", corr.to_csv(index=False))
    if len(corr):
        lines.append("\ncorrelations (complete runs):")
        lines += [f"  {r.x} vs {r.y}: r={r.pearson_r:.3f} (p={r.pearson_p:.3g}), rho={r.spearman_rho:.3f}, n={r.n}"
                  for r in corr.itertuples()]
    write_atomic(sweep_dir / "report.txt", "\n".join(lines) + "\n")
    out["report"] = "\n".join(lines)
    return out
