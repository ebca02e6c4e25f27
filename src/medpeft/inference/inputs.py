"""The images a finished run is applied to: files, folders (searched recursively) and PIL images, read
as grayscale; an unreadable input is reported with its reason instead of stopping the others."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from medpeft.data.images import is_dicom, load_grayscale
from medpeft.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm")


class UnreadableInputWarning(UserWarning):
    """Some inputs could not be read; they are listed in the output with the reason."""


def collect_inputs(inputs) -> list:
    """Expand folders (recursively: image files by suffix, and DICOM files without one) into sorted files;
    PIL images pass through. A path that does not exist is an error."""
    items = []
    for item in [inputs] if isinstance(inputs, (str, Path, Image.Image)) else inputs:
        if isinstance(item, Image.Image):
            items.append(item)
            continue
        path = Path(item)
        if path.is_dir():
            found = sorted(str(f) for f in path.rglob("*") if f.is_file() and (
                f.suffix.lower() in IMAGE_SUFFIXES or (not f.suffix and is_dicom(f))))
            if not found:
                raise DataError(f"{path}: no images below this folder (expected {', '.join(IMAGE_SUFFIXES)} "
                                f"or DICOM files)")
            items += found
        elif path.is_file():
            items.append(str(path))
        else:
            raise DataError(f"{path}: no such file or folder")
    return items


def read_input(item) -> Image.Image:
    """A PIL image as grayscale, or a file through medpeft.data.images.load_grayscale (DataError if unreadable)."""
    return item.convert("L") if isinstance(item, Image.Image) else load_grayscale(item)


class InputImages(Dataset):
    """Items (image tensor, error message): an unreadable input gives zeros and the reason, not an exception."""

    def __init__(self, items: list, transform, img_size: int):
        self.items, self.transform, self.img_size = items, transform, img_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        try:
            return self.transform(read_input(item)), ""
        except DataError as e:
            return torch.zeros(3, self.img_size, self.img_size), str(e)


def input_name(item, index: int) -> str:
    return f"<image {index}>" if isinstance(item, Image.Image) else str(item)


def read_batches(items: list, transform, img_size: int, batch_size: int, workers: int = 0) -> DataLoader:
    """Batches of (images (B, 3, img_size, img_size), error messages) in input order."""
    return DataLoader(InputImages(items, transform, img_size), batch_size=batch_size, num_workers=workers)


def report_unreadable(names: list[str], errors: list[str], strict: bool) -> None:
    bad = [(name, error) for name, error in zip(names, errors) if error]
    if not bad:
        return
    if strict:
        raise DataError(f"{bad[0][1]} ({len(bad)} of {len(names)} inputs unreadable; --strict)")
    warnings.warn(f"{len(bad)} of {len(names)} inputs could not be read and have no prediction (see the "
                  f"'error' column); first: {bad[0][1]}", UnreadableInputWarning, stacklevel=3)
