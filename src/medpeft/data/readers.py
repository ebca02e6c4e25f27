"""Dataset readers registered by name (``data.format``); each returns the plain table (medpeft.data.table)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd

from medpeft.config import DataConfig
from medpeft.data.chexpert import read_chexpert
from medpeft.data.csv_reader import read_csv_dataset
from medpeft.data.folder import read_folder, read_images
from medpeft.data.medmnist import read_medmnist
from medpeft.data.nih import read_nih
from medpeft.data.rsna import read_rsna
from medpeft.data.table import check_unique_ids
from medpeft.errors import DataError

# format -> reader(config, one label file)
READERS: dict[str, Callable[[DataConfig, str], pd.DataFrame]] = {
    "csv": lambda c, path: read_csv_dataset(c, path),
    "nih": lambda c, path: read_nih(path, c.image_root),
    "chexpert": lambda c, path: read_chexpert(path, c.labels, c.uncertainty, c.frontal_only, c.image_root),
    "rsna": lambda c, path: read_rsna(path, c.class_info, c.image_root),
    "folder": lambda c, path: read_folder(path, c.labels, c.patient_pattern),
    "medmnist": lambda c, path: read_medmnist(path, c.labels, c.task),
    "images": lambda c, path: read_images(path, c.patient_pattern),
}
TABLE_COLUMNS = ["image_id", "path", "patient_id", "view"]


def read_dataset(config: DataConfig) -> pd.DataFrame:
    """Read the dataset named by ``config.format`` from one label file or several (e.g. CheXpert's
    train.csv and valid.csv): the table with the configured labels, in order."""
    files = config.csv if isinstance(config.csv, list) else [config.csv]
    table = pd.concat([READERS[config.format](config, str(path)) for path in files], ignore_index=True)
    check_unique_ids(table["image_id"], " + ".join(map(str, files)))
    missing = [name for name in config.labels if name not in table.columns]
    if missing:
        raise DataError(f"{config.csv}: {config.format} data has no label {missing[0]!r}")
    if config.views is not None:
        table = table[table["view"].isin(list(config.views))].reset_index(drop=True)
        if table.empty:
            raise DataError(f"{Path(config.csv)}: no images with views {config.views}")
    extra = ["split"] if "split" in table.columns else []
    return table[TABLE_COLUMNS + extra + list(config.labels)]


def read_split_dataset(config: DataConfig) -> pd.DataFrame:
    """The dataset's used images with their 'split' (files, column or seeded draw; label fraction applied)."""
    from medpeft.data.splits import assign_splits

    return assign_splits(read_dataset(config), config.split, config.csv, config.labels)
