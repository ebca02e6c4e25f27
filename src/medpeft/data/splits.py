"""Patient-level train/val/test splits: every image of a patient lands on the same side."""

from __future__ import annotations

import numpy as np
import pandas as pd

from medpeft.config import SplitConfig
from medpeft.errors import DataError

SPLITS = ("train", "val", "test")


def patient_split(patient_ids: pd.Series, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Assign each row 'train', 'val' or 'test' by shuffling patients with `seed`.

    Patients are taken in a seeded random order and given to test, then val, until each holds
    its fraction of the images; the rest is train. Returns an array of split names, one per row.
    """
    patients, inverse, counts = np.unique(patient_ids.to_numpy(), return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(patients))
    cumulative = np.cumsum(counts[order]) / counts.sum()
    side = np.full(len(patients), "train", dtype=object)
    side[order[cumulative <= test_fraction]] = "test"
    val = (cumulative > test_fraction) & (cumulative <= test_fraction + val_fraction)
    side[order[val]] = "val"
    return side[inverse]


def assign_splits(table: pd.DataFrame, config: SplitConfig, source: str) -> pd.DataFrame:
    """Return the table with a 'split' column: from the CSV's split column, or drawn per patient."""
    table = table.copy()
    if config.column:
        bad = ~table["split"].isin(SPLITS)
        if bad.any():
            index = int(np.argmax(bad.values))
            raise DataError(f"{source}: row {index + 2}: split column '{config.column}' has "
                            f"{table['split'].iloc[index]!r}, expected one of {list(SPLITS)}")
        sides = table.groupby("patient_id")["split"].nunique()
        if (sides > 1).any():
            raise DataError(f"{source}: patient {sides[sides > 1].index[0]!r} is in more than one split")
    else:
        table["split"] = patient_split(table["patient_id"], config.val_fraction, config.test_fraction, config.seed)
    for name in ("train", "val"):
        if not (table["split"] == name).any():
            raise DataError(f"{source}: the '{name}' split is empty (too few patients for the fractions?)")
    return table
