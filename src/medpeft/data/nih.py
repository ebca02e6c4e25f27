"""NIH ChestX-ray14 (Wang et al. 2017): ``Data_Entry_2017.csv`` (2017 release or the v2020 relabel)
and the official split lists ``train_val_list.txt`` / ``test_list.txt``.

Subgroup columns: meta:sex ('Patient Gender', F/M), meta:age ('Patient Age': '058Y' in 2017, with a few
in months (M) or days (D), plain years in v2020; binned by data.age_bins, as written: the 2017 file has
ages above 400 years, which v2020 corrects) and meta:view ('View Position', PA/AP).

All 112,120 images are kept by default (every view, every follow-up): filtering is explicit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from medpeft.config import DATA_FORMATS, DataConfig, option
from medpeft.config.sections import AGE_BINS
from medpeft.data.labels import NIH_LABELS, NIH_NO_FINDING
from medpeft.data.table import (
    META_PREFIX,
    bin_ages,
    check_unique_ids,
    keep_views,
    names_to_targets,
    read_table_file,
    require_columns,
)
from medpeft.errors import DataError


@DATA_FORMATS.register("nih")
@dataclass
class NIHData(DataConfig):
    """NIH ChestX-ray14: data.csv is ``Data_Entry_2017.csv`` or ``Data_Entry_2017_v2020.csv``; the 14
    findings in the standard order."""

    image_root: str | None = option(None, "Folder of the PNGs (default: images/ beside the CSV).")
    views: list[str] | None = option(None, "Keep only these View Position values (e.g. [PA]); None keeps all.")

    def default_labels(self) -> tuple[str, ...]:
        return NIH_LABELS

    def known_labels(self) -> tuple[str, ...]:
        return NIH_LABELS

    def subgroups(self) -> list[str]:
        return ["sex", "age", "view"]

    def read(self, path: str) -> pd.DataFrame:
        return keep_views(read_nih(path, self.image_root, self.age_bins), self.views, path)


def read_nih(data_entry: str | Path, image_dir: str | Path | None = None, age_bins=AGE_BINS) -> pd.DataFrame:
    """The plain table of ``Data_Entry_2017*.csv``; 'No Finding' is all zeros; meta:sex, meta:age (groups of
    `age_bins`) and meta:view.

    image_dir: folder holding the PNGs (default: an ``images`` folder beside the CSV).
    """
    data_entry = Path(data_entry)
    frame = read_table_file(data_entry, "NIH Data_Entry file")
    require_columns(frame, ["Image Index", "Finding Labels", "Patient ID", "View Position", "Patient Age",
                            "Patient Gender"], data_entry)
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
    table[META_PREFIX + "sex"] = frame["Patient Gender"].str.strip()
    table[META_PREFIX + "age"] = bin_ages(frame["Patient Age"], age_bins,
                                          lambda i: f"{data_entry}: row {i + 2}: column 'Patient Age'")
    table[META_PREFIX + "view"] = table["view"]
    return table
