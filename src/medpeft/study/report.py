"""The report of a study: what its finished cells say, as tables, verdicts and plots.

``write_report(study_dir)`` reads ``study_dir/study.sqlite`` and the finished runs' ``predictions.csv``
and writes ``study_dir/report/``::

    results.csv      one row per cell: coordinates, status, error, val / test mean AUROC, test AUROC per
                     label (test_auroc:LABEL), trainable parameters, time, memory, run directory
    comparison.csv   per (backbone, method): mean trainable %, and per task (dataset x label fraction)
                     the mean, sd and number of seeds of the test mean AUROC in points (x100)
    comparison.tex   the same table as a LaTeX tabular (booktabs), best mean per column in bold
    tuning.csv       with the study's ``tune``: per task and method, the searched trials, the val mean AUROC
                     of the default and the tuned values (points) and their difference, and both sets of
                     values (from STUDY/tune/TASK/tune.json; with a .tex table; absent without searches)
    pairwise.csv     each method against the reference ('full' if the study has it, else its first
                     method), per task, on the seeds both finished (compared_seeds; missing_seeds names
                     the others): the seed-averaged difference, its paired bootstrap CI and p-value,
                     the p-value adjusted across the whole table, the verdict (win / loss / no
                     significant difference), the resamples that lost a label, DeLong's test per seed
    calibration.csv  per task and method: test ECE and Brier score, raw and temperature-scaled
    subgroups.csv    per task, method, subgroup column and group: size, test mean AUROC, small or not
    external.csv     per task and method: internal vs external test mean AUROC and the drop
                     (each with a .tex table; see medpeft.study.evidence; absent when no cell has the data)
    figures/         PNG and SVG: AUROC vs label fraction, AUROC vs trainable % with the Pareto front,
                     per-label AUROC heatmaps, reliability diagrams
    report.md        all of the above with the verdicts ("lora beats full in k of n tasks ...")
    report.html      the same, self-contained (figures embedded)

The folder is written whole beside the old one and then takes its place: a report that fails leaves the
previous report as it was. Names and messages are plain text in every document (``medpeft.study.render``).

The bootstrap pairs everything: only the seeds both methods finished are compared, the two runs of a
seed are aligned by test image, every seed uses the same resamples of the same images (stratified by
label unless the study's ``report.stratify`` is false), the per-resample differences are averaged over
seeds, and the difference, its interval and its p-value all come from those same seeds and resamples
(``medpeft.metrics.compare.bootstrap_auroc_difference_over_seeds``). The p-values of the whole pairwise
table are adjusted together (``report.correction``: Holm or Benjamini-Hochberg); a verdict is a win or a
loss when the adjusted p-value is below ``report.alpha``, in the direction of the difference.
A generative study's report (its study file has ``generate``) has its own tables, verdicts and figure
(``medpeft.study.generative``). The tables are built in ``medpeft.study.tables``, the figures drawn in
``medpeft.study.figures`` and the documents rendered by ``medpeft.study.render``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from medpeft.config import read_yaml_mapping
from medpeft.engine import rundir
from medpeft.errors import DataError, RunDirError
from medpeft.files import atomic_directory
from medpeft.metrics.compare import bootstrap_auroc_difference_over_seeds, delong_test
from medpeft.metrics.multiple import METHODS, adjust_p_values
from medpeft.study import generative
from medpeft.study.evidence import SECTIONS
from medpeft.study.figures import write_figures, write_reliability_figures
from medpeft.study.render import Table, html_page, latex, markdown
from medpeft.study.runner import STORE
from medpeft.study.spec import ReportOptions, report_options
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
    tuning_frame,
    tuning_table,
)

REPORT = "report"
N_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # one seed for every run: the same resamples of the same test images
PAIRWISE = ["method", "reference", *TASK, "compared_seeds", "missing_seeds", "difference", "ci_low", "ci_high",
            "p_value", "p_adjusted", "verdict", "n_label_lost", "n_labels", "delong_max_p", "delong_favour_method",
            "delong_favour_reference", "delong_opposite"]
NO_DIFFERENCE = "no significant difference"
NOT_COMPARED = "not compared"  # the verdict of a task without a seed both methods finished


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


def _study_file(study_dir: Path) -> tuple[str, ReportOptions, dict | None]:
    """The study's name, report options and ``generate`` section (None: not generative), from the study file
    as last run (study.yaml)."""
    path = study_dir / "study.yaml"
    data = read_yaml_mapping(path, "study file", "a mapping") if path.is_file() else {}
    return str(data.get("name") or study_dir.resolve().name), report_options(path, data), data.get("generate")


# ----------------------------------------------------------------------------- pairwise comparisons
def _delong(targets: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """DeLong's (difference a - b, p-value); NaN for both without two positives and two negatives."""
    try:
        result = delong_test(targets, a, b)
    except ValueError:
        return math.nan, math.nan
    return result.difference, result.p_value


