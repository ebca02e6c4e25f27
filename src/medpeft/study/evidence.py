"""The evidence sections of a study report: calibration, subgroups and external validation, from the done
cells' test metrics and their runs' external evaluations (``RUN/evaluations/external/metrics.json``).

Each section is a frame (written as CSV) and a display table; every number is a mean over the seeds of a
task (backbone x dataset x label fraction) and method:

    calibration  per task and method: the test mean ECE and Brier score (means over labels), raw and
                 temperature-scaled (NaN where the runs have no temperatures)
    subgroups    per task, method, subgroup column and group: its size, the test mean AUROC of the group
                 (points) and whether it is small in some seed; the worst group and the largest gap
                 (best - worst) are over the groups that are not small
    external     per task and method: the internal and the external test mean AUROC (points, mean and sd
                 over seeds), both over the labels the two score, the drop (mean over seeds of internal -
                 external) and the run labels the external data lack

A section without data in any done cell is one line saying so.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from medpeft.engine import rundir
from medpeft.errors import RunDirError
from medpeft.study.render import Table
from medpeft.study.runner import EXTERNAL
from medpeft.study.tables import TASK, order, task_name


def _test(metrics: dict | None) -> dict:
    return ((metrics or {}).get("test")) or {}


def _sorted(frame: pd.DataFrame, methods: list[str], backbones: list[str], datasets: list[str]) -> pd.DataFrame:
    """Rows in the study's order: backbone, dataset, fraction, method."""
    key = [(backbones.index(b), datasets.index(d), f, methods.index(m))
           for b, d, f, m in frame[[*TASK, "method"]].itertuples(index=False)]
    return frame.iloc[sorted(range(len(frame)), key=key.__getitem__)].reset_index(drop=True)


def _name(row, multi_backbone: bool) -> str:
    return task_name(row["dataset"], row["fraction"], row["backbone"] if multi_backbone else None)


