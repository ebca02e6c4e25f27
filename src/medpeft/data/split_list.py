"""Published split lists: ``<relative path> <0/1 label> ...`` per line, as MRM-pytorch, MED-PEFT and
medical MAE ship them (space separated; trailing spaces tolerated)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from medpeft.errors import DataError


def read_split_list(path: str | Path, labels) -> pd.DataFrame:
    """Columns ``image_id`` and one float column per label, in the file's order."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: split list not found") from None
    ids, rows = [], []
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != len(labels) + 1 or any(f not in ("0", "1") for f in fields[1:]):
            raise DataError(f"{path}: line {number}: expected an image path and {len(labels)} labels of 0/1, "
                            f"got {line.strip()!r}")
        ids.append(fields[0])
        rows.append([float(f) for f in fields[1:]])
    table = pd.DataFrame(np.asarray(rows, dtype=np.float32).reshape(len(rows), len(labels)), columns=list(labels))
    table.insert(0, "image_id", ids)
    if table["image_id"].duplicated().any():
        raise DataError(f"{path}: image {table.loc[table['image_id'].duplicated(), 'image_id'].iloc[0]!r} is listed twice")
    return table


def label_mismatches(table: pd.DataFrame, listed: pd.DataFrame, labels) -> pd.DataFrame:
    """Rows of `listed` whose labels differ from `table`'s (matched on image_id); unknown ids are an error.

    Masked (NaN) labels in `table` never match, so they count as mismatches."""
    merged = listed.merge(table[["image_id", *labels]], on="image_id", how="left", suffixes=("", "_table"),
                          indicator=True)
    missing = merged["_merge"] == "left_only"
    if missing.any():
        raise DataError(f"{int(missing.sum())} listed images are not in the table, "
                        f"e.g. {merged.loc[missing, 'image_id'].iloc[0]}")
    differs = np.zeros(len(merged), dtype=bool)
    for name in labels:
        differs |= merged[name].to_numpy() != merged[f"{name}_table"].to_numpy()
    return listed[differs]