def paired_tests(pairs: list[tuple[str, str]], labels: list[str], options: ReportOptions) -> dict:
    """Difference a - b of the seed-averaged test mean AUROC (points), its paired bootstrap CI and p-value,
    and DeLong's test per seed and label with the direction of each significant result.

    `pairs` holds the run directories (a, b) of each seed both methods finished: the difference, the
    interval and the p-value all come from these seeds. Every run must hold the same test images: each
    seed then draws the same resamples (one bootstrap seed), and the per-resample differences are averaged
    over seeds (`bootstrap_auroc_difference_over_seeds`). A label favours a (b) in DeLong's test when every
    seed has p < alpha with a (b) ahead; it is 'opposite' when significant seeds disagree in direction.
    """
    first_ids, samples, delong = None, [], []
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
        delong.append([_delong(targets[:, j], scores_a[:, j], scores_b[:, j]) for j in range(len(labels))])
    interval = bootstrap_auroc_difference_over_seeds(samples, n_resamples=N_RESAMPLES, seed=BOOTSTRAP_SEED,
                                                     confidence=1 - options.alpha, stratify=options.stratify)
    difference, p_values = np.moveaxis(np.array(delong), 2, 0)  # each (seeds, labels)
    ahead, behind = (p_values < options.alpha) & (difference > 0), (p_values < options.alpha) & (difference < 0)
    return {"difference": 100 * interval.estimate, "ci_low": 100 * interval.ci_low,
            "ci_high": 100 * interval.ci_high, "p_value": interval.p_value, "n_label_lost": interval.n_label_lost,
            "n_labels": len(labels), "delong_max_p": p_values.max() if len(labels) == 1 else math.nan,
            "delong_favour_method": int(ahead.all(axis=0).sum()),
            "delong_favour_reference": int(behind.all(axis=0).sum()),
            "delong_opposite": int((ahead.any(axis=0) & behind.any(axis=0)).sum())}


def _seeds(seeds: list[int]) -> str:
    return ", ".join(map(str, seeds))


def _missing(method: str, reference: str, seeds_a: set, seeds_b: set) -> str:
    """'full lacks seeds 2, 3' (and / or the method's): the seeds one of the two did not finish."""
    lacking = [(name, sorted(other - own)) for name, own, other in
               ((method, seeds_a, seeds_b), (reference, seeds_b, seeds_a))]
    return "; ".join(f"{name} lacks seed{'s' if len(seeds) > 1 else ''} {_seeds(seeds)}"
                     for name, seeds in lacking if seeds)


