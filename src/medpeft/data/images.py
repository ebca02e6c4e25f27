"""Decode an image file to an 8-bit grayscale PIL image, the same way every time, and check before a run
that every image it will use decodes by those rules."""

from __future__ import annotations

import os
import sqlite3
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from rich.console import Console

from medpeft.config import DataConfig
from medpeft.console import progress_bar
from medpeft.data.medmnist import SEPARATOR as MEDMNIST_SEPARATOR, load_array_image
from medpeft.data.splits import SPLITS
from medpeft.errors import DataError
from medpeft.version import __version__

MIN_SIDE = 8
"""Smaller images are refused: a radiograph, even a MedMNIST thumbnail (28 px), is larger."""
MAX_LISTED = 50
"""Unusable images named in one message; more are counted."""
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def load_grayscale(path: str, alpha: str = "error") -> Image.Image:
    """PNG/JPEG/TIFF (8 or 16 bit, gray, RGB or with an alpha channel) or DICOM (.dcm) -> mode 'L'.

    16-bit PNG data are scaled by their bit depth; DICOM goes through medpeft.data.dicom.read_dicom.
    Transparent pixels: `alpha` 'error' raises DataError, 'flatten' composites the image onto black.
    Stacks of frames (a CT volume), images under MIN_SIDE pixels and images over PIL's decompression-bomb
    limit (Image.MAX_IMAGE_PIXELS) raise DataError, as does any file that does not decode whole."""
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
            if image.mode == "P":
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            if "A" in image.getbands() and image.getchannel("A").getextrema()[0] < 255:
                if alpha == "flatten":
                    black = Image.new("RGBA", image.size, (0, 0, 0, 255))
                    return Image.alpha_composite(black, image.convert("RGBA")).convert("L")
                raise DataError(f"{path}: has transparent pixels ({image.mode}); expected an opaque grayscale "
                                f"or RGB image (data.alpha=flatten puts them on black)")
            return image.convert("L")
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
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


def image_problem(path: str, alpha: str = "error") -> str:
    """'' if `path` decodes by load_grayscale's rules, else why not (one line, without the path)."""
    try:
        load_grayscale(path, alpha)
    except DataError as e:
        return str(e).removeprefix(f"{path}: ")
    return ""


def check_images(table: pd.DataFrame, data: DataConfig, progress: bool = False) -> pd.DataFrame:
    """Decode every image of the table by the rules training uses, so that no image fails mid-run.

    data.on_missing 'error': one DataError listing every image that cannot be used, with its reason;
    'skip': the table without them, and one warning listing them with the count per split (each list
    stops after MAX_LISTED images, giving the number of the others).
    Results are remembered per file (path, size, modification time, data.alpha) in
    ``image-checks.sqlite`` under data.cache_dir (default: the user's cache folder), so a second check of
    unchanged files decodes nothing."""
    paths = table["path"].astype(str).tolist()
    problems = _CheckStore(data.cache_dir).problems(paths, data.alpha, progress)
    bad = np.array([bool(p) for p in problems], dtype=bool)
    if not bad.any():
        return table
    found = [f"{path}: {problem}" for path, problem in zip(np.array(paths)[bad], np.array(problems)[bad])]
    listed = "; ".join(found[:MAX_LISTED])
    if len(found) > MAX_LISTED:
        listed += f"; and {len(found) - MAX_LISTED} more"
    if bad.all() and all(problem == "image file not found" for problem in problems):
        listed += " (no image was found: do the paths start where data.image_root says?)"
    if data.on_missing == "error":
        raise DataError(f"{data.csv}: {int(bad.sum())} of {len(table)} images cannot be used "
                        f"(data.on_missing=skip leaves them out): {listed}")
    counts = ""
    if "split" in table.columns:
        per_split = table.loc[bad, "split"].value_counts()
        counts = " (" + ", ".join(f"{name} {per_split[name]}" for name in SPLITS if name in per_split) + ")"
    warnings.warn(f"{data.csv}: skipped {int(bad.sum())} of {len(table)} images{counts} that cannot be used "
                  f"(data.on_missing=skip): {listed}", stacklevel=2)
    return table[~bad].reset_index(drop=True)


