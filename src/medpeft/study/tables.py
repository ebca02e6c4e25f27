"""The tables of a study report, from the store's frame of cells (one row per cell).

AUROC in the comparison is in points (x100). Rows and columns keep the study's order: backbones,
datasets and methods in order of first appearance, label fractions ascending.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from medpeft.engine import rundir
from medpeft.study.render import Table
from medpeft.study.runner import TUNE
from medpeft.study.spec import tune_key
from medpeft.train.tune import SUMMARY

TASK = ["backbone", "dataset", "fraction"]


def order(values) -> list:
    """Distinct values in order of first appearance (the study's order)."""
    return list(dict.fromkeys(values))


def dataset_labels(frame: pd.DataFrame) -> dict[str, list[str]]:
    """Each dataset's labels, from its done cells' metrics."""
    labels: dict[str, list[str]] = {}
    for dataset, metrics in zip(frame["dataset"], frame["metrics"]):
        if metrics:
            labels[dataset] = order(labels.get(dataset, []) + metrics["labels"])
    return labels


def _run_dir(study_dir: Path, key: str, stored: str) -> str:
    """The stored run directory, or the study's own runs/KEY when the study was moved."""
    local = study_dir / "runs" / key
    return str(local) if not Path(stored).is_dir() and local.is_dir() else stored


def results_table(frame: pd.DataFrame, study_dir: Path) -> pd.DataFrame:
    """One row per cell with its numbers and per-label test AUROC."""
    all_labels = order(label for labels in dataset_labels(frame).values() for label in labels)
    per_label = [{f"test_auroc:{label}": ((m or {}).get("test") or {}).get("per_label", {}).get(label, {}).get("auroc")
                  for label in all_labels} for m in frame["metrics"]]
    results = frame[["key", *TASK, "method", "seed", "status", "error", "val_mean_auroc", "test_mean_auroc"]]
    results = pd.concat([results.reset_index(drop=True), pd.DataFrame(per_label, columns=[
        f"test_auroc:{label}" for label in all_labels], dtype=float)], axis=1)
    for column in ("trainable", "trainable_percent", "wall_time_s", "peak_memory_mb"):
        results[column] = frame[column].to_numpy()
    results["run_dir"] = [_run_dir(study_dir, k, r) for k, r in zip(frame["key"], frame["run_dir"])]
    return results


def tasks(done: pd.DataFrame) -> list[tuple]:
    """The (backbone, dataset, fraction) of the done cells, in the study's order."""
    backbones, datasets = order(done["backbone"]), order(done["dataset"])
    found = {tuple(t) for t in done[TASK].itertuples(index=False)}
    return sorted(found, key=lambda t: (backbones.index(t[0]), datasets.index(t[1]), t[2]))


def seed_stats(done: pd.DataFrame) -> pd.DataFrame:
    """Mean, sd and n over seeds of the test mean AUROC (points) per backbone, dataset, fraction, method."""
    grouped = done.groupby([*TASK, "method"])["test_mean_auroc"]
    return pd.DataFrame({"mean": 100 * grouped.mean(), "sd": 100 * grouped.std(), "n": grouped.count()})


def task_name(dataset: str, fraction: float, backbone: str | None = None) -> str:
    """'dataset 10%', or 'backbone / dataset 10%'."""
    name = f"{dataset} {100 * fraction:g}%"
    return f"{backbone} / {name}" if backbone else name


def comparison_frame(done: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """Per (backbone, method): mean trainable %, and per (dataset, fraction) column mean, sd, n (points)."""
    stats = seed_stats(done)
    columns = order((t[1], t[2]) for t in tasks(done))
    records = []
    for backbone in order(done["backbone"]):
        for method in [m for m in methods if ((done["backbone"] == backbone) & (done["method"] == m)).any()]:
            rows = done[(done["backbone"] == backbone) & (done["method"] == method)]
            record = {"backbone": backbone, "method": method, "trainable_percent": rows["trainable_percent"].mean()}
            for dataset, fraction in columns:
                key = (backbone, dataset, fraction, method)
                mean, sd, n = stats.loc[key] if key in stats.index else (math.nan, math.nan, 0)
                name = task_name(dataset, fraction)
                record |= {f"{name}:mean": mean, f"{name}:sd": sd, f"{name}:n": int(n)}
            records.append(record)
    return pd.DataFrame(records)


def comparison_table(comparison: pd.DataFrame) -> Table:
    """The comparison frame for display: 'mean ± sd' per column (with n when seeds differ), best in bold."""
    backbones = order(comparison["backbone"])
    names = [c[:-len(":mean")] for c in comparison.columns if c.endswith(":mean")]
    levels = ["backbone", "method"] if len(backbones) > 1 else ["method"]
    titles = names if len(backbones) > 1 else [f"{backbones[0]} / {name}" for name in names]
    counts = {n for name in names for n in comparison[f"{name}:n"] if n > 0}
    table = Table([*levels, "trainable %", *titles], [], row_levels=len(levels))
    for _, row in comparison.iterrows():
        cells = [mean_sd(row[f"{name}:mean"], row[f"{name}:sd"], row[f"{name}:n"], len(counts) > 1) for name in names]
        table.rows.append([*(str(row[level]) for level in levels), f"{row['trainable_percent']:.3g}", *cells])
    offset = len(levels) + 1  # row levels and the trainable % column
    for j, name in enumerate(names):
        best = comparison[f"{name}:mean"].max()
        table.bold |= {(i, offset + j) for i, mean in enumerate(comparison[f"{name}:mean"]) if mean == best}
    return table


def mean_sd(mean: float, sd: float, n: int, show_n: bool, mean_format: str = ".1f", sd_format: str = ".1f") -> str:
    """'mean ± sd' (the mean alone when sd is NaN, '–' when n is 0), with '(n=N)' when `show_n`."""
    if n == 0:
        return "–"
    text = f"{mean:{mean_format}}" if math.isnan(sd) else f"{mean:{mean_format}} ± {sd:{sd_format}}"
    return f"{text} (n={n})" if show_n else text


def tuning_frame(frame: pd.DataFrame, study_dir: Path) -> pd.DataFrame:
    """Per task and method whose search finished (STUDY/tune/TASK/tune.json): the trials that completed and
    were pruned, the default's and the best trial's val mean AUROC and their difference (points), and the
    values of both (JSON)."""
    records = []
    for backbone, dataset, fraction, method in order(frame[[*TASK, "method"]].itertuples(index=False, name=None)):
        path = study_dir / TUNE / tune_key(backbone, dataset, method, fraction) / SUMMARY
        if not path.is_file():
            continue
        summary = rundir.read_json_object(path)
        default, best, states = summary["default"] or {}, summary["best"] or {}, [t["state"] for t in summary["trials"]]
        records.append({"backbone": backbone, "dataset": dataset, "fraction": fraction, "method": method,
                        "complete": states.count("complete"), "pruned": states.count("pruned"),
                        "default_val_auroc": _points(default.get("value")),
                        "tuned_val_auroc": _points(best.get("value")), "difference": _points(summary["difference"]),
                        "default_values": json.dumps(default.get("params")),
                        "tuned_values": json.dumps(best.get("params"))})
    return pd.DataFrame(records, columns=[*TASK, "method", "complete", "pruned", "default_val_auroc", "tuned_val_auroc",
                                          "difference", "default_values", "tuned_values"])


def _points(value: float | None) -> float:
    return math.nan if value is None else 100 * value


def tuning_table(tuning: pd.DataFrame, multi_backbone: bool) -> Table:
    """The tuning frame for display: per task and method, the val AUROC of the default and the tuned values,
    and each tuned value that differs from the default ('key: default -> tuned')."""
    table = Table(["task", "method", "trials (pruned)", "default val AUROC", "tuned val AUROC", "difference",
                   "tuned values"], [], row_levels=2)
    for _, row in tuning.iterrows():
        default, tuned = json.loads(row["default_values"]) or {}, json.loads(row["tuned_values"]) or {}
        changed = [f"{key}: {_value(default.get(key))} -> {_value(value)}" for key, value in tuned.items()
                   if default.get(key) != value]
        table.rows.append([task_name(row["dataset"], row["fraction"], row["backbone"] if multi_backbone else None),
                           row["method"], f"{row['complete'] + row['pruned']} ({row['pruned']})",
                           *(_score(row[c]) for c in ("default_val_auroc", "tuned_val_auroc")),
                           "–" if math.isnan(row["difference"]) else f"{row['difference']:+.1f}",
                           "; ".join(changed) or "the default"])
    return table


def _score(points: float) -> str:
    return "–" if math.isnan(points) else f"{points:.1f}"


def _value(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