def pairwise_frame(done: pd.DataFrame, methods: list[str], reference: str, labels: dict[str, list[str]],
                   options: ReportOptions) -> pd.DataFrame:
    """One row per (method, task) where the method and the reference both have a done seed, compared on
    the seeds both finished; the p-values adjusted across all rows (options.correction) and the verdicts."""
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
                      "compared_seeds": _seeds(paired), "missing_seeds": _missing(method, reference, set(runs_a),
                                                                                 set(runs_b))}
            if paired:
                record |= paired_tests([(runs_a[s], runs_b[s]) for s in paired], labels[task[1]], options)
            records.append(record)
    frame = pd.DataFrame(records, columns=PAIRWISE)
    frame["p_adjusted"] = adjust_p_values(frame["p_value"].to_numpy(float), options.correction)
    frame["verdict"] = [NOT_COMPARED if math.isnan(p) else NO_DIFFERENCE if p >= options.alpha
                        else "win" if d > 0 else "loss" for p, d in zip(frame["p_adjusted"], frame["difference"])]
    return frame


def verdict(method: str, reference: str, rows: pd.DataFrame, multi_backbone: bool) -> str:
    """'lora beats full in k of n tasks, by at most x points; it loses in m: ...; no significant difference
    in j: ...': wins and losses are the significant ones (the rows' verdicts); tasks without a seed both
    finished are named apart."""
    names = {v: [task_name(r["dataset"], r["fraction"], r["backbone"] if multi_backbone else None)
                 for _, r in rows[rows["verdict"] == v].iterrows()] for v in ("loss", NO_DIFFERENCE, NOT_COMPARED)}
    compared = rows[rows["verdict"] != NOT_COMPARED]
    if compared.empty:
        return f"{method} and {reference} have no task with a seed both finished."
    wins = compared.loc[compared["verdict"] == "win", "difference"]
    text = f"{method} beats {reference} in {len(wins)} of {len(compared)} tasks"
    text += f", by at most {wins.max():.1f} points" if len(wins) else ""
    clauses = [("it loses in", names["loss"]), ("no significant difference in", names[NO_DIFFERENCE])]
    if names[NOT_COMPARED]:
        clauses.append(("not compared (no seed both finished) in", names[NOT_COMPARED]))
    for prefix, tasks_named in clauses:
        text += f"; {prefix} {len(tasks_named)}" + (f": {', '.join(tasks_named)}" if tasks_named else "")
    return text + "."


def _pairwise_table(rows: pd.DataFrame, multi_backbone: bool, options: ReportOptions) -> Table:
    table = Table(["task", "difference (points)", f"{100 * (1 - options.alpha):g}% CI (points)", "p (adjusted)",
                   "verdict", "seeds compared", "DeLong"], [])
    for _, row in rows.iterrows():
        paired = row["verdict"] != NOT_COMPARED
        table.rows.append([
            task_name(row["dataset"], row["fraction"], row["backbone"] if multi_backbone else None),
            f"{row['difference']:+.1f}" if paired else "–",
            f"[{row['ci_low']:.1f}, {row['ci_high']:.1f}]" if paired else "–",
            f"{row['p_adjusted']:.3g}" if paired else "–", row["verdict"], row["compared_seeds"] or "none",
            _delong_text(row, options.alpha) if paired else "–"])
    return table


def _delong_text(row: pd.Series, alpha: float) -> str:
    """DeLong's per-seed tests, with their direction: which method every significant seed favours, and how
    many labels are significant in opposite directions in different seeds."""
    method, reference = row["method"], row["reference"]
    ahead, behind, opposite = (int(row[c]) for c in ("delong_favour_method", "delong_favour_reference",
                                                     "delong_opposite"))
    if int(row["n_labels"]) == 1:
        text = f"max p = {row['delong_max_p']:.3g}"
        if ahead or behind:
            return text + f", p < {alpha:g} in every seed, favouring {method if ahead else reference}"
        return text + (f"; p < {alpha:g} in opposite directions in different seeds" if opposite else "")
    text = (f"of {int(row['n_labels'])} labels, p < {alpha:g} in every seed: {ahead} favouring {method}, "
            f"{behind} favouring {reference}")
    return text + (f"; {opposite} significant in opposite directions in different seeds" if opposite else "")


