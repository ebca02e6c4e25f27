"""Image folders: folder-per-class datasets (``root/<class>/<image>``, as ImageFolder and Kermany's release lay
them out), and unlabelled image trees for pretraining."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from medpeft.config import DATA_FORMATS, DataConfig, check_pattern, option
from medpeft.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".bmp", ".tif", ".tiff")


def _patient_of(name: str, pattern: re.Pattern | None, path: Path, default: str) -> str:
    if pattern is None:
        return default
    match = pattern.search(name)
    if not match:
        raise DataError(f"{path}: patient_pattern {pattern.pattern!r} does not match the name")
    return match.group(1)


PATIENT_PATTERN_HELP = ("Regular expression whose first group, searched in each file name, is the patient id "
                        "(e.g. '(person\\d+)_'); default: one patient per image.")


@DATA_FORMATS.register("folder")
@dataclass
class FolderData(DataConfig):
    """Folder per class: data.csv names the root of ``<class>/`` folders (the labels); one class per image."""

    patient_pattern: str | None = option(None, PATIENT_PATTERN_HELP)

    def validate(self) -> None:
        super().validate()
        check_pattern("data.patient_pattern", self.patient_pattern)

    def read(self, path: str) -> pd.DataFrame:
        return read_folder(path, self.labels, self.patient_pattern)


@DATA_FORMATS.register("images")
@dataclass
class ImagesData(FolderData):
    """Unlabelled images: data.csv names a folder; every image below it (for ``medpeft pretrain``)."""

    def read(self, path: str) -> pd.DataFrame:
        return read_images(path, self.patient_pattern)


def read_images(root: str | Path, patient_pattern: str | None = None) -> pd.DataFrame:
    """The plain table of every image file below `root` (recursively), without labels.

    image_id is the path relative to `root`; the patient is found as in `read_folder`.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    pattern = re.compile(patient_pattern) if patient_pattern else None
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise DataError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) below this folder")
    ids = [p.relative_to(root).as_posix() for p in paths]
    return pd.DataFrame({"image_id": ids, "path": [str(p) for p in paths],
                         "patient_id": [_patient_of(p.name, pattern, p, i) for p, i in zip(paths, ids)],
                         "view": ""})


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
            patient = _patient_of(name, pattern, folder / name, f"{label}/{name}")
            rows.append((f"{label}/{name}", str(folder / name), patient, k))
    if not rows:
        raise DataError(f"{root}: no images in the class folders {list(labels)}")
    image_ids, paths, patients, classes = zip(*rows)
    table = pd.DataFrame({"image_id": image_ids, "path": paths, "patient_id": patients, "view": ""})
    onehot = np.eye(len(labels), dtype=np.float32)[list(classes)]
    for k, label in enumerate(labels):
        table[label] = onehot[:, k]
    return table
