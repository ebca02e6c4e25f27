"""Decode an image file to an 8-bit grayscale PIL image, the same way every time."""

from __future__ import annotations

import numpy as np
from PIL import Image, UnidentifiedImageError

from medpeft.errors import DataError


def load_grayscale(path: str) -> Image.Image:
    """PNG/JPEG (8 or 16 bit, gray, RGB or RGBA) -> mode 'L'. 16-bit data are scaled by their bit depth."""
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


def check_images(paths, source: str) -> None:
    """Open each image's header (no decoding) so a missing or non-image file fails before training."""
    for row, path in enumerate(paths):
        try:
            with Image.open(path):
                pass
        except FileNotFoundError:
            raise DataError(f"{source}: row {row + 2}: image file {path} not found") from None
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{source}: row {row + 2}: {path} is not a readable image ({e})") from None
