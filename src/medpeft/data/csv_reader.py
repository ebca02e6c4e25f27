"""The generic labels-CSV reader: one row per image, labels as 0/1 columns or one column of names.

Returns the plain table (see medpeft.data.table); ``image_id`` is the path as written in the CSV.
"""

from __future__ import annotations

import codecs
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from medpeft.config import DATA_FORMATS, DataConfig, option
from medpeft.data.table import (
    META_PREFIX,
    bin_ages,
    keep_views,
    names_to_targets,
    read_table_file,
    require_columns,
)
from medpeft.errors import ConfigError, DataError


@DATA_FORMATS.register("csv")
@dataclass
class CSVData(DataConfig):
    """Any labels CSV: an image path column, 0/1 label columns or one column of names ('A|B'), optional
    patient, view, split and metadata columns."""

    split_column = True
    image_root: str | None = option(None, "Folder the image paths are relative to (default: the CSV's folder).")
    encoding: str = option("utf-8", "The CSV's text encoding (a Python codec name: utf-8, latin-1, cp1252, "
                           "...); a UTF-8 byte-order mark is allowed.", required=True)
    path_column: str = option("path", "Column of image paths.", required=True)
    patient_column: str | None = option(None, "Patient id column: a patient's images stay on one side of a "
                                        "split; default: one patient per row.")
    label_column: str | None = option(None, "One column of delimited label names per row ('A|B'); unset: each "
                                      "label is a 0/1 column.")
    label_delimiter: str = option("|", "Separator of the names in label_column; names are stripped of spaces, "
                                  "so ',' also reads 'A, B'. Quote it in YAML and --set: '|', ', '.")
    negative_names: list[str] | Literal["rest"] = option(
        ["No Finding"], "Names in label_column meaning 'none of the labels' (any other name that is not a "
        "label is an error), or 'rest': every name that is not a label is negative.")
    on_duplicate: Literal["error", "first", "drop"] = option(
        "error", "An image listed on several rows: 'error' (naming both rows and patients), keep the 'first' "
        "row, or 'drop' every row of it (both with a warning giving the count).")
    view_column: str | None = option(None, "Column of the view (PA, AP, LL, ...) of each image, for views "
                                     "and the per-view counts of data inspect.")
    views: list[str] | None = option(None, "Keep only these values of view_column (e.g. [PA]); None keeps all.")
    metadata_columns: list[str] = option([], "Columns carried through unchanged to split.csv and "
                                         "predictions.csv (as meta:NAME), not reported per subgroup.")
    subgroup_columns: list[str] = option([], "Columns carried like metadata_columns (stripped of surrounding "
                                         "spaces; blank = unknown) and reported per subgroup in every "
                                         "evaluation, e.g. sex, site, scanner; a column is in one of the two "
                                         "lists.")
    age_column: str | None = option(None, "Column of ages in years (58, 58.5; or DICOM ages: 058Y, 006M), "
                                    "carried in groups of data.age_bins as meta:age and reported per subgroup.")

    def validate(self) -> None:
        super().validate()
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ConfigError(f"data.encoding: unknown text encoding {self.encoding!r} (e.g. utf-8, latin-1, "
                              f"cp1252)") from None
        if not self.label_delimiter:
            raise ConfigError("data.label_delimiter must not be empty (quote it: label_delimiter: '|')")
        if self.views is not None and not self.view_column:
            raise ConfigError("data.views needs data.view_column: the column the views are read from")
        names = [*self.metadata_columns, *self.subgroup_columns, *(["age"] if self.age_column else [])]
        twice = next((name for name in names if names.count(name) > 1), None)
        if twice is not None:
            raise ConfigError(f"data.metadata_columns / subgroup_columns / age_column: meta:{twice} is named twice "
                              f"(a column is carried by one of the two lists; age_column's groups are meta:age)")

    def subgroups(self) -> list[str]:
        return [*self.subgroup_columns, *(["age"] if self.age_column else [])]

    def read(self, path: str) -> pd.DataFrame:
        return read_csv_dataset(self, path)


