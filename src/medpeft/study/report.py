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
    report.html      the same, self-contained (figures embedded), written last

The bootstrap pairs everything: the two runs of a seed are aligned by test image, every seed uses the
same resamples of the same images, the per-resample differences are averaged over seeds, and the
interval is taken from those averages.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure

from medpeft.errors import DataError, RunDirError
from medpeft.metrics.compare import delong_test, resampled_mean_aurocs
from medpeft.study.runner import STORE
from medpeft.study.store import Store
from medpeft.train import rundir

REPORT = "report"
ALPHA = 0.05  # the bootstrap interval is 1 - ALPHA; DeLong's test is significant below ALPHA
N_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # one seed for every run: the same resamples of the same test images
TASK = ["backbone", "dataset", "fraction"]
PAIRWISE = ["method", "reference", *TASK, "seeds", "reference_seeds", "paired_seeds", "difference", "ci_low",
            "ci_high", "n_labels", "delong_max_p", "delong_labels_significant"]
CSS = ("body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #bbb;padding:.25em .6em}"
       "td{text-align:right}thead th{background:#eee}img{max-width:100%}")


@dataclass
class Table:
    """Display cells as text; the first `row_levels` columns name the row; `bold` holds (row, column)."""

    header: list[str]
    rows: list[list[str]]
    row_levels: int = 1
    bold: set[tuple[int, int]] = field(default_factory=set)


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


def _order(values) -> list:
    """Distinct values in order of first appearance (the study's order)."""
    return list(dict.fromkeys(values))


def _labels(frame: pd.DataFrame) -> dict[str, list[str]]:
    """Each dataset's labels, from its done cells' metrics."""
    labels: dict[str, list[str]] = {}
    for dataset, metrics in zip(frame["dataset"], frame["metrics"]):
        if metrics:
            labels[dataset] = _order(labels.get(dataset, []) + metrics["labels"])
    return labels


def _run_dir(study_dir: Path, key: str, stored: str) -> str:
    """The stored run directory, or the study's own runs/KEY when the study was moved."""
    local = study_dir / "runs" / key
    return str(local) if not Path(stored).is_dir() and local.is_dir() else stored


def results_table(frame: pd.DataFrame, study_dir: Path) -> pd.DataFrame:
    """One row per cell with its numbers and per-label test AUROC."""
    all_labels = _order(label for labels in _labels(frame).values() for label in labels)
    per_label = [{f"test_auroc:{label}": ((m or {}).get("test") or {}).get("per_label", {}).get(label, {}).get("auroc")
                  for label in all_labels} for m in frame["metrics"]]
    results = frame[["key", *TASK, "method", "seed", "status", "error", "val_mean_auroc", "test_mean_auroc"]]
    results = pd.concat([results.reset_index(drop=True), pd.DataFrame(per_label, columns=[
        f"test_auroc:{label}" for label in all_labels], dtype=float)], axis=1)
    for column in ("trainable", "trainable_percent", "wall_time_s", "peak_memory_mb"):
        results[column] = frame[column].to_numpy()
    results["run_dir"] = [_run_dir(study_dir, k, r) for k, r in zip(frame["key"], frame["run_dir"])]
    return results


def _tasks(done: pd.DataFrame) -> list[tuple]:
    backbones, datasets = _order(done["backbone"]), _order(done["dataset"])
    tasks = {tuple(t) for t in done[TASK].itertuples(index=False)}
    return sorted(tasks, key=lambda t: (backbones.index(t[0]), datasets.index(t[1]), t[2]))


def _seed_stats(done: pd.DataFrame) -> pd.DataFrame:
    """Mean, sd and n over seeds of the test mean AUROC (points) per backbone, dataset, fraction, method."""
    grouped = done.groupby([*TASK, "method"])["test_mean_auroc"]
    return pd.DataFrame({"mean": 100 * grouped.mean(), "sd": 100 * grouped.std(), "n": grouped.count()})


def _task_name(dataset: str, fraction: float, backbone: str | None = None) -> str:
    name = f"{dataset} {100 * fraction:g}%"
    return f"{backbone} / {name}" if backbone else name


