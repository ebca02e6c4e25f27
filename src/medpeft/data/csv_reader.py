"""The generic labels-CSV reader: one row per image, labels as 0/1 columns or one column of names.

Returns the plain table every later step works on: ``image_id`` (the path as written in the CSV,
a stable id for split files), ``path`` (resolved), ``patient_id`` and one float column per label.
No image file is opened here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from medpeft.config import DataConfig
from medpeft.errors import DataError

TABLE_COLUMNS = ("image_id", "path", "patient_id")


def _line(index: int) -> int:
    """File line of a data row (header is line 1)."""
    return index + 2


def read_csv_dataset(config: DataConfig) -> pd.DataFrame:
    csv = Path(config.csv)
    try:
        frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise DataError(f"{csv}: labels CSV not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{csv}: not a readable CSV ({str(e).splitlines()[0]})") from None

    label_columns = [config.label_column] if config.label_column else list(config.labels)
    wanted = [config.path_column, *label_columns]
    if config.patient_column:
        wanted.append(config.patient_column)
    if config.split.column:
        wanted.append(config.split.column)
    for column in wanted:
        if column not in frame.columns:
            raise DataError(f"{csv}: column '{column}' not found (columns: {', '.join(frame.columns)})")
    if frame.empty:
        raise DataError(f"{csv}: no data rows")

    image_ids = frame[config.path_column].str.strip()
    empty = image_ids == ""
    if empty.any():
        raise DataError(f"{csv}: row {_line(int(np.argmax(empty.values)))}: empty '{config.path_column}'")
    duplicated = image_ids.duplicated()
    if duplicated.any():
        index = int(np.argmax(duplicated.values))
        raise DataError(f"{csv}: row {_line(index)}: duplicate image '{image_ids.iloc[index]}'")

    root = Path(config.image_root) if config.image_root else csv.parent
    table = pd.DataFrame({
        "image_id": image_ids,
        "path": [str(root / p) for p in image_ids],
        "patient_id": frame[config.patient_column].str.strip() if config.patient_column else image_ids,
    })
    if config.label_column:
        targets = _targets_from_names(frame[config.label_column], config, csv)
    else:
        targets = _targets_from_columns(frame, config, csv)
    for k, name in enumerate(config.labels):
        table[name] = targets[:, k]
    if config.task == "multiclass":
        counts = targets.sum(1)
        bad = counts != 1
        if bad.any():
            index = int(np.argmax(bad))
            raise DataError(f"{csv}: row {_line(index)}: a multiclass row needs exactly one label, "
                            f"got {int(counts[index])}")
    if config.split.column:
        table["split"] = frame[config.split.column].str.strip().str.lower()
    return table


def _targets_from_columns(frame: pd.DataFrame, config: DataConfig, csv: Path) -> np.ndarray:
    targets = np.zeros((len(frame), len(config.labels)), dtype=np.float32)
    for k, name in enumerate(config.labels):
        values = frame[name].str.strip()
        bad = ~values.isin(["0", "1", "0.0", "1.0"])
        if bad.any():
            index = int(np.argmax(bad.values))
            raise DataError(f"{csv}: row {_line(index)}: column '{name}' has {values.iloc[index]!r}, expected 0 or 1")
        targets[:, k] = values.astype(float).values
    return targets


def _targets_from_names(column: pd.Series, config: DataConfig, csv: Path) -> np.ndarray:
    index_of = {name: k for k, name in enumerate(config.labels)}
    negatives = set(config.negative_names)
    targets = np.zeros((len(column), len(config.labels)), dtype=np.float32)
    for row, cell in enumerate(column):
        for name in (n.strip() for n in cell.split(config.label_delimiter)):
            if name in index_of:
                targets[row, index_of[name]] = 1.0
            elif name not in negatives and name:
                raise DataError(
                    f"{csv}: row {_line(row)}: unknown label {name!r} in column '{config.label_column}' "
                    f"(expected one of {config.labels} or negatives {sorted(negatives)})")
    return targets