def read_csv_dataset(config: CSVData, path: str | Path | None = None) -> pd.DataFrame:
    """The plain table of the labels CSV at `path` (default: ``config.csv``)."""
    csv = Path(path or config.csv)
    frame = read_table_file(csv, "labels CSV", encoding=config.encoding)
    label_columns = [config.label_column] if config.label_column else list(config.labels)
    optional = [c for c in (config.patient_column, config.view_column, config.split.column, config.age_column) if c]
    require_columns(frame, [config.path_column, *label_columns, *optional, *config.metadata_columns,
                            *config.subgroup_columns], csv)
    if frame.empty:
        raise DataError(f"{csv}: no data rows")
    frame.index = frame.index + 2  # file lines (header = line 1), kept through row selection
    frame[config.path_column] = frame[config.path_column].str.strip()
    empty = frame[config.path_column] == ""
    if empty.any():
        raise DataError(f"{csv}: row {frame.index[np.argmax(empty.to_numpy())]}: empty '{config.path_column}'")
    frame = _deduplicated(frame, config, csv)

    image_ids = frame[config.path_column]
    root = Path(config.image_root) if config.image_root else csv.parent
    table = pd.DataFrame({
        "image_id": image_ids,
        "path": [str(root / p) for p in image_ids],
        "patient_id": frame[config.patient_column].str.strip() if config.patient_column else image_ids,
        "view": frame[config.view_column].str.strip() if config.view_column else "",
    })
    if config.label_column:
        negatives = None if config.negative_names == "rest" else config.negative_names
        targets = names_to_targets(frame[config.label_column].reset_index(drop=True), config.labels, negatives,
                                   config.label_delimiter, csv, config.label_column, rows=frame.index)
    else:
        targets = _targets_from_columns(frame, config.labels, csv)
    if config.task == "multiclass":
        counts = targets.sum(1)
        if (counts != 1).any():
            k = int(np.argmax(counts != 1))
            raise DataError(f"{csv}: row {frame.index[k]}: a multiclass row needs exactly one label, "
                            f"got {int(counts[k])}")
    for k, name in enumerate(config.labels):
        table[name] = targets[:, k]
    for name in config.metadata_columns:
        table[META_PREFIX + name] = frame[name]
    for name in config.subgroup_columns:
        table[META_PREFIX + name] = frame[name].str.strip()
    if config.age_column:
        table[META_PREFIX + "age"] = bin_ages(frame[config.age_column], config.age_bins,
                                              lambda i: f"{csv}: row {frame.index[i]}: column '{config.age_column}'")
    if config.split.column:
        table["split"] = frame[config.split.column].str.strip().str.lower()
    return keep_views(table.reset_index(drop=True), config.views, csv)


def _deduplicated(frame: pd.DataFrame, config: CSVData, csv: Path) -> pd.DataFrame:
    """The rows left by data.on_duplicate when an image is listed on several rows."""
    ids = frame[config.path_column]
    repeated = ids.duplicated(keep=False)
    if not repeated.any():
        return frame
    again = ids.duplicated().to_numpy()
    row = frame.index[np.argmax(again)]
    first = frame.index[np.argmax((ids == ids[row]).to_numpy())]
    if config.on_duplicate == "error":
        whose = (f" (patients {frame.at[first, config.patient_column]!r} and "
                 f"{frame.at[row, config.patient_column]!r})" if config.patient_column else "")
        raise DataError(f"{csv}: row {row}: image '{ids[row]}' is listed again, first at row {first}{whose}; "
                        f"data.on_duplicate: first keeps the first row, drop leaves the image out")
    keep = ~again if config.on_duplicate == "first" else ~repeated.to_numpy()
    warnings.warn(f"{csv}: {int(ids[repeated].nunique())} images are listed on several rows (e.g. '{ids[row]}' "
                  f"at rows {first} and {row}): data.on_duplicate={config.on_duplicate} "
                  f"{'kept the first row of each' if config.on_duplicate == 'first' else 'left them out'}",
                  stacklevel=3)
    if not keep.any():
        raise DataError(f"{csv}: no rows left after data.on_duplicate=drop")
    return frame[keep]


def _targets_from_columns(frame: pd.DataFrame, labels, csv: Path) -> np.ndarray:
    targets = np.zeros((len(frame), len(labels)), dtype=np.float32)
    for k, name in enumerate(labels):
        values = frame[name].str.strip()
        bad = ~values.isin(["0", "1", "0.0", "1.0"])
        if bad.any():
            row = frame.index[np.argmax(bad.to_numpy())]
            raise DataError(f"{csv}: row {row}: column '{name}' has {values[row]!r}, expected 0 or 1")
        targets[:, k] = values.astype(float).to_numpy()
    return targets
