"""Read the dataset a DataConfig names: its format's reader over each label file, as one plain table
(medpeft.data.table), with the configured labels in order and, on request, its split."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from medpeft.config import DataConfig
from medpeft.data.splits import assign_splits
from medpeft.data.table import META_PREFIX, check_unique_ids
from medpeft.errors import DataError

TABLE_COLUMNS = ["image_id", "path", "patient_id", "view"]


def read_dataset(config: DataConfig) -> pd.DataFrame:
    """Read the dataset from one label file or several (e.g. CheXpert's train.csv and valid.csv)."""
    files = config.csv if isinstance(config.csv, list) else [config.csv]
    table = pd.concat([config.read(str(path)) for path in files], ignore_index=True)
    check_unique_ids(table["image_id"], " + ".join(map(str, files)))
    missing = [name for name in config.labels if name not in table.columns]
    if missing:
        raise DataError(f"{Path(files[0])}: {config.format} data has no label {missing[0]!r}")
    extra = ["split"] if "split" in table.columns else []
    metadata = [c for c in table.columns if c.startswith(META_PREFIX)]
    return table[TABLE_COLUMNS + extra + list(config.labels) + metadata]


def read_split_dataset(config: DataConfig) -> pd.DataFrame:
    """The dataset's used images with their 'split' (files, column or seeded draw; label fraction applied)."""
    return assign_splits(read_dataset(config), config.split, config.csv, config.labels)
