"""What a dataset split holds: images, patients, views and label prevalence per split."""

from __future__ import annotations

import numpy as np
import pandas as pd

from medpeft.data.splits import SPLITS


def summarize(table: pd.DataFrame, labels) -> dict:
    """Counts per split ('all' first, then train, val, test as present), as plain data (JSON-ready):

    ``splits`` (names), ``images`` and ``patients`` ({split: count}), ``views`` ({view: {split: count}},
    '?' for no view), ``labels`` ({label: {split: {"positives": n, "known": n}}}; known excludes NaN,
    the masked unknowns)."""
    parts = {"all": table}
    if "split" in table.columns:
        parts.update((name, table[table["split"] == name]) for name in SPLITS if (table["split"] == name).any())
    views = sorted(table["view"].replace("", "?").unique())
    out = {"splits": list(parts), "images": {}, "patients": {}, "views": {v: {} for v in views},
           "labels": {label: {} for label in labels}}
    for name, part in parts.items():
        out["images"][name] = len(part)
        out["patients"][name] = int(part["patient_id"].nunique())
        counts = part["view"].replace("", "?").value_counts()
        for view in views:
            out["views"][view][name] = int(counts.get(view, 0))
        for label in labels:
            values = part[label].to_numpy(dtype=float)
            out["labels"][label][name] = {"positives": int(np.nansum(values == 1.0)),
                                          "known": int(np.isfinite(values).sum())}
    return out


def summary_rows(summary: dict) -> list[tuple[str, list[str]]]:
    """The summary as rows of text, one cell per split: images, patients, 'view V', then per label
    'positives percent%' (of the known), and a 'LABEL known' row for labels with unknown values."""
    splits = summary["splits"]
    rows = [("images", [str(summary["images"][s]) for s in splits]),
            ("patients", [str(summary["patients"][s]) for s in splits])]
    rows += [(f"view {view}", [str(counts[s]) for s in splits]) for view, counts in summary["views"].items()]
    for label, counts in summary["labels"].items():
        rows.append((label, [_prevalence(counts[s]) for s in splits]))
        if any(counts[s]["known"] < summary["images"][s] for s in splits):
            rows.append((f"{label} known", [str(counts[s]["known"]) for s in splits]))
    return rows


def _prevalence(count: dict) -> str:
    percent = 100.0 * count["positives"] / count["known"] if count["known"] else 0.0
    return f"{count['positives']} {percent:.1f}%"
