"""MedMNIST ``.npz`` files (Yang et al. 2023): ``{train,val,test}_images`` and ``_labels`` arrays.

Images live in the file, not on disk: a row's path is ``<file>::<split>:<index>``, which
medpeft.data.images.load_grayscale resolves.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from medpeft.config import DATA_FORMATS, DataConfig
from medpeft.errors import DataError

SPLITS = ("train", "val", "test")
SEPARATOR = "::"
"""A row's path is ``<file.npz>::<split>:<index>``."""


@DATA_FORMATS.register("medmnist")
@dataclass
class MedMNISTData(DataConfig):
    """A MedMNIST ``.npz`` file (data.csv): its own train / val / test split; labels are the class names
    (multiclass) or the label names (multilabel, e.g. ChestMNIST's 14)."""

    def read(self, path: str) -> pd.DataFrame:
        return read_medmnist(path, self.labels, self.task)


@lru_cache(maxsize=4)
def _arrays(path: str) -> dict:
    try:
        with np.load(path, allow_pickle=False) as data:  # no pickled objects: nothing in the file can run
            return {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise DataError(f"{path}: MedMNIST file not found") from None
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from None


def read_medmnist(path: str | Path, labels, task: str) -> pd.DataFrame:
    """The plain table of a MedMNIST file with its own train/val/test split.

    labels: the class names (multiclass: labels arrays hold one class index per image) or the label
    names (multilabel: one 0/1 column per label, e.g. ChestMNIST's 14)."""
    path = str(path)
    arrays = _arrays(path)
    parts = []
    for split in SPLITS:
        images, targets = arrays.get(f"{split}_images"), arrays.get(f"{split}_labels")
        if images is None or targets is None:
            raise DataError(f"{path}: key '{split}_images' or '{split}_labels' missing (keys: {sorted(arrays)})")
        targets = targets.reshape(len(targets), -1)
        if task == "multiclass":
            if targets.shape[1] != 1 or targets.min() < 0 or targets.max() >= len(labels):
                raise DataError(f"{path}: '{split}_labels' must hold one class index in [0, {len(labels)}) per image")
            targets = np.eye(len(labels), dtype=np.float32)[targets[:, 0]]
        elif targets.shape[1] != len(labels):
            raise DataError(f"{path}: '{split}_labels' has {targets.shape[1]} columns, data.labels names {len(labels)}")
        ids = [f"{split}:{i}" for i in range(len(images))]
        part = pd.DataFrame({"image_id": ids, "path": [f"{path}{SEPARATOR}{i}" for i in ids],
                             "patient_id": ids, "view": "", "split": split})
        for k, name in enumerate(labels):
            part[name] = targets[:, k].astype(np.float32)
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def load_array_image(reference: str) -> np.ndarray:
    """``<file>::<split>:<index>`` -> the image as uint8 (H, W) or (H, W, 3)."""
    path, _, key = reference.partition(SEPARATOR)
    split, _, index = key.partition(":")
    images = _arrays(path).get(f"{split}_images")
    if images is None or not index.isdigit() or int(index) >= len(images):
        raise DataError(f"{reference}: no such image in the MedMNIST file")
    return images[int(index)]
