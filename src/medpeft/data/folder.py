"""Folder-per-class datasets (``root/<class>/<image>``, as ImageFolder and Kermany's release lay them out)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from medpeft.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".bmp", ".tif", ".tiff")


def read_folder(root: str | Path, labels, patient_pattern: str | None = None) -> pd.DataFrame:
    """The plain table of ``root/<label>/*`` for each name in `labels` (one-hot, one class per image).

    image_id is ``<label>/<file name>``. patient_pattern: a regular expression whose first group,
    searched in the file name, is the patient id (e.g. ``(person\\d+)_``); default: one patient per image.
    A file the pattern does not match is an error.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    pattern = re.compile(patient_pattern) if patient_pattern else None
    rows = []
    for k, label in enumerate(labels):
        folder = root / label
        if not folder.is_dir():
            present = sorted(e.name for e in os.scandir(root) if e.is_dir())
            raise DataError(f"{folder}: class folder not found (folders: {', '.join(present)})")
        # scandir lists names without opening or stat-ing each image
        for name in sorted(e.name for e in os.scandir(folder) if e.name.lower().endswith(IMAGE_SUFFIXES)):
            if pattern:
                match = pattern.search(name)
                if not match:
                    raise DataError(f"{folder / name}: patient_pattern {patient_pattern!r} does not match the name")
                patient = match.group(1)
            else:
                patient = f"{label}/{name}"
            rows.append((f"{label}/{name}", str(folder / name), patient, k))
    if not rows:
        raise DataError(f"{root}: no images in the class folders {list(labels)}")
    image_ids, paths, patients, classes = zip(*rows)
    table = pd.DataFrame({"image_id": image_ids, "path": paths, "patient_id": patients, "view": ""})
    onehot = np.eye(len(labels), dtype=np.float32)[list(classes)]
    for k, label in enumerate(labels):
        table[label] = onehot[:, k]
    return table