class _CheckStore:
    """Remembered check results: (path, size, mtime_ns, rules) -> problem ('' = fine)."""

    def __init__(self, cache_dir: str | None):
        root = Path(cache_dir) if cache_dir else \
            Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medpeft"
        self.file = root / "image-checks.sqlite"

    def problems(self, paths: list[str], alpha: str, progress: bool) -> list[str]:
        rules = f"{__version__},alpha={alpha}"
        stamps = [_stamp(p) for p in paths]
        known = self._read(rules)
        todo = [i for i, (p, s) in enumerate(zip(paths, stamps)) if s is not None and (p, *s) not in known]
        found = dict(zip(todo, _decode_all([paths[i] for i in todo], alpha, progress)))
        if found:
            self._write(rules, [(paths[i], *stamps[i], found[i]) for i in todo])
        return [found[i] if i in found else known[(p, *s)] if s is not None else _unstamped_problem(p, alpha)
                for i, (p, s) in enumerate(zip(paths, stamps))]

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.file, timeout=60)
        db.execute("CREATE TABLE IF NOT EXISTS checks (path TEXT, size INTEGER, mtime_ns INTEGER, rules TEXT, "
                   "problem TEXT, PRIMARY KEY (path, size, mtime_ns, rules))")
        return db

    def _read(self, rules: str) -> dict:
        if not self.file.is_file():
            return {}
        try:
            with self._connect() as db:
                rows = db.execute("SELECT path, size, mtime_ns, problem FROM checks WHERE rules = ?", (rules,))
                return {(p, size, mtime): problem for p, size, mtime, problem in rows}
        except sqlite3.Error as e:
            raise DataError(f"{self.file}: not a readable image-check store ({e}); delete it to start "
                            f"afresh") from None

    def _write(self, rules: str, rows: list[tuple]) -> None:
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as db:
                db.executemany("INSERT OR REPLACE INTO checks VALUES (?, ?, ?, ?, ?)",
                               [(p, size, mtime, rules, problem) for p, size, mtime, problem in rows])
        except (OSError, sqlite3.Error) as e:
            warnings.warn(f"{self.file}: image checks not remembered ({e}); the next run checks again",
                          stacklevel=3)


def _stamp(path: str) -> tuple[int, int] | None:
    """(size, mtime_ns) of a file (None: no file to remember, e.g. a missing file or a MedMNIST array)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def _unstamped_problem(path: str, alpha: str) -> str:
    # A MedMNIST image's pixels were checked when its .npz file was read.
    return "" if MEDMNIST_SEPARATOR in path else image_problem(path, alpha)


def _problems(paths: list[str], alpha: str) -> list[str]:
    """image_problem of each path; module-level so worker processes can run it."""
    return [image_problem(p, alpha) for p in paths]


def _decode_all(paths: list[str], alpha: str, progress: bool) -> list[str]:
    """image_problem of every path, in parallel over this process's CPUs when there are many."""
    workers = min(len(os.sched_getaffinity(0)), max(1, len(paths) // 64))
    return [problem for _, block in in_blocks(_problems, paths, (alpha,), workers, "checking images", progress)
            for problem in block]


def in_blocks(function, paths: list[str], args: tuple, workers: int, description: str, progress: bool):
    """Yield (start, function(block, *args)) for consecutive blocks of `paths`, in order: computed in
    `workers` processes (`function` must be module-level), or here for one; a progress bar counts paths."""
    chunk = max(1, min(64, len(paths) // (max(workers, 1) * 4)))
    starts = range(0, len(paths), chunk)
    blocks = [paths[s:s + chunk] for s in starts]
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        results = pool.map(function, blocks, *([a] * len(blocks) for a in args)) if pool else \
            (function(block, *args) for block in blocks)
        with progress_bar(Console(stderr=True, quiet=not progress)) as bar:
            task = bar.add_task(description, total=len(paths))
            for start, result in zip(starts, results):
                yield start, result
                bar.advance(task, len(result))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
