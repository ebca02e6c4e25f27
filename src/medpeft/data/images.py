"""Decode an image file to an 8-bit grayscale PIL image, the same way every time."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from medpeft.data.medmnist import SEPARATOR as MEDMNIST_SEPARATOR, load_array_image
from medpeft.errors import DataError

MIN_SIDE = 8
"""Smaller images are refused: a radiograph, even a MedMNIST thumbnail (28 px), is larger."""
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def load_grayscale(path: str) -> Image.Image:
    """PNG/JPEG/TIFF (8 or 16 bit, gray, RGB, or RGBA without transparency) or DICOM (.dcm) -> mode 'L'.

    16-bit PNG data are scaled by their bit depth; DICOM goes through medpeft.data.dicom.read_dicom.
    Stacks of frames (a CT volume), images under MIN_SIDE pixels and transparent pixels raise DataError."""
    if is_dicom(path):
        from medpeft.data.dicom import read_dicom

        return _checked_size(Image.fromarray(read_dicom(path)), path)
    if MEDMNIST_SEPARATOR in str(path):
        return Image.fromarray(load_array_image(str(path))).convert("L")
    try:
        with Image.open(path) as image:
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                raise DataError(f"{path}: a stack of {frames} frames (a volume?), expected one 2-D radiograph")
            image.load()
            _checked_size(image, path)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                pixels = np.asarray(image, dtype=np.float64)
                top = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
                return Image.fromarray(np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
            if "A" in image.getbands() and image.getchannel("A").getextrema()[0] < 255:
                raise DataError(f"{path}: has transparent pixels ({image.mode}); expected an opaque "
                                f"grayscale or RGB image")
            return image.convert("L")
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: unreadable image ({str(e).splitlines()[0]})") from None


def is_dicom(path) -> bool:
    """A .dcm file, or a file of any name with the DICOM preamble's 'DICM' mark (PACS exports often have no suffix)."""
    if str(path).lower().endswith(".dcm"):
        return True
    if MEDMNIST_SEPARATOR in str(path) or str(path).lower().endswith(_IMAGE_SUFFIXES):
        return False
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _checked_size(image: Image.Image, path) -> Image.Image:
    if min(image.size) < MIN_SIDE:
        raise DataError(f"{path}: {image.size[0]}x{image.size[1]} pixels, expected an image of at least "
                        f"{MIN_SIDE}x{MIN_SIDE}")
    return image


def check_images(table: pd.DataFrame, on_missing: str, source) -> pd.DataFrame:
    """Open each image's header (no decoding) so a missing or unreadable file fails before training.

    on_missing 'error': raise naming the image; 'skip': drop those rows and warn with the count."""
    bad = []
    for index, image_id, path in zip(table.index, table["image_id"], table["path"]):
        if MEDMNIST_SEPARATOR in str(path):
            continue  # pixels inside the .npz file, read when the file was
        try:
            if is_dicom(path):
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
