"""The generic labels-CSV reader: one row per image, labels as 0/1 columns or one column of names.

Returns the plain table (see medpeft.data.table); ``image_id`` is the path as written in the CSV.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from medpeft.config import DATA_FORMATS, DataConfig, option
from medpeft.data.table import check_unique_ids, first_row, names_to_targets, read_table_file, require_columns
from medpeft.errors import DataError


@DATA_FORMATS.register("csv")
@dataclass
class CSVData(DataConfig):
    """Any labels CSV: an image path column, 0/1 label columns or one column of names ('A|B'), optional
    patient and split columns."""

    split_column = True
    image_root: str | None = option(None, "Folder the image paths are relative to (default: the CSV's folder).")
    path_column: str = option("path", "Column of image paths.", required=True)
    patient_column: str | None = option(None, "Patient id column: a patient's images stay on one side of a "
                                        "split; default: one patient per row.")
    label_column: str | None = option(None, "One column of delimited label names per row ('A|B'); unset: each "
                                      "label is a 0/1 column.")
    label_delimiter: str = option("|", "Separator of the names in label_column.", required=True)
    negative_names: list[str] = option(["No Finding"], "Names in label_column meaning 'none of the labels' "
                                       "(multilabel tasks).")

    def read(self, path: str) -> pd.DataFrame:
        return read_csv_dataset(self, path)


def read_csv_dataset(config: CSVData, path: str | Path | None = None) -> pd.DataFrame:
    """The plain table of the labels CSV at `path` (default: ``config.csv``)."""
    csv = Path(path or config.csv)
    frame = read_table_file(csv, "labels CSV")
    label_columns = [config.label_column] if config.label_column else list(config.labels)
    optional = [c for c in (config.patient_column, config.split.column) if c]
    require_columns(frame, [config.path_column, *label_columns, *optional], csv)
    if frame.empty:
        raise DataError(f"{csv}: no data rows")

    image_ids = frame[config.path_column].str.strip()
    if (image_ids == "").any():
        raise DataError(f"{csv}: row {first_row(image_ids == '')}: empty '{config.path_column}'")
    check_unique_ids(image_ids, csv)

    root = Path(config.image_root) if config.image_root else csv.parent
    table = pd.DataFrame({
        "image_id": image_ids,
        "path": [str(root / p) for p in image_ids],
        "patient_id": frame[config.patient_column].str.strip() if config.patient_column else image_ids,
        "view": "",
    })
    if config.label_column:
        targets = names_to_targets(frame[config.label_column], config.labels, config.negative_names,
                                   config.label_delimiter, csv, config.label_column)
    else:
        targets = _targets_from_columns(frame, config.labels, csv)
    if config.task == "multiclass":
        counts = targets.sum(1)
        if (counts != 1).any():
            row = first_row(counts != 1)
            raise DataError(f"{csv}: row {row}: a multiclass row needs exactly one label, got {int(counts[row - 2])}")
    for k, name in enumerate(config.labels):
        table[name] = targets[:, k]
    if config.split.column:
        table["split"] = frame[config.split.column].str.strip().str.lower()
    return table


def _targets_from_columns(frame: pd.DataFrame, labels, csv: Path) -> np.ndarray:
    targets = np.zeros((len(frame), len(labels)), dtype=np.float32)
    for k, name in enumerate(labels):
        values = frame[name].str.strip()
        bad = ~values.isin(["0", "1", "0.0", "1.0"])
        if bad.any():
            row = first_row(bad)
            raise DataError(f"{csv}: row {row}: column '{name}' has {values.iloc[row - 2]!r}, expected 0 or 1")
        targets[:, k] = values.astype(float).to_numpy()
    return targets