# ----------------------------------------------------------------------------- comparison table
def comparison_frame(done: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """Per (backbone, method): mean trainable %, and per (dataset, fraction) column mean, sd, n (points)."""
    stats = _seed_stats(done)
    columns = _order((t[1], t[2]) for t in _tasks(done))
    records = []
    for backbone in _order(done["backbone"]):
        for method in [m for m in methods if ((done["backbone"] == backbone) & (done["method"] == m)).any()]:
            rows = done[(done["backbone"] == backbone) & (done["method"] == method)]
            record = {"backbone": backbone, "method": method, "trainable_percent": rows["trainable_percent"].mean()}
            for dataset, fraction in columns:
                key = (backbone, dataset, fraction, method)
                mean, sd, n = stats.loc[key] if key in stats.index else (math.nan, math.nan, 0)
                name = _task_name(dataset, fraction)
                record |= {f"{name}:mean": mean, f"{name}:sd": sd, f"{name}:n": int(n)}
            records.append(record)
    return pd.DataFrame(records)


def _comparison_table(comparison: pd.DataFrame) -> Table:
    backbones = _order(comparison["backbone"])
    names = [c[:-len(":mean")] for c in comparison.columns if c.endswith(":mean")]
    levels = ["backbone", "method"] if len(backbones) > 1 else ["method"]
    titles = names if len(backbones) > 1 else [f"{backbones[0]} / {name}" for name in names]
    counts = {n for name in names for n in comparison[f"{name}:n"] if n > 0}
    table = Table([*levels, "trainable %", *titles], [], row_levels=len(levels))
    for _, row in comparison.iterrows():
        cells = [_mean_sd(row[f"{name}:mean"], row[f"{name}:sd"], row[f"{name}:n"], len(counts) > 1) for name in names]
        table.rows.append([*(str(row[level]) for level in levels), f"{row['trainable_percent']:.3g}", *cells])
    offset = len(levels) + 1  # row levels and the trainable % column
    for j, name in enumerate(names):
        best = comparison[f"{name}:mean"].max()
        table.bold |= {(i, offset + j) for i, mean in enumerate(comparison[f"{name}:mean"]) if mean == best}
    return table


def _mean_sd(mean: float, sd: float, n: int, show_n: bool) -> str:
    if n == 0:
        return "–"
    text = f"{mean:.1f}" if math.isnan(sd) else f"{mean:.1f} ± {sd:.1f}"
    return f"{text} (n={n})" if show_n else text


# ----------------------------------------------------------------------------- pairwise comparisons
def _test_predictions(run_dir: str, labels: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image ids, targets (N, K) and probabilities (N, K) of a run's test split, sorted by image id."""
    path = Path(run_dir) / rundir.PREDICTIONS
    if not path.is_file():
        raise RunDirError(f"{path}: missing; the report needs each finished run's test predictions")
    table = pd.read_csv(path, dtype={"image_id": str})
    table = table[table["split"] == "test"].sort_values("image_id", kind="stable")
    return (table["image_id"].to_numpy(), table[[f"target:{label}" for label in labels]].to_numpy(float),
            table[[f"prob:{label}" for label in labels]].to_numpy(float))


def _delong_p(targets: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    try:
        return delong_test(targets, a, b).p_value
    except ValueError:  # fewer than two positives or negatives: no test
        return math.nan


def paired_tests(pairs: list[tuple[str, str]], labels: list[str]) -> dict:
    """Bootstrap CI (points) of the seed-averaged difference a - b and DeLong's test per seed and label.

    `pairs` holds the run directories (a, b) of each seed both methods finished. Every run must hold
    the same test images: each seed then draws the same resamples (one bootstrap seed), and the
    per-resample differences are averaged over seeds before the percentiles are taken.
    """
    first_ids, differences, p_values = None, [], []
    for run_a, run_b in pairs:
        ids_a, targets, scores_a = _test_predictions(run_a, labels)
        ids_b, targets_b, scores_b = _test_predictions(run_b, labels)
        first_ids = ids_b if first_ids is None else first_ids
        for ids, run in ((ids_a, run_a), (ids_b, run_b)):
            if not np.array_equal(ids, first_ids):
                raise DataError(f"{run} and {pairs[0][1]}: their test image sets differ ({len(ids)} vs "
                                f"{len(first_ids)} images); the runs of a task must be scored on the same images")
        if not np.array_equal(targets, targets_b, equal_nan=True):
            raise DataError(f"{run_a} and {run_b}: the same test images have different targets")
        means = resampled_mean_aurocs(targets, scores_a, scores_b, n_resamples=N_RESAMPLES, seed=BOOTSTRAP_SEED)
        differences.append(means[:, 0] - means[:, 1])
        p_values.append([_delong_p(targets[:, j], scores_a[:, j], scores_b[:, j]) for j in range(len(labels))])
    averaged = np.mean(differences, axis=0)
    low, high = 100 * np.quantile(averaged[np.isfinite(averaged)], [ALPHA / 2, 1 - ALPHA / 2])
    p_values = np.array(p_values)
    return {"ci_low": low, "ci_high": high, "n_labels": len(labels),
            "delong_max_p": p_values.max() if len(labels) == 1 else math.nan,
            "delong_labels_significant": int((p_values < ALPHA).all(axis=0).sum())}


def pairwise_frame(done: pd.DataFrame, methods: list[str], reference: str,
                   labels: dict[str, list[str]]) -> pd.DataFrame:
    """One row per (method, task) where the method and the reference both have a done seed."""
    records = []
    for method in [m for m in methods if m != reference]:
        for task in _tasks(done):
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
        table.rows.append([_task_name(row["dataset"], row["fraction"], row["backbone"] if multi_backbone else None),
                           f"{row['difference']:+.1f}", ci, str(row["paired_seeds"]),
                           _delong_text(row) if paired else "–"])
    return table


def _delong_text(row: pd.Series) -> str:
    significant, k = int(row["delong_labels_significant"]), int(row["n_labels"])
    if k == 1:
        return f"max p = {row['delong_max_p']:.3g}" + (f", p < {ALPHA:g} in every seed" if significant else "")
    return f"{significant} of {k} labels p < {ALPHA:g} in every seed"


# ----------------------------------------------------------------------------- figures
def _save(fig: Figure, figures: Path, name: str) -> Path:
    """Write `fig` as NAME.png and NAME.svg; return the PNG's path."""
    for fmt in ("svg", "png"):
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt, dpi=150, bbox_inches="tight", metadata={"Date": None} if fmt == "svg" else None)
        rundir.write_bytes_atomic(figures / f"{name}.{fmt}", buffer.getvalue())
    return figures / f"{name}.png"


def _fraction_figure(done: pd.DataFrame, stats: pd.DataFrame, methods: list[str]) -> Figure:
    """Test mean AUROC vs label fraction, one line per method, one panel per (backbone, dataset)."""
    panels = _order(zip(done["backbone"], done["dataset"]))
    ncols = min(3, len(panels))
    fig = Figure(figsize=(4.5 * ncols, 3.6 * math.ceil(len(panels) / ncols)), layout="constrained")
    axes = fig.subplots(math.ceil(len(panels) / ncols), ncols, squeeze=False).ravel()
    for ax, (backbone, dataset) in zip(axes, panels):
        panel = stats.loc[(backbone, dataset)].reset_index()
        for method in [m for m in methods if m in set(panel["method"])]:
            line = panel[panel["method"] == method].sort_values("fraction")
            ax.errorbar(line["fraction"], line["mean"], yerr=line["sd"].fillna(0), marker="o", capsize=3, label=method)
        fractions = sorted(set(panel["fraction"]))
        ax.set(xscale="log", title=f"{backbone} / {dataset}", xlabel="label fraction",
               ylabel="test mean AUROC (points)")
        ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
        ax.minorticks_off()
        ax.legend(fontsize="small")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return fig


def _pareto_figure(done: pd.DataFrame, stats: pd.DataFrame) -> Figure:
    """Mean over tasks of test mean AUROC vs trainable %, the Pareto front (fewer, better) as a step line."""
    auroc = stats.groupby(["backbone", "method"])["mean"].mean()
    trainable = done.groupby(["backbone", "method"])["trainable_percent"].mean()
    points = pd.DataFrame({"auroc": auroc, "trainable": trainable}).dropna()
    points = points[points["trainable"] > 0].sort_values(["trainable", "auroc"], ascending=[True, False])
    front = points[points["auroc"] > points["auroc"].cummax().shift(fill_value=-math.inf)]
    multi_backbone = points.index.get_level_values("backbone").nunique() > 1
    fig = Figure(figsize=(6, 4.2), layout="constrained")
    ax = fig.subplots()
    ax.scatter(points["trainable"], points["auroc"], color="tab:blue", zorder=3)
    # The front's staircase, carried on to the largest trainable % (a one-point front is a line too).
    ax.step([*front["trainable"], points["trainable"].max()], [*front["auroc"], front["auroc"].iloc[-1]],
            where="post", color="tab:red", label="Pareto front")
    for i, ((backbone, method), row) in enumerate(points.iterrows()):
        ax.annotate(f"{backbone} / {method}" if multi_backbone else method, (row["trainable"], row["auroc"]),
                    textcoords="offset points", xytext=(5, 4 if i % 2 == 0 else -11), fontsize="small")
    ax.set(xscale="log", xlabel="trainable parameters (% of the backbone)",
           ylabel="test mean AUROC (points, mean over tasks)")
    ax.legend(fontsize="small")
    return fig


def _heatmap_figure(done: pd.DataFrame, dataset: str, labels: list[str], methods: list[str]) -> Figure:
    """Mean over seeds of each label's test AUROC (points): rows method (x fraction, x backbone), columns labels."""
    rows = done[done["dataset"] == dataset]
    means = 100 * rows.groupby([*TASK, "method"])[[f"test_auroc:{label}" for label in labels]].mean()
    backbones = _order(rows["backbone"])
    means = means.reindex(sorted(means.index, key=lambda k: (backbones.index(k[0]), k[2], methods.index(k[3]))))
    many_fractions, many_backbones = rows["fraction"].nunique() > 1, len(backbones) > 1
    names = [" / ".join([*([b] if many_backbones else []), m, *([f"{100 * f:g}%"] if many_fractions else [])])
             for b, _, f, m in means.index]
    values = means.to_numpy()
    fig = Figure(figsize=(2.5 + 0.9 * len(labels), 1.2 + 0.4 * len(names)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    threshold = np.nanmean(values)
    for (i, j), value in np.ndenumerate(values):
        if np.isfinite(value):
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize="small",
                    color="white" if value < threshold else "black")
    ax.set_title(f"{dataset}: test AUROC per label (points)")
    fig.colorbar(image, ax=ax, label="test AUROC (points)")
    return fig


def write_figures(done: pd.DataFrame, methods: list[str], labels: dict[str, list[str]],
                  figures: Path) -> list[tuple[str, Path]]:
    """Every figure as PNG and SVG; returns (alt text, PNG path) of each."""
    stats = _seed_stats(done)
    written = [("Test mean AUROC vs label fraction per method, mean and sd over seeds",
                _save(_fraction_figure(done, stats, methods), figures, "auroc_vs_fraction")),
               ("Test mean AUROC averaged over tasks vs trainable parameters, with the Pareto front",
                _save(_pareto_figure(done, stats), figures, "auroc_vs_trainable"))]
    for i, dataset in enumerate(_order(done["dataset"])):
        written.append((f"Per-label test AUROC on {dataset} per method, mean over seeds",
                        _save(_heatmap_figure(done, dataset, labels[dataset], methods), figures, f"heatmap_{i}")))
    return written


# ----------------------------------------------------------------------------- rendering
def _escape_latex(text: str) -> str:
    special = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
               "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return "".join(special.get(c, c) for c in text).replace("±", r"$\pm$").replace("–", "--")


def latex(table: Table) -> str:
    """A plain tabular with booktabs rules."""
    def line(cells: list[str], row: int | None) -> str:
        return " & ".join(rf"\textbf{{{_escape_latex(c)}}}" if (row, j) in table.bold else _escape_latex(c)
                          for j, c in enumerate(cells)) + r" \\"

    spec = "l" * table.row_levels + "r" * (len(table.header) - table.row_levels)
    body = [line(cells, i) for i, cells in enumerate(table.rows)]
    return "\n".join([rf"\begin{{tabular}}{{{spec}}}", r"\toprule", line(table.header, None), r"\midrule",
                      *body, r"\bottomrule", r"\end{tabular}"]) + "\n"


def _markdown_table(table: Table) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", r"\|") for c in cells) + " |"

    rule = ["---"] * table.row_levels + ["---:"] * (len(table.header) - table.row_levels)
    rows = [[f"**{c}**" if (i, j) in table.bold else c for j, c in enumerate(cells)]
            for i, cells in enumerate(table.rows)]
    return "\n".join([line(table.header), line(rule), *map(line, rows)])


def _html_table(table: Table) -> str:
    def cell(i: int, j: int, text: str) -> str:
        text = f"<strong>{html.escape(text)}</strong>" if (i, j) in table.bold else html.escape(text)
        return f'<th scope="row">{text}</th>' if j < table.row_levels else f"<td>{text}</td>"

    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.header)
    body = "".join("<tr>" + "".join(cell(i, j, c) for j, c in enumerate(cells)) + "</tr>"
                   for i, cells in enumerate(table.rows))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def markdown(blocks: list[tuple], base: Path) -> str:
    """Blocks are (kind, payload): h1/h2/h3/p with text, list with texts, table with a Table, figure with (alt, png)."""
    parts = []
    for kind, payload in blocks:
        match kind:
            case "h1" | "h2" | "h3":
                parts.append("#" * int(kind[1]) + " " + payload)
            case "p":
                parts.append(payload)
            case "list":
                parts.append("\n".join(f"- {item}" for item in payload))
            case "table":
                parts.append(_markdown_table(payload))
            case "figure":
                parts.append(f"![{payload[0]}]({payload[1].relative_to(base).as_posix()})")
    return "\n\n".join(parts) + "\n"


def html_page(title: str, blocks: list[tuple]) -> str:
    """The same blocks as one self-contained page: inline CSS, figures as data URIs."""
    parts = []
    for kind, payload in blocks:
        match kind:
            case "h1" | "h2" | "h3":
                parts.append(f"<{kind}>{html.escape(payload)}</{kind}>")
            case "p":
                parts.append(f"<p>{html.escape(payload)}</p>")
            case "list":
                parts.append("<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in payload) + "</ul>")
            case "table":
                parts.append(_html_table(payload))
            case "figure":
                data = base64.b64encode(payload[1].read_bytes()).decode()
                parts.append(f'<figure><img alt="{html.escape(payload[0])}" src="data:image/png;base64,{data}">'
                             f"<figcaption>{html.escape(payload[0])}</figcaption></figure>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


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
    out = study_dir / REPORT
    (out / "figures").mkdir(parents=True, exist_ok=True)
    methods, labels = _order(frame["method"]), _labels(frame)
    reference = "full" if "full" in methods else methods[0]

    rundir.write_text_atomic(out / "results.csv", results.to_csv(index=False))
    comparison = comparison_frame(done, methods)
    rundir.write_text_atomic(out / "comparison.csv", comparison.to_csv(index=False))
    table = _comparison_table(comparison)
    rundir.write_text_atomic(out / "comparison.tex", latex(table))
    pairwise = pairwise_frame(done, methods, reference, labels)
    rundir.write_text_atomic(out / "pairwise.csv", pairwise.to_csv(index=False))
    figures = write_figures(done, methods, labels, out / "figures")

    name = _study_name(study_dir)
    blocks = _document(name, results, table, pairwise, methods, reference, figures)
    rundir.write_text_atomic(out / "report.md", markdown(blocks, out))
    rundir.write_text_atomic(out / "report.html", html_page(f"Study report: {name}", blocks))
    return out / "report.html"
