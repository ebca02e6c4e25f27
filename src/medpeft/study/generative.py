"""The report of a generative study (a study file with ``generate``): per task (backbone, dataset, label
fraction) and method, over seeds, how close to the real test images, how diverse, how faithful to their
prompts and how much copied the generated images are (medpeft.generate.evaluate), against the share of
parameters trained. ``medpeft.study.report.write_report`` writes it into study_dir/report/::

    results.csv      one row per cell: coordinates, status, error, trainable parameters, each measure,
                     time, memory, run directory
    generated.csv    per task and method: mean trainable %, and each measure's mean, sd and number of seeds
    generated.tex    the same as a LaTeX table, the best mean of each measure per task in bold
    figures/         fid_vs_trainable: FID vs trainable % per task (PNG and SVG)
    report.md, report.html

Measures (MEASURES): FID, KID (x1000), precision, recall, copied share (%), MiFID and label fidelity (the
extractor's mean AUROC on the generated images against their prompted findings, points; absent when the
extractor has no labels). The verdict of a task names the method with the lowest mean FID and counts the
other methods whose mean FID is below full fine-tuning's ('full', when the study has it), Dutt et al.'s
comparison; it compares seed means, without a test (FID has no paired per-image resampling).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from matplotlib import rc_context
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from medpeft.errors import RunDirError
from medpeft.study.figures import _save
from medpeft.study.render import Table, html_page, latex, markdown
from medpeft.study.tables import TASK, _run_dir, mean_sd, order, task_name, tasks

MEASURES = {  # key: (title, scale, better)
    "fid": ("FID", 1, min), "kid": ("KID x1000", 1000, min), "precision": ("precision", 1, max),
    "recall": ("recall", 1, max), "copied_share": ("copied %", 100, min), "mifid": ("MiFID", 1, min),
    "label_fidelity": ("label fidelity (AUROC, points)", 100, max)}


def _measures(metrics: dict | None) -> dict:
    """A cell's measures (unscaled; NaN where absent) from its stored metrics."""
    generated = (metrics or {}).get("generated") or {}
    values = {key: generated.get(key) for key in MEASURES}
    values["label_fidelity"] = (generated.get("label_fidelity") or {}).get("mean_generated")
    return {key: math.nan if value is None else float(value) for key, value in values.items()}


def results_frame(frame: pd.DataFrame, study_dir: Path) -> pd.DataFrame:
    """One row per cell with its measures."""
    results = frame[["key", *TASK, "method", "seed", "status", "error", "trainable", "trainable_percent"]]
    results = pd.concat([results.reset_index(drop=True),
                         pd.DataFrame([_measures(m) for m in frame["metrics"]], columns=list(MEASURES))], axis=1)
    results["wall_time_s"] = frame["wall_time_s"].to_numpy()
    results["peak_memory_mb"] = frame["peak_memory_mb"].to_numpy()
    results["run_dir"] = [_run_dir(study_dir, k, r) for k, r in zip(frame["key"], frame["run_dir"])]
    return results


def summary_frame(done: pd.DataFrame) -> pd.DataFrame:
    """Per task and method (study order): mean trainable %, and each measure's mean, sd and n over seeds
    (scaled as MEASURES says)."""
    records = []
    for task in tasks(done):
        rows = done[(done[TASK] == pd.Series(task, index=TASK)).all(axis=1)]
        for method in order(rows["method"]):
            cells = rows[rows["method"] == method]
            record = dict(zip(TASK, task), method=method, trainable_percent=cells["trainable_percent"].mean())
            for key, (_, scale, _) in MEASURES.items():
                values = scale * cells[key].dropna()
                record |= {f"{key}:mean": values.mean(), f"{key}:sd": values.std(), f"{key}:n": len(values)}
            records.append(record)
    return pd.DataFrame(records)


def verdicts(summary: pd.DataFrame, multi_backbone: bool) -> list[str]:
    """Per task: the lowest mean FID, and the methods below full fine-tuning's mean FID."""
    lines = []
    for task, rows in summary.groupby(TASK, sort=False):
        rows = rows.dropna(subset=["fid:mean"])
        if rows.empty:
            continue
        name = task_name(task[1], task[2], task[0] if multi_backbone else None)
        best = rows.loc[rows["fid:mean"].idxmin()]
        line = f"{name}: lowest FID {best['fid:mean']:.4g} with {best['method']} ({best['trainable_percent']:.3g}% " \
               "trainable)"
        if "full" in set(rows["method"]) and len(rows) > 1:
            full = rows[rows["method"] == "full"]["fid:mean"].iloc[0]
            below = rows[(rows["method"] != "full") & (rows["fid:mean"] < full)]["method"].tolist()
            line += (f"; {len(below)} of {len(rows) - 1} other methods below full fine-tuning's {full:.4g}"
                     + (f" ({', '.join(below)})" if below else ""))
        lines.append(line + ".")
    return lines


