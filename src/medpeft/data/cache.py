"""Decode-once image cache: every image decoded and resized a single time into one uint8 memmap.

Layout of ``cache_dir/<key>/``: ``images.u8`` (raw uint8, shape (N, size, size), C order) and
``index.json`` (format version, size, resize method, N, ordered image_ids, key).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

from medpeft.data.images import in_blocks, load_grayscale
from medpeft.errors import DataError
from medpeft.files import atomic_directory

FORMAT_VERSION = 1
# Part of the key: changing the resampling changes the pixels, so it must give another cache.
RESIZE_METHOD = "PIL.Image.Resampling.BILINEAR,reducing_gap=None"
_RESAMPLE = Image.Resampling.BILINEAR


class ImageCache:
    """Read-only store of N grayscale images, each (size, size) uint8; ``image_ids`` is a list of str."""

    def __init__(self, path):
        self.path = Path(path)
        index_file, images_file = self.path / "index.json", self.path / "images.u8"
        try:
            index = json.loads(index_file.read_text())
            self.size, n, ids = int(index["size"]), int(index["n"]), list(index["image_ids"])
            self.key = index["key"]
        except FileNotFoundError:
            raise DataError(f"{index_file}: image cache index not found") from None
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{index_file}: corrupt image cache index ({e})") from None
        if index.get("format_version") != FORMAT_VERSION or index.get("resize_method") != RESIZE_METHOD:
            raise DataError(f"{index_file}: image cache written by another format or resize method")
        if len(ids) != n:
            raise DataError(f"{index_file}: {len(ids)} image_ids for n={n}")
        expected = n * self.size * self.size
        actual = images_file.stat().st_size if images_file.is_file() else None
        if actual != expected:
            raise DataError(f"{images_file}: {actual} bytes, expected {expected} ({n} x {self.size} x {self.size}); "
                            "the cache is truncated or corrupt, delete its folder to rebuild it")
        # np.memmap cannot map an empty file.
        self._images = (np.memmap(images_file, np.uint8, "r", shape=(n, self.size, self.size)) if n
                        else np.zeros((0, self.size, self.size), np.uint8))
        self._images.flags.writeable = False
        self.image_ids = ids
        self._positions = None

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getstate__(self) -> dict:
        # DataLoader workers reopen the memmap by path instead of receiving a copy of its pages.
        return {"path": str(self.path)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def __getitem__(self, i: int) -> np.ndarray:
        """Image i as a read-only (size, size) uint8 view of the memmap."""
        return self._images[i]

    def index_of(self, image_id) -> int:
        """Position of image_id (ids are stored as str; the first one wins if repeated)."""
        if self._positions is None:
            self._positions = {image_id: i for i, image_id in reversed(list(enumerate(self.image_ids)))}
        try:
            return self._positions[str(image_id)]
        except KeyError:
            raise KeyError(f"image_id {image_id!r} is not in the cache at {self.path}") from None


def open_cache(path) -> ImageCache:
    """Open an existing cache folder; DataError if it is missing, truncated or corrupt."""
    return ImageCache(path)


def cache_key(image_ids, paths, size: int) -> str:
    """First 16 hex chars of sha256 over format version, resize method, size and (image_id, path) pairs."""
    ids, paths = [str(i) for i in image_ids], [str(p) for p in paths]
    if len(ids) != len(paths):
        raise ValueError(f"{len(ids)} image_ids but {len(paths)} paths")
    # JSON encoding keeps pair boundaries unambiguous, whatever characters ids and paths contain.
    payload = json.dumps([FORMAT_VERSION, RESIZE_METHOD, int(size), list(zip(ids, paths))])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _decode(paths, size: int, alpha: str) -> np.ndarray:
    """Paths -> (len(paths), size, size) uint8; module-level so worker processes can run it."""
    out = np.empty((len(paths), size, size), np.uint8)
    for j, path in enumerate(paths):
        out[j] = np.asarray(load_grayscale(path, alpha).resize((size, size), _RESAMPLE, reducing_gap=None))
    return out


def build_cache(image_ids, paths, size: int, cache_dir, workers: int = 1, progress: bool = False,
                alpha: str = "error") -> ImageCache:
    """Open ``cache_dir/<key>`` if it exists, else decode every image once (load_grayscale with `alpha`) and
    write it atomically. `alpha` is not part of the key: it changes only images that medpeft.data.images.
    check_images refuses under the other policy."""
    image_ids, paths = [str(i) for i in image_ids], [str(p) for p in paths]
    key = cache_key(image_ids, paths, size)
    final = Path(cache_dir) / key
    if (final / "index.json").is_file():
        return ImageCache(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(final, replace=False) as tmp:  # another process's complete copy wins
        n = len(paths)
        if n:
            images = np.memmap(tmp / "images.u8", np.uint8, "w+", shape=(n, size, size))
            _fill(images, paths, size, workers, progress, alpha)
            images.flush()
            del images
        else:
            (tmp / "images.u8").touch()
        index = {"format_version": FORMAT_VERSION, "size": int(size), "resize_method": RESIZE_METHOD,
                 "n": n, "image_ids": image_ids, "key": key}
        (tmp / "index.json").write_text(json.dumps(index))
    return ImageCache(final)


def _fill(images: np.memmap, paths, size: int, workers: int, progress: bool, alpha: str) -> None:
    """Decode paths into images (N, size, size); blocks come back in order and the parent writes them."""
    for start, block in in_blocks(_decode, paths, (size, alpha), workers, "image cache", progress):
        images[start:start + len(block)] = block
