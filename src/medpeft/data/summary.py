"""What a dataset split holds: images, patients, views and label prevalence per split."""

from __future__ import annotations

import numpy as np
import pandas as pd


def summarize(table: pd.DataFrame, labels) -> pd.DataFrame:
    """One row per split (and 'all'): images, patients, views ('PA 10 / AP 5'), then per label
    'positives/known (percent)'."""
    groups = [("all", table)] + [(name, rows) for name, rows in table.groupby("split", sort=False)] \
        if "split" in table.columns else [("all", table)]
    rows = []
    for name, part in groups:
        views = part["view"].replace("", "?").value_counts()
        row = {"split": name, "images": len(part), "patients": part["patient_id"].nunique(),
               "views": " / ".join(f"{v} {n}" for v, n in views.items())}
        for label in labels:
            values = part[label].to_numpy(dtype=float)
            known = int(np.isfinite(values).sum())
            positives = int(np.nansum(values))
            row[label] = f"{positives}/{known} ({100.0 * positives / max(known, 1):.1f}%)"
        rows.append(row)
    return pd.DataFrame(rows)
