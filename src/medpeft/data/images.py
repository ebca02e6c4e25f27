"""Decode an image file to an 8-bit grayscale PIL image, the same way every time."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from medpeft.errors import DataError

MEDMNIST_SEPARATOR = "::"  # <file.npz>::<split>:<index>, see medpeft.data.medmnist


def load_grayscale(path: str) -> Image.Image:
    """PNG/JPEG (8 or 16 bit, gray, RGB or RGBA) or DICOM (.dcm) -> mode 'L'.

    16-bit PNG data are scaled by their bit depth; DICOM goes through medpeft.data.dicom.read_dicom."""
    if str(path).lower().endswith(".dcm"):
        from medpeft.data.dicom import read_dicom

        return Image.fromarray(read_dicom(path))
    if MEDMNIST_SEPARATOR in str(path):
        from medpeft.data.medmnist import load_array_image

        return Image.fromarray(load_array_image(str(path))).convert("L")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                pixels = np.asarray(image, dtype=np.float64)
                top = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
                return Image.fromarray(np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
            return image.convert("L")
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: unreadable image ({str(e).splitlines()[0]})") from None


def check_images(table: pd.DataFrame, on_missing: str, source) -> pd.DataFrame:
    """Open each image's header (no decoding) so a missing or unreadable file fails before training.

    on_missing 'error': raise naming the image; 'skip': drop those rows and warn with the count."""
    bad = []
    for index, image_id, path in zip(table.index, table["image_id"], table["path"]):
        if MEDMNIST_SEPARATOR in str(path):
            continue  # pixels inside the .npz file, read when the file was
        try:
            if str(path).lower().endswith(".dcm"):
                _check_dicom_header(path)
            else:
                with Image.open(path):
                    pass
        except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
            problem = "not found" if isinstance(e, FileNotFoundError) else f"not a readable image ({e})"
            if on_missing == "error":
                raise DataError(f"{source}: image {image_id}: {path} {problem} "
                                f"(data.on_missing=skip leaves such images out)") from None
            bad.append(index)
    if bad:
        warnings.warn(f"{source}: skipped {len(bad)} missing or unreadable images (data.on_missing=skip)",
                      stacklevel=2)
    return table.drop(index=bad).reset_index(drop=True)


def _check_dicom_header(path) -> None:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError as e:
        raise OSError(f"not a DICOM file ({e})") from None
