"""The figures of a study report, each written as PNG (150 dpi) and SVG (without a date, so that the
same study gives the same file). AUROC is in points (x100), trainable parameters in % of the backbone's.
Every text is drawn as written: a '$' in a name is a dollar sign, not matplotlib's mathtext.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import rc_context
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from medpeft.study.tables import TASK, order, seed_stats, task_name


def _save(fig: Figure, figures: Path, name: str) -> Path:
    """Write `fig` as NAME.png and NAME.svg; return the PNG's path."""
    for fmt in ("svg", "png"):
        fig.savefig(figures / f"{name}.{fmt}", dpi=150, bbox_inches="tight",
                    metadata={"Date": None} if fmt == "svg" else None)
    return figures / f"{name}.png"


def _fraction_figure(done: pd.DataFrame, stats: pd.DataFrame, methods: list[str]) -> Figure:
    """Test mean AUROC vs label fraction, one line per method, one panel per (backbone, dataset)."""
    panels = order(zip(done["backbone"], done["dataset"]))
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
    right = points["trainable"].max()
    for i, ((backbone, method), row) in enumerate(points.iterrows()):
        at_right = row["trainable"] == right  # labelled leftwards, inside the axes
        ax.annotate(f"{backbone} / {method}" if multi_backbone else method, (row["trainable"], row["auroc"]),
                    textcoords="offset points", xytext=(-5 if at_right else 5, 4 if i % 2 == 0 else -11),
                    ha="right" if at_right else "left", fontsize="small")
    ax.set(xscale="log", xlabel="trainable parameters (% of the backbone)",
           ylabel="test mean AUROC (points, mean over tasks)")
    # Plain tick labels: the log axis's default ones are mathtext, which the report's rc turns off.
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize="small")
    return fig


def _heatmap_figure(done: pd.DataFrame, dataset: str, labels: list[str], methods: list[str]) -> Figure:
    """Mean over seeds of each label's test AUROC (points): rows method (x fraction, x backbone), columns labels."""
    rows = done[done["dataset"] == dataset]
    means = 100 * rows.groupby([*TASK, "method"])[[f"test_auroc:{label}" for label in labels]].mean()
    backbones = order(rows["backbone"])
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


def _reliability_figure(cells: pd.DataFrame, label: str, title: str) -> Figure:
    """One panel per cell (its method and seed): the test reliability curve of `label`, raw and calibrated."""
    fig = Figure(figsize=(3.6 * len(cells), 3.6), layout="constrained")
    for ax, cell in zip(fig.subplots(1, len(cells), squeeze=False).ravel(), cells.itertuples()):
        calibration = cell.metrics["test"]["calibration"]
        ax.plot([0, 1], [0, 1], color="gray", linestyle=":", label="perfect")
        for kind, style in (("raw", "o-"), ("calibrated", "s--")):
            curve = ((calibration[kind] or {}).get("per_label", {}).get(label) or {}).get("reliability")
            if curve:
                ax.plot(curve["predicted"], curve["observed"], style, label=kind)
        ax.set(xlim=(0, 1), ylim=(0, 1), aspect="equal", title=f"{cell.method} (seed {cell.seed})",
               xlabel="mean predicted probability", ylabel="observed rate")
        ax.legend(fontsize="small")
    fig.suptitle(title)
    return fig


def write_reliability_figures(done: pd.DataFrame, methods: list[str], labels: dict[str, list[str]],
                              figures: Path) -> list[tuple[str, Path]]:
    """Per dataset whose cells have calibration metrics, reliability_I (PNG and SVG): one panel per method,
    its cell of the first backbone, the largest label fraction and the lowest seed, the dataset's first
    label. Returns (alt text, PNG path) of each."""
    has = done[[bool(((m or {}).get("test") or {}).get("calibration")) for m in done["metrics"]]]
    written = []
    with rc_context({"text.parse_math": False, "text.usetex": False}):
        for i, dataset in enumerate(order(has["dataset"])):
            rows = has[has["dataset"] == dataset]
            rows = rows[rows["backbone"] == rows["backbone"].iloc[0]]
            rows = rows[rows["fraction"] == rows["fraction"].max()].sort_values("seed", kind="stable")
            cells = rows.drop_duplicates("method").sort_values("method", key=lambda m: m.map(methods.index))
            where = task_name(dataset, cells["fraction"].iloc[0], cells["backbone"].iloc[0])
            title = f"{where}: test reliability of {labels[dataset][0]}"
            written.append((f"{title}, raw and temperature-scaled, per method",
                            _save(_reliability_figure(cells, labels[dataset][0], title), figures, f"reliability_{i}")))
    return written


def write_figures(done: pd.DataFrame, methods: list[str], labels: dict[str, list[str]],
                  figures: Path) -> list[tuple[str, Path]]:
    """Every figure as PNG and SVG in the folder `figures`: auroc_vs_fraction, auroc_vs_trainable and
    heatmap_I for the I-th dataset. Returns (alt text, PNG path) of each, in that order."""
    stats = seed_stats(done)
    with rc_context({"text.parse_math": False, "text.usetex": False}):  # read by each text when it is made
        written = [("Test mean AUROC vs label fraction per method, mean and sd over seeds",
                    _save(_fraction_figure(done, stats, methods), figures, "auroc_vs_fraction")),
                   ("Test mean AUROC averaged over tasks vs trainable parameters, with the Pareto front",
                    _save(_pareto_figure(done, stats), figures, "auroc_vs_trainable"))]
        for i, dataset in enumerate(order(done["dataset"])):
            written.append((f"Per-label test AUROC on {dataset} per method, mean over seeds",
                            _save(_heatmap_figure(done, dataset, labels[dataset], methods), figures, f"heatmap_{i}")))
    return written