def _pairwise_blocks(pairwise: pd.DataFrame, methods: list[str], reference: str, multi_backbone: bool,
                     options: ReportOptions) -> list[tuple]:
    """The section of pairwise comparisons: how they are made, then per method its verdict, table and notes
    (missing seeds, resamples that lost a label)."""
    strata = ", drawn within strata: the images whose rarest positive label is the same" if options.stratify else ""
    tested = int(pairwise["p_value"].notna().sum())
    blocks: list[tuple] = [
        ("h2", f"Pairwise comparisons against {reference}"),
        ("p", (f"Each method minus {reference} in test mean AUROC (points), on the seeds both finished: the "
               f"difference (mean over those seeds), its {100 * (1 - options.alpha):g}% CI and p-value all come "
               f"from the same seeds and test images. CI: paired bootstrap ({N_RESAMPLES} resamples of the test images"
               f"{strata}; the same resamples for both methods and every seed, differences averaged over seeds). "
               f"p: two-sided bootstrap test of no difference (never below 2 / {N_RESAMPLES + 1} with "
               f"{N_RESAMPLES} resamples), adjusted across the {tested} comparisons "
               f"of this report with {METHODS[options.correction]}. Verdict: win or loss (in the "
               f"direction of the difference) when the adjusted p < {options.alpha:g}, else no significant "
               f"difference. DeLong: per seed and label, two-sided, not adjusted."))]
    for method in [m for m in methods if m != reference]:
        rows = pairwise[pairwise["method"] == method]
        blocks += [("h3", f"{method} vs {reference}"), ("p", verdict(method, reference, rows, multi_backbone))]
        if rows.empty:
            continue
        blocks.append(("table", _pairwise_table(rows, multi_backbone, options)))
        notes = []
        for _, row in rows.iterrows():
            task = task_name(row["dataset"], row["fraction"], row["backbone"] if multi_backbone else None)
            if row["missing_seeds"]:
                compared = (f"compared on seeds {row['compared_seeds']}" if row["compared_seeds"]
                            else "no seed to compare")
                notes.append(f"{task}: {row['missing_seeds']}: {compared}.")
            if row["n_label_lost"] > 0:
                notes.append(f"{task}: in {int(row['n_label_lost'])} of {N_RESAMPLES} resamples a label had one "
                             f"class only and left that resample's mean.")
        if notes:
            blocks.append(("list", notes))
    return blocks


# ----------------------------------------------------------------------------- the report
def _tuning_blocks(frame: pd.DataFrame, study_dir: Path, multi_backbone: bool, out: Path) -> list[tuple]:
    """The section of the tasks' searches (none without them); tuning.csv and .tex written into `out`."""
    tuning = tuning_frame(frame, study_dir)
    if tuning.empty:
        return []
    table = tuning_table(tuning, multi_backbone)
    (out / "tuning.csv").write_text(tuning.to_csv(index=False), encoding="utf-8")
    (out / "tuning.tex").write_text(latex(table), encoding="utf-8")
    return [("h2", "Hyperparameter search (val mean AUROC, points)"),
            ("p", ("Each task and method was searched before its seeds trained (medpeft tune, on its first seed's "
                   "config): trial 0 is the config as given (default), then TPE with median pruning; every seed "
                   "then trained with the best trial's values. The difference is tuned minus default on the same "
                   "val split, from the same search: the split the values were chosen on, so it overstates what "
                   "tuning gains on test (the tables above).")), ("table", table)]


