"""NIH ChestX-ray14 (Wang et al. 2017): ``Data_Entry_2017.csv`` (2017 release or the v2020 relabel)
and the official split lists ``train_val_list.txt`` / ``test_list.txt``.

All 112,120 images are kept by default (every view, every follow-up): filtering is explicit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from medpeft.data.labels import NIH_LABELS, NIH_NO_FINDING
from medpeft.data.splits import patient_split
from medpeft.data.table import check_unique_ids, names_to_targets, read_table_file, require_columns
from medpeft.errors import DataError



def read_nih(data_entry: str | Path, image_dir: str | Path | None = None, views=None) -> pd.DataFrame:
    """The plain table of ``Data_Entry_2017*.csv``; 'No Finding' is all zeros.

    image_dir: folder holding the PNGs (default: an ``images`` folder beside the CSV).
    views: keep only these View Position values (e.g. ``["PA"]``); None keeps all.
    """
    data_entry = Path(data_entry)
    frame = read_table_file(data_entry, "NIH Data_Entry file")
    require_columns(frame, ["Image Index", "Finding Labels", "Patient ID", "View Position"], data_entry)
    image_ids = frame["Image Index"].str.strip()
    check_unique_ids(image_ids, data_entry)
    targets = names_to_targets(frame["Finding Labels"], NIH_LABELS, [NIH_NO_FINDING], "|", data_entry, "Finding Labels")
    root = Path(image_dir) if image_dir else data_entry.parent / "images"
    patients = frame["Patient ID"].str.strip()
    if not patients.str.isdigit().all():
        raise DataError(f"{data_entry}: column 'Patient ID' must hold integers")
    table = pd.DataFrame({
        "image_id": image_ids,
        "path": [str(root / i) for i in image_ids],
        "patient_id": patients.astype(int).astype(str),  # 2017 writes 00000001, v2020 writes 1
        "view": frame["View Position"].str.strip(),
    })
    for k, name in enumerate(NIH_LABELS):
        table[name] = targets[:, k]
    if views is not None:
        table = table[table["view"].isin(list(views))].reset_index(drop=True)
    return table


def read_image_list(path: str | Path) -> list[str]:
    """A file of image names, one per line (blank lines and surrounding spaces ignored)."""
    try:
        return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise DataError(f"{path}: image list not found") from None


def nih_official_split(table: pd.DataFrame, train_val_list: str | Path, test_list: str | Path,
                       val_fraction: float = 0.1, seed: int = 0) -> pd.DataFrame:
    """Assign the official split: test from `test_list`; a patient-disjoint validation set of about
    `val_fraction` of the train_val images, drawn with `seed`; the rest train."""
    test = set(read_image_list(test_list))
    train_val = set(read_image_list(train_val_list))
    for listed, path in ((test, test_list), (train_val, train_val_list)):
        missing = listed - set(table["image_id"])
        if missing and len(table) > 0:
            raise DataError(f"{path}: {len(missing)} listed images are not in the table, e.g. {sorted(missing)[0]}")
    table = table.copy()
    table["split"] = np.where(table["image_id"].isin(test), "test",
                              np.where(table["image_id"].isin(train_val), "train", ""))
    leaked = set(table.loc[table["split"] == "test", "patient_id"]) & set(
        table.loc[table["split"] == "train", "patient_id"])
    if leaked:
        raise DataError(f"{test_list}: patient {sorted(leaked)[0]} is in both the test and the train_val list")
    pool = table["split"] == "train"
    table.loc[pool, "split"] = np.where(
        patient_split(table.loc[pool, "patient_id"], val_fraction, 0.0, seed) == "val", "val", "train")
    return table[table["split"] != ""].reset_index(drop=True)