# ----------------------------------------------------------------------------- calibration
def calibration_frame(done: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """Per (task, method): seeds, n_bins, binning, and the mean over seeds of the test mean ECE and Brier
    score, raw and calibrated."""
    records = []
    for row in done.itertuples():
        calibration = _test(row.metrics).get("calibration")
        if calibration:
            raw, scaled = calibration["raw"], calibration["calibrated"] or {}
            records.append({**{k: getattr(row, k) for k in (*TASK, "method")}, "n_bins": calibration["n_bins"],
                            "binning": calibration["binning"], "ece_raw": raw["mean_ece"],
                            "ece_calibrated": scaled.get("mean_ece"), "brier_raw": raw["mean_brier"],
                            "brier_calibrated": scaled.get("mean_brier")})
    if not records:
        return pd.DataFrame()
    cells = pd.DataFrame(records)
    values = ["ece_raw", "ece_calibrated", "brier_raw", "brier_calibrated"]
    cells[values] = cells[values].astype(float)
    grouped = cells.groupby([*TASK, "method", "n_bins", "binning"], sort=False)
    frame = grouped[values].mean().join(grouped.size().rename("seeds")).reset_index()
    return _sorted(frame, methods, order(done["backbone"]), order(done["dataset"]))


def calibration_table(frame: pd.DataFrame, multi_backbone: bool) -> Table:
    table = Table(["task", "method", "seeds", "ECE raw", "ECE calibrated", "Brier raw", "Brier calibrated"], [],
                  row_levels=2)
    for _, row in frame.iterrows():
        table.rows.append([_name(row, multi_backbone), row["method"], str(row["seeds"]),
                           *("–" if math.isnan(row[c]) else f"{row[c]:.3f}"
                             for c in ("ece_raw", "ece_calibrated", "brier_raw", "brier_calibrated"))])
    return table


def calibration_text(frame: pd.DataFrame) -> str:
    bins = ", ".join(order(f"{n} {b}" for n, b in zip(frame["n_bins"], frame["binning"])))
    return (f"Test expected calibration error (ECE over {bins} bins: the images sorted by probability and split "
            f"into bins of equal count; ECE = the sum over bins of the bin's share of images times |observed "
            f"rate - mean probability|) and Brier score (mean squared difference of probability and outcome), "
            f"each a mean over labels, then over seeds. Raw: the model's probabilities; calibrated: after "
            f"temperature scaling fitted on val (one temperature per label; one for a multiclass task); – "
            f"where the runs have no temperatures.")


# ----------------------------------------------------------------------------- subgroups
def subgroup_frame(done: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """Per (task, method, column, group): n, n_unknown (of the column), seeds, the mean over seeds of the
    group's test mean AUROC (points), and small (in some seed)."""
    records = []
    for row in done.itertuples():
        for column, found in (_test(row.metrics).get("subgroups") or {}).items():
            for value, group in found["groups"].items():
                records.append({**{k: getattr(row, k) for k in (*TASK, "method")}, "column": column,
                                "group": value, "n": group["n"], "n_unknown": found["n_unknown"],
                                "mean_auroc": math.nan if group["mean_auroc"] is None else 100 * group["mean_auroc"],
                                "small": group["small"]})
    if not records:
        return pd.DataFrame()
    grouped = pd.DataFrame(records).groupby([*TASK, "method", "column", "group"], sort=False)
    frame = grouped.agg(n=("n", "first"), n_unknown=("n_unknown", "first"), seeds=("n", "size"),
                        mean_auroc=("mean_auroc", "mean"), small=("small", "any")).reset_index()
    return _sorted(frame, methods, order(done["backbone"]), order(done["dataset"]))


def subgroup_table(frame: pd.DataFrame, multi_backbone: bool) -> Table:
    table = Table(["task", "method", "subgroup", "worst group", "its AUROC", "largest gap (points)", "groups (n)",
                   "small groups"], [], row_levels=3)
    for (*_, method, column), rows in frame.groupby([*TASK, "method", "column"], sort=False):
        ranked = rows[~rows["small"]].sort_values("mean_auroc", kind="stable")
        sizes = ", ".join(f"{g} {n}" for g, n in zip(rows["group"], rows["n"]))
        unknown = int(rows["n_unknown"].iloc[0])
        small = rows[rows["small"]]
        table.rows.append([_name(rows.iloc[0], multi_backbone), method, column,
                           ranked["group"].iloc[0] if len(ranked) else "–",
                           f"{ranked['mean_auroc'].iloc[0]:.1f}" if len(ranked) else "–",
                           f"{ranked['mean_auroc'].iloc[-1] - ranked['mean_auroc'].iloc[0]:.1f}"
                           if len(ranked) > 1 else "–",
                           sizes + (f" (unknown {unknown})" if unknown else ""),
                           ", ".join(f"{g} (n={n})" for g, n in zip(small["group"], small["n"])) or "none"])
    return table


SUBGROUP_TEXT = ("Test mean AUROC (points) per subgroup, mean over seeds. Worst group and largest gap (best - "
                 "worst) are over the groups that are not small; a group is small when a label has too few known "
                 "positives or negatives in it, or no AUROC: it is listed, not ranked. Images with an unknown "
                 "value are counted, not grouped.")


# ----------------------------------------------------------------------------- external validation
def external_frame(done: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """Per (task, method) with external evaluations: the data, seeds, internal and external test mean AUROC
    (points, mean and sd over seeds, over the labels both score), the drop and the absent labels."""
    records = []
    for row in done.itertuples():
        path = Path(row.run_dir) / EXTERNAL
        if not path.is_file():
            continue
        try:
            record = _external_record(rundir.read_json_object(path), _test(row.metrics)["per_label"])
        except (KeyError, TypeError, AttributeError):
            raise RunDirError(f"{path}: not the metrics of an evaluation (expected per_label and evaluation.data, "
                              f"evaluation.absent)") from None
        records.append({**{k: getattr(row, k) for k in (*TASK, "method")}, **record})
    if not records:
        return pd.DataFrame()
    cells = pd.DataFrame(records).assign(drop=lambda f: f["internal"] - f["external"])
    grouped = cells.groupby([*TASK, "method", "data", "labels", "absent"], sort=False)
    frame = grouped[["internal", "external"]].agg(["mean", "std"])
    frame.columns = [f"{a}_{b}" for a, b in frame.columns]
    frame = frame.join(grouped["drop"].mean()).join(grouped.size().rename("seeds")).reset_index()
    return _sorted(frame, methods, order(done["backbone"]), order(done["dataset"]))


def _external_record(external: dict, internal: dict) -> dict:
    """One run's internal and external mean AUROC (points) over the labels both score (NaN if none)."""
    scored = [label for label, m in external["per_label"].items()
              if m["auroc"] is not None and (internal.get(label) or {}).get("auroc") is not None]
    csv = external["evaluation"]["data"]["csv"]
    return {"data": csv if isinstance(csv, str) else ", ".join(csv), "labels": ", ".join(scored),
            "absent": ", ".join(external["evaluation"]["absent"]),
            "internal": 100 * np.mean([internal[label]["auroc"] for label in scored]) if scored else math.nan,
            "external": 100 * np.mean([external["per_label"][label]["auroc"] for label in scored]) if scored
            else math.nan}


def external_table(frame: pd.DataFrame, multi_backbone: bool) -> Table:
    table = Table(["task", "method", "external data", "seeds", "internal", "external", "drop (points)",
                   "absent labels"], [], row_levels=2)
    for _, row in frame.iterrows():
        table.rows.append([_name(row, multi_backbone), row["method"], str(row["data"]), str(row["seeds"]),
                           _points(row, "internal"), _points(row, "external"),
                           "–" if math.isnan(row["drop"]) else f"{row['drop']:+.1f}",
                           row["absent"] or "none"])
    return table


def _points(row: pd.Series, name: str) -> str:
    mean, sd = row[f"{name}_mean"], row[f"{name}_std"]
    return "–" if math.isnan(mean) else f"{mean:.1f}" + ("" if math.isnan(sd) else f" ± {sd:.1f}")


EXTERNAL_TEXT = ("Test mean AUROC (points, mean ± sd over seeds) on the study's own test split (internal) and on "
                 "the external data, both over the labels the two score; drop: the mean over seeds of internal "
                 "minus external. Absent labels: run labels the external data do not have (not scored).")

SECTIONS = (  # heading, file stem, frame, display table, text of a frame, why a section has no data
    ("Calibration", "calibration", calibration_frame, calibration_table, calibration_text,
     "no done cell has calibration metrics (runs of an older medpeft)"),
    ("Subgroups", "subgroups", subgroup_frame, subgroup_table, lambda _: SUBGROUP_TEXT,
     "no done cell has subgroup columns in its test data"),
    ("External validation", "external", external_frame, external_table, lambda _: EXTERNAL_TEXT,
     "no done cell has an external evaluation (the study file's external section)"),
)