def summary_table(summary: pd.DataFrame, multi_backbone: bool) -> Table:
    """'mean ± sd' per measure (n shown when seeds differ), the best mean of each task in bold."""
    counts = {n for key in MEASURES for n in summary[f"{key}:n"] if n > 0}
    table = Table(["task", "method", "trainable %", *(title for title, _, _ in MEASURES.values())], [], row_levels=2)
    for i, (_, row) in enumerate(summary.iterrows()):
        table.rows.append([task_name(row["dataset"], row["fraction"], row["backbone"] if multi_backbone else None),
                           row["method"], f"{row['trainable_percent']:.3g}",
                           *(mean_sd(row[f"{k}:mean"], row[f"{k}:sd"], row[f"{k}:n"], len(counts) > 1, ".4g", ".2g")
                             for k in MEASURES)])
    for _, rows in summary.groupby(TASK, sort=False):
        for j, (key, (_, _, better)) in enumerate(MEASURES.items()):
            means = rows[f"{key}:mean"].dropna()
            if not means.empty:
                table.bold |= {(i, 3 + j) for i in means.index[means == better(means)]}
    return table


def _fid_figure(summary: pd.DataFrame, multi_backbone: bool) -> Figure:
    """Mean FID vs trainable % (log), one panel per task, each method a labelled point."""
    panels = list(summary.groupby(TASK, sort=False))
    ncols = min(3, len(panels))
    fig = Figure(figsize=(4.8 * ncols, 3.8 * math.ceil(len(panels) / ncols)), layout="constrained")
    axes = fig.subplots(math.ceil(len(panels) / ncols), ncols, squeeze=False).ravel()
    for ax, (task, rows) in zip(axes, panels):
        ax.errorbar(rows["trainable_percent"], rows["fid:mean"], yerr=rows["fid:sd"].fillna(0), fmt="o", capsize=3)
        for _, row in rows.iterrows():
            ax.annotate(row["method"], (row["trainable_percent"], row["fid:mean"]), textcoords="offset points",
                        xytext=(4, 4), fontsize="small")
        ax.set(xscale="log", xlabel="trainable parameters (%)", ylabel="FID (lower is closer)",
               title=task_name(task[1], task[2], task[0] if multi_backbone else None))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return fig


def write(frame: pd.DataFrame, study_dir: Path, name: str, out: Path, extractor: str) -> None:
    """Write the generative report's files into `out` (the report folder being made)."""
    results = results_frame(frame, study_dir)
    done = results[(results["status"] == "done") & results["fid"].notna()]
    if done.empty:
        raise RunDirError(f"{study_dir}: no done cell has a generated-image evaluation; nothing to compare")
    multi_backbone = results["backbone"].nunique() > 1
    summary = summary_frame(done)
    table = summary_table(summary, multi_backbone)
    for file, text in (("results.csv", results.to_csv(index=False)), ("generated.csv", summary.to_csv(index=False)),
                       ("generated.tex", latex(table))):
        (out / file).write_text(text, encoding="utf-8")
    (out / "figures").mkdir()
    with rc_context({"text.parse_math": False, "text.usetex": False}):
        figure = _save(_fid_figure(summary, multi_backbone), out / "figures", "fid_vs_trainable")
    counts = results["status"].value_counts()
    failed = results[results["status"] == "failed"]
    seeds = done.groupby([*TASK, "method"])["seed"].nunique().max()
    blocks: list[tuple] = [
        ("h1", f"Study report: {name}"),
        ("p", (f"{len(results)} cells: {counts.get('done', 0)} done, {counts.get('failed', 0)} failed, "
               f"{counts.get('pending', 0) + counts.get('running', 0)} pending or running.")),
        *([("h2", "Failed cells"), ("list", [f"{k}: {e}" for k, e in zip(failed["key"], failed["error"])])]
          if not failed.empty else []),
        ("h2", f"Generated images ({'mean ± sd over seeds' if seeds > 1 else 'one seed'})"), ("table", table),
        ("p", (f"Measured by medpeft generate evaluate with the extractor {extractor}: FID, KID, precision and "
               "recall of the generated vs the real test images (as many generated as test images drawn, each from "
               "a test image's prompt); copied %: generated images nearer a training image than real test images "
               "are; MiFID: FID penalised by memorisation; label fidelity: the extractor's mean AUROC on the "
               "generated images against their prompted findings. Bold: the best mean of each task. trainable %: "
               "the share of the diffusion model's parameters trained.")),
        ("h2", "Verdicts (seed means, no test)"), ("list", verdicts(summary, multi_backbone)),
        ("h2", "Figures"), ("figure", ("Mean FID vs trainable parameters per task", figure))]
    (out / "report.md").write_text(markdown(blocks, out), encoding="utf-8")
    (out / "report.html").write_text(html_page(f"Study report: {name}", blocks), encoding="utf-8")
