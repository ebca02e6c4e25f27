"""Which image goes to train, val and test: published split files, a split column, or a seeded
patient-level draw (label-stratified); then an optional label-fraction subset of train. No patient is on
two sides; labels left with few positives in a split are named in a warning."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from medpeft.config import SplitConfig
from medpeft.data.label_fractions import label_fraction_subsets, read_split_file, stratified_patient_folds
from medpeft.data.split_list import label_mismatches, read_split_list
from medpeft.errors import DataError

SPLITS = ("train", "val", "test")
FEW_POSITIVES = 5
"""A label with fewer positive images in a split is named in a warning after the split is drawn."""


def draw_split(table: pd.DataFrame, labels, val_fraction: float, test_fraction: float, seed: int,
               stratify: bool = True) -> np.ndarray:
    """Assign each row 'train', 'val' or 'test', whole patients, about the given shares of the images.

    `stratify`: by iterative stratification over `labels` (each split's prevalences close to the
    dataset's, rare labels spread first); else the patient shuffle of `patient_split` (medpeft 0.1).
    Returns an array of split names, one per row."""
    if not stratify or not len(labels):
        return patient_split(table["patient_id"], val_fraction, test_fraction, seed)
    shares = [test_fraction, val_fraction, 1.0 - test_fraction - val_fraction]
    return np.array(["test", "val", "train"], dtype=object)[stratified_patient_folds(table, labels, shares, seed)]


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


def read_split_ids(path: str | Path, table: pd.DataFrame, labels) -> list[str]:
    """Image ids of a split file: a medpeft split file ('# sha256: ...' header), a published list
    ('<path> <0/1 labels>', whose labels must agree with `table`), or one image name per line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: split file not found")
    lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    if lines and lines[0][0].startswith("#"):
        return read_split_file(path)
    if lines and len(lines[0]) == 1:
        return [fields[0] for fields in lines]
    listed = read_split_list(path, labels)
    try:
        wrong = label_mismatches(table, listed, labels)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    if len(wrong):
        raise DataError(f"{path}: the labels of {len(wrong)} images disagree with the dataset's, e.g. "
                        f"{wrong['image_id'].iloc[0]} (another label set, order or uncertainty policy?)")
    return listed["image_id"].tolist()


def assign_splits(table: pd.DataFrame, config: SplitConfig, source, labels=()) -> pd.DataFrame:
    """Return the table's used rows with a 'split' column, label fraction applied to train."""
    table = table.copy()
    if config.files:
        table["split"] = ""
        for name, path in config.files.items():
            ids = pd.Index(read_split_ids(path, table, labels))
            listed = table["image_id"].isin(ids)
            if listed.sum() != len(ids):
                unknown = ids.difference(table["image_id"])
                raise DataError(f"{path}: {len(unknown)} listed images are not in the dataset, e.g. {unknown[0]}")
            twice = listed & (table["split"] != "")
            if twice.any():
                raise DataError(f"{path}: image {table.loc[twice, 'image_id'].iloc[0]} is also in the "
                                f"'{table.loc[twice, 'split'].iloc[0]}' split file")
            table.loc[listed, "split"] = name
        table = table[table["split"] != ""].reset_index(drop=True)
        _check_patients(table, source)
        pool = table["split"] == "train_val"
        if pool.any():
            carved = draw_split(table[pool], labels, config.val_fraction, 0.0, config.seed, config.stratify)
            table.loc[pool, "split"] = np.where(carved == "val", "val", "train")
    elif "split" in table.columns:  # the CSV's split column, or a dataset with its own split (MedMNIST)
        bad = ~table["split"].isin(SPLITS)
        if bad.any():
            index = int(np.argmax(bad.values))
            raise DataError(f"{source}: row {index + 2}: split column '{config.column}' has "
                            f"{table['split'].iloc[index]!r}, expected one of {list(SPLITS)}")
        _check_patients(table, source, config.column)
    else:
        table["split"] = draw_split(table, labels, config.val_fraction, config.test_fraction, config.seed,
                                    config.stratify)
    if config.label_fraction < 1.0:
        train = table["split"] == "train"
        kept = label_fraction_subsets(table[train], list(labels), [config.label_fraction], config.seed)
        table = table[~train | table["image_id"].isin(kept[config.label_fraction])].reset_index(drop=True)
    for name in ("train", "val"):
        if not (table["split"] == name).any():
            raise DataError(f"{source}: the '{name}' split is empty (too few patients for the fractions?)")
    warn_rare_labels(table, labels, source)
    return table


def rare_labels(table: pd.DataFrame, labels, minimum: int = FEW_POSITIVES) -> list[tuple[str, str, int]]:
    """(label, split, positives) for every label with fewer than `minimum` positive images in a split
    that the table has (train, val, test order)."""
    found = []
    for split in SPLITS:
        rows = table[table["split"] == split]
        if len(rows):
            found += [(label, split, int((rows[label] == 1).sum())) for label in labels
                      if (rows[label] == 1).sum() < minimum]
    return found


def warn_rare_labels(table: pd.DataFrame, labels, source) -> None:
    """Warn, naming label, split and count, when a label has too few positives to learn or score on."""
    rare = rare_labels(table, labels)
    if rare:
        listed = ", ".join(f"{label} {count} in {split}" for label, split, count in rare)
        warnings.warn(f"{source}: labels with fewer than {FEW_POSITIVES} positive images in a split (their "
                      f"AUROC is unreliable or undefined): {listed}", stacklevel=3)


def _check_patients(table: pd.DataFrame, source, column: str | None = None) -> None:
    """DataError naming the first patient in two splits; given the split `column` the rows were read from
    (the table's positions: file row - 2), the column and the first two of its rows that disagree too."""
    sides = table.groupby("patient_id")["split"].nunique()
    if (sides > 1).any():
        patient = sides[sides > 1].index[0]
        rows = table.loc[table["patient_id"] == patient, "split"]
        where = ""
        if column:
            other = int(np.argmax((rows != rows.iloc[0]).to_numpy()))
            where = (f": split column '{column}' has {rows.iloc[0]!r} at row {rows.index[0] + 2} and "
                     f"{rows.iloc[other]!r} at row {rows.index[other] + 2}")
        raise DataError(f"{source}: patient {patient!r} is in more than one split "
                        f"({', '.join(sorted(rows.unique()))}){where}")
