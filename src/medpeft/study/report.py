"""The report of a study: what its finished cells say, as tables, verdicts and plots.

``write_report(study_dir)`` reads ``study_dir/study.sqlite`` and the finished runs' ``predictions.csv``
and writes ``study_dir/report/``::

    results.csv      one row per cell: coordinates, status, error, val / test mean AUROC, test AUROC per
                     label (test_auroc:LABEL), trainable parameters, time, memory, run directory
    comparison.csv   per (backbone, method): mean trainable %, and per task (dataset x label fraction)
                     the mean, sd and number of seeds of the test mean AUROC in points (x100)
    comparison.tex   the same table as a LaTeX tabular (booktabs), best mean per column in bold
    pairwise.csv     each method against the reference ('full' if the study has it, else its first
                     method), per task: difference of the seed means, a paired bootstrap CI of the
                     seed-averaged difference, DeLong's test per seed
    figures/         PNG and SVG: AUROC vs label fraction, AUROC vs trainable % with the Pareto front,
                     per-label AUROC heatmaps
    report.md        all of the above with the verdicts ("lora beats full in k of n tasks ...")
    report.html      the same, self-contained (figures embedded)

The folder is written whole beside the old one and then takes its place: a report that fails leaves the
previous report as it was. Names and messages are plain text in every document (``medpeft.study.render``).

The bootstrap pairs everything: the two runs of a seed are aligned by test image, every seed uses the
same resamples of the same images, the per-resample differences are averaged over seeds, and the
interval is taken from those averages (``medpeft.metrics.compare.bootstrap_auroc_difference_over_seeds``).
The tables are built in ``medpeft.study.tables``, the figures drawn in ``medpeft.study.figures`` and
the documents rendered by ``medpeft.study.render``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from medpeft.engine import rundir
from medpeft.errors import DataError, RunDirError
from medpeft.files import atomic_directory
from medpeft.metrics.compare import bootstrap_auroc_difference_over_seeds, delong_test
from medpeft.study.figures import write_figures
from medpeft.study.render import Table, html_page, latex, markdown
from medpeft.study.runner import STORE
from medpeft.study.store import Store
from medpeft.study.tables import (
    TASK,
    comparison_frame,
    comparison_table,
    dataset_labels,
    order,
    results_table,
    task_name,
    tasks,
)

REPORT = "report"
ALPHA = 0.05  # the bootstrap interval is 1 - ALPHA; DeLong's test is significant below ALPHA
N_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # one seed for every run: the same resamples of the same test images
PAIRWISE = ["method", "reference", *TASK, "seeds", "reference_seeds", "paired_seeds", "difference", "ci_low",
            "ci_high", "n_labels", "delong_max_p", "delong_labels_significant"]


# ----------------------------------------------------------------------------- reading
def _read_store(study_dir: Path) -> pd.DataFrame:
    path = study_dir / STORE
    if not path.is_file():
        raise RunDirError(f"{path}: no study store here (run medpeft study run first)")
    store = Store(path)
    try:
        frame = store.frame()
    finally:
        store.close()
    if not (frame["status"] == "done").any():
        raise RunDirError(f"{path}: no cell is done yet; nothing to report")
    return frame


def _study_name(study_dir: Path) -> str:
    path = study_dir / "study.yaml"
    data = yaml.safe_load(path.read_text()) if path.is_file() else None
    return str(data["name"]) if isinstance(data, dict) and data.get("name") else study_dir.resolve().name


# ----------------------------------------------------------------------------- pairwise comparisons
def _delong_p(targets: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    try:
        return delong_test(targets, a, b).p_value
    except ValueError:  # fewer than two positives or negatives: no test
        return math.nan


def paired_tests(pairs: list[tuple[str, str]], labels: list[str]) -> dict:
    """Bootstrap CI (points) of the seed-averaged difference a - b and DeLong's test per seed and label.

    `pairs` holds the run directories (a, b) of each seed both methods finished. Every run must hold
    the same test images: each seed then draws the same resamples (one bootstrap seed), and the
    per-resample differences are averaged over seeds before the percentiles are taken
    (`bootstrap_auroc_difference_over_seeds`).
    """
    first_ids, samples, p_values = None, [], []
    for run_a, run_b in pairs:
        ids_a, targets, scores_a = rundir.read_predictions(run_a, "test", labels)
        ids_b, targets_b, scores_b = rundir.read_predictions(run_b, "test", labels)
        first_ids = ids_b if first_ids is None else first_ids
        for ids, run in ((ids_a, run_a), (ids_b, run_b)):
            if not np.array_equal(ids, first_ids):
                raise DataError(f"{run} and {pairs[0][1]}: their test image sets differ ({len(ids)} vs "
                                f"{len(first_ids)} images); the runs of a task must be scored on the same images")
        if not np.array_equal(targets, targets_b, equal_nan=True):
            raise DataError(f"{run_a} and {run_b}: the same test images have different targets")
        samples.append((targets, scores_a, scores_b))
        p_values.append([_delong_p(targets[:, j], scores_a[:, j], scores_b[:, j]) for j in range(len(labels))])
    interval = bootstrap_auroc_difference_over_seeds(samples, n_resamples=N_RESAMPLES, seed=BOOTSTRAP_SEED,
                                                     confidence=1 - ALPHA)
    p_values = np.array(p_values)
    return {"ci_low": 100 * interval.ci_low, "ci_high": 100 * interval.ci_high, "n_labels": len(labels),
            "delong_max_p": p_values.max() if len(labels) == 1 else math.nan,
            "delong_labels_significant": int((p_values < ALPHA).all(axis=0).sum())}


def pairwise_frame(done: pd.DataFrame, methods: list[str], reference: str,
                   labels: dict[str, list[str]]) -> pd.DataFrame:
    """One row per (method, task) where the method and the reference both have a done seed."""
    records = []
    for method in [m for m in methods if m != reference]:
        for task in tasks(done):
            in_task = (done[TASK] == list(task)).all(axis=1)
            a, b = done[in_task & (done["method"] == method)], done[in_task & (done["method"] == reference)]
            if a.empty or b.empty:
                continue
            runs_a, runs_b = dict(zip(a["seed"], a["run_dir"])), dict(zip(b["seed"], b["run_dir"]))
            paired = sorted(set(runs_a) & set(runs_b))
            record = {"method": method, "reference": reference, **dict(zip(TASK, task)),
                      "seeds": len(a), "reference_seeds": len(b), "paired_seeds": len(paired),
                      "difference": 100 * (a["test_mean_auroc"].mean() - b["test_mean_auroc"].mean())}
            if paired:
                record |= paired_tests([(runs_a[s], runs_b[s]) for s in paired], labels[task[1]])
            records.append(record)
    return pd.DataFrame(records, columns=PAIRWISE)


def verdict(method: str, reference: str, differences: pd.Series) -> str:
    """'lora beats full in k of n tasks (mean over seeds), by at most x points; it loses in m, ...'."""
    if differences.empty:
        return f"{method} and {reference} have no task with a done seed of both."
    wins, losses = differences[differences > 0], differences[differences < 0]
    text = f"{method} beats {reference} in {len(wins)} of {len(differences)} tasks (mean over seeds)"
    text += f", by at most {wins.max():.1f} points" if len(wins) else ""
    text += f"; it loses in {len(losses)}"
    return text + (f", by at most {-losses.min():.1f} points." if len(losses) else ".")


def _pairwise_table(rows: pd.DataFrame, multi_backbone: bool) -> Table:
    table = Table(["task", "difference (points)", f"{1 - ALPHA:.0%} CI (points)", "paired seeds",
                   "DeLong"], [])
    for _, row in rows.iterrows():
        paired = row["paired_seeds"] > 0
        ci = f"[{row['ci_low']:.1f}, {row['ci_high']:.1f}]" if paired else "–"
        table.rows.append([task_name(row["dataset"], row["fraction"], row["backbone"] if multi_backbone else None),
                           f"{row['difference']:+.1f}", ci, str(row["paired_seeds"]),
                           _delong_text(row) if paired else "–"])
    return table


def _delong_text(row: pd.Series) -> str:
    significant, k = int(row["delong_labels_significant"]), int(row["n_labels"])
    if k == 1:
        return f"max p = {row['delong_max_p']:.3g}" + (f", p < {ALPHA:g} in every seed" if significant else "")
    return f"{significant} of {k} labels p < {ALPHA:g} in every seed"


# ----------------------------------------------------------------------------- the report
def _document(name: str, results: pd.DataFrame, comparison: Table, pairwise: pd.DataFrame, methods: list[str],
              reference: str, figures: list[tuple[str, Path]]) -> list[tuple]:
    counts = results["status"].value_counts()
    failed = results[results["status"] == "failed"]
    blocks: list[tuple] = [
        ("h1", f"Study report: {name}"),
        ("p", (f"{len(results)} cells: {counts.get('done', 0)} done, {counts.get('failed', 0)} failed, "
               f"{counts.get('pending', 0) + counts.get('running', 0)} pending or running.")),
    ]
    if not failed.empty:
        blocks += [("h2", "Failed cells"), ("list", [f"{k}: {e}" for k, e in zip(failed["key"], failed["error"])])]
    blocks += [("h2", "Test mean AUROC (points, mean ± sd over seeds)"), ("table", comparison),
               ("p", ("Bold: the best mean of each column. trainable %: trainable parameters as a share of the "
                      "backbone's.")),
               ("h2", f"Pairwise comparisons against {reference}"),
               ("p", (f"Difference: mean over seeds of the method minus that of {reference}. CI: paired bootstrap "
                      f"({N_RESAMPLES} resamples of the test images) of the difference averaged over the seeds both "
                      f"finished. DeLong: per seed and label, two-sided."))]
    multi_backbone = results["backbone"].nunique() > 1
    for method in [m for m in methods if m != reference]:
        rows = pairwise[pairwise["method"] == method]
        blocks += [("h3", f"{method} vs {reference}"), ("p", verdict(method, reference, rows["difference"]))]
        if not rows.empty:
            blocks.append(("table", _pairwise_table(rows, multi_backbone)))
    blocks += [("h2", "Figures"), *(("figure", figure) for figure in figures)]
    return blocks


def write_report(study_dir: str | Path) -> Path:
    """Write the study's report into study_dir/report/ (see the module docstring); return report.html."""
    study_dir = Path(study_dir)
    frame = _read_store(study_dir)
    results = results_table(frame, study_dir)
    done = results[(results["status"] == "done") & results["test_mean_auroc"].notna()]
    if done.empty:
        raise RunDirError(f"{study_dir / STORE}: no done cell has a test AUROC; nothing to compare")
    methods, labels = order(frame["method"]), dataset_labels(frame)
    reference = "full" if "full" in methods else methods[0]
    comparison = comparison_frame(done, methods)
    table = comparison_table(comparison)
    pairwise = pairwise_frame(done, methods, reference, labels)
    name = _study_name(study_dir)
    with atomic_directory(study_dir / REPORT) as out:
        for file, text in (("results.csv", results.to_csv(index=False)),
                           ("comparison.csv", comparison.to_csv(index=False)), ("comparison.tex", latex(table)),
                           ("pairwise.csv", pairwise.to_csv(index=False))):
            (out / file).write_text(text, encoding="utf-8")
        (out / "figures").mkdir()
        figures = write_figures(done, methods, labels, out / "figures")
        blocks = _document(name, results, table, pairwise, methods, reference, figures)
        (out / "report.md").write_text(markdown(blocks, out), encoding="utf-8")
        (out / "report.html").write_text(html_page(f"Study report: {name}", blocks), encoding="utf-8")
    return study_dir / REPORT / "report.html"