def _evidence_blocks(done: pd.DataFrame, methods: list[str], labels: dict[str, list[str]], multi_backbone: bool,
                     out: Path) -> list[tuple]:
    """The calibration (with reliability diagrams), subgroup and external-validation sections; each
    section's CSV and LaTeX table written into `out`."""
    blocks: list[tuple] = []
    for heading, stem, frame_of, table_of, text_of, missing in SECTIONS:
        frame = frame_of(done, methods)
        blocks.append(("h2", heading))
        if frame.empty:
            blocks.append(("p", f"{heading}: {missing}."))
            continue
        table = table_of(frame, multi_backbone)
        (out / f"{stem}.csv").write_text(frame.to_csv(index=False), encoding="utf-8")
        (out / f"{stem}.tex").write_text(latex(table), encoding="utf-8")
        blocks += [("p", text_of(frame)), ("table", table)]
        if stem == "calibration":
            blocks += [("figure", f) for f in write_reliability_figures(done, methods, labels, out / "figures")]
    return blocks


def _document(name: str, results: pd.DataFrame, comparison: Table, sections: list[tuple],
              figures: list[tuple[str, Path]]) -> list[tuple]:
    counts = results["status"].value_counts()
    failed = results[results["status"] == "failed"]
    blocks: list[tuple] = [
        ("h1", f"Study report: {name}"),
        ("p", (f"{len(results)} cells: {counts.get('done', 0)} done, {counts.get('failed', 0)} failed, "
               f"{counts.get('pending', 0) + counts.get('running', 0)} pending or running.")),
    ]
    if not failed.empty:
        blocks += [("h2", "Failed cells"), ("list", [f"{k}: {e}" for k, e in zip(failed["key"], failed["error"])])]
    seeds = results.groupby(["backbone", "dataset", "method", "fraction"])["seed"].nunique().max()
    spread = "mean ± sd over seeds" if seeds > 1 else "one seed"
    blocks += [("h2", f"Test mean AUROC (points, {spread})"), ("table", comparison),
               ("p", ("Bold: the best mean of each column. trainable %: trainable parameters as a share of the "
                      "backbone's.")), *sections]
    blocks += [("h2", "Figures"), *(("figure", figure) for figure in figures)]
    return blocks


def write_report(study_dir: str | Path) -> Path:
    """Write the study's report into study_dir/report/ (see the module docstring); return report.html."""
    study_dir = Path(study_dir)
    frame = _read_store(study_dir)
    name, options, generate = _study_file(study_dir)
    if generate is not None:
        with atomic_directory(study_dir / REPORT) as out:
            generative.write(frame, study_dir, name, out, str(generate.get("extractor")))
        return study_dir / REPORT / "report.html"
    results = results_table(frame, study_dir)
    usable = (results["status"] == "done") & results["test_mean_auroc"].notna()
    done = results[usable].assign(metrics=frame["metrics"][usable])
    if done.empty:
        raise RunDirError(f"{study_dir / STORE}: no done cell has a test AUROC; nothing to compare")
    methods, labels = order(frame["method"]), dataset_labels(frame)
    reference = "full" if "full" in methods else methods[0]
    comparison = comparison_frame(done, methods)
    table = comparison_table(comparison)
    pairwise = pairwise_frame(done, methods, reference, labels, options)
    with atomic_directory(study_dir / REPORT) as out:
        for file, text in (("results.csv", results.to_csv(index=False)),
                           ("comparison.csv", comparison.to_csv(index=False)), ("comparison.tex", latex(table)),
                           ("pairwise.csv", pairwise.to_csv(index=False))):
            (out / file).write_text(text, encoding="utf-8")
        (out / "figures").mkdir()
        multi_backbone = results["backbone"].nunique() > 1
        sections = [*_tuning_blocks(frame, study_dir, multi_backbone, out),
                    *_pairwise_blocks(pairwise, methods, reference, multi_backbone, options),
                    *_evidence_blocks(done, methods, labels, multi_backbone, out)]
        blocks = _document(name, results, table, sections, write_figures(done, methods, labels, out / "figures"))
        (out / "report.md").write_text(markdown(blocks, out), encoding="utf-8")
        (out / "report.html").write_text(html_page(f"Study report: {name}", blocks), encoding="utf-8")
    return study_dir / REPORT / "report.html"
