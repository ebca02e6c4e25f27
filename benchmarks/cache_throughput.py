"""Images per second a torch DataLoader delivers: decode + resize every epoch vs the decode-once ImageCache.

    python benchmarks/cache_throughput.py [--jpeg 1000] [--png 500] [--dicom 300] [--out benchmarks/results]

Formats: (a) the real Kermany JPEGs (../shared/data/kermany-pediatric-cxr; skipped with the reason when
absent), (b) generated 1024x1024 8-bit grayscale PNGs (the size of NIH ChestX-ray14 PNGs), (c) generated
2048x2048 16-bit MONOCHROME2 DICOMs (typical CR/DX size), each read raw (load_grayscale + bilinear resize
to 224) and from an ImageCache at 224. Every item is a uint8 tensor (1, 224, 224); no augmentation.
DataLoader: batch 64, persistent workers, an untimed warm-up (one batch per worker: worker start, imports;
the files are in the page cache from the cache build), then `--repeats` timed full passes;
the median images/s is reported, and cache/raw ratios come from the same run.
Writes cache_throughput.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from medpeft.data.cache import RESIZE_METHOD, _RESAMPLE, build_cache, open_cache
from medpeft.data.images import load_grayscale

ROOT = Path(__file__).resolve().parents[1]
KERMANY = ROOT / "../shared/data/kermany-pediatric-cxr"
SIZE = 224
BATCH = 64
DISTINCT = 24  # distinct generated images; the other files are byte copies (same decode cost, fast setup)


class RawImages(Dataset):
    """Decode + resize on every access: what ImageDataset does today, minus augmentation."""

    def __init__(self, paths):
        self.paths = list(paths)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        image = load_grayscale(self.paths[i]).resize((SIZE, SIZE), _RESAMPLE, reducing_gap=None)
        return torch.from_numpy(np.array(image, dtype=np.uint8)).unsqueeze(0)


class CachedImages(Dataset):
    """Read from the memmap; opened lazily so each worker maps the file itself."""

    def __init__(self, path):
        self.path, self.cache = path, None
        self.n = len(open_cache(path))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if self.cache is None:
            self.cache = open_cache(self.path)
        return torch.from_numpy(np.array(self.cache[i])).unsqueeze(0)


def xray_like(rng, n: int, top: int) -> np.ndarray:
    """(n, n) smooth body-shaped image with a little noise, values 0..top (compresses like a radiograph)."""
    low = Image.fromarray(rng.normal(0, 1, (16, 16)).astype(np.float32), "F")
    texture = np.asarray(low.resize((n, n), Image.Resampling.BICUBIC))
    yy, xx = np.mgrid[-1:1:n * 1j, -1:1:n * 1j]
    image = 0.6 * np.exp(-((xx / 0.8) ** 2 + (yy / 0.9) ** 2) ** 2) + 0.1 * texture + rng.normal(0, 0.01, (n, n))
    image = (image - image.min()) / (image.max() - image.min())
    return (image * top).astype(np.uint16 if top > 255 else np.uint8)


def make_pngs(folder: Path, count: int, rng) -> list[str]:
    folder.mkdir()
    paths = [str(folder / f"img{i:04d}.png") for i in range(count)]
    for i, path in enumerate(paths):
        if i < DISTINCT:
            Image.fromarray(xray_like(rng, 1024, 255)).save(path)
        else:
            shutil.copyfile(paths[i % DISTINCT], path)
    return paths


def make_dicoms(folder: Path, count: int, rng) -> list[str]:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

    folder.mkdir()
    bases = [xray_like(rng, 2048, 4095) for _ in range(4)]
    paths = []
    for i in range(count):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"img{i:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID = "DX", f"p{i}"
        ds.Rows = ds.Columns = 2048
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.WindowCenter, ds.WindowWidth = 0, 1, 2048, 4096
        ds.PixelData = np.roll(bases[i % len(bases)], i, axis=1).tobytes()  # distinct content per file
        ds.save_as(ds.filename, enforce_file_format=True)
        paths.append(ds.filename)
    return paths


class Prefix(Sampler):
    """Indices 0..n-1; n is set in the main process, so persistent workers keep running between passes."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter(range(self.n))


def images_per_second(dataset, workers: int, repeats: int) -> list[float]:
    sampler = Prefix(min(len(dataset), BATCH * max(workers, 1)))
    loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler, num_workers=workers,
                        persistent_workers=workers > 0)
    for _ in loader:  # warm-up, one batch per worker: starts the workers and their imports
        pass
    sampler.n = len(dataset)
    rates = []
    for _ in range(repeats):
        start, n = time.perf_counter(), 0
        for batch in loader:
            n += batch.shape[0]
        rates.append(n / (time.perf_counter() - start))
    del loader
    return rates


def run_format(name, paths, cache_dir, workers_list, repeats, build_workers):
    print(f"{name}: {len(paths)} images", flush=True)
    start = time.perf_counter()
    cache = build_cache([f"{name}{i}" for i in range(len(paths))], paths, SIZE, cache_dir, workers=build_workers)
    build_s = time.perf_counter() - start
    raw, cached = RawImages(paths), CachedImages(cache.path)
    for i in (0, len(paths) - 1):  # both paths must deliver the same pixels
        assert torch.equal(raw[i], cached[i]), f"{name}: cache and raw decode differ at {i}"
    result = {"images": len(paths), "build_s": round(build_s, 2), "build_workers": build_workers,
              "build_images_per_s": round(len(paths) / build_s, 1), "by_workers": {}}
    for workers in workers_list:
        raw_rates = images_per_second(raw, workers, repeats)
        cache_rates = images_per_second(cached, workers, repeats)
        r, c = statistics.median(raw_rates), statistics.median(cache_rates)
        result["by_workers"][str(workers)] = {
            "raw_images_per_s": round(r, 1), "cache_images_per_s": round(c, 1), "ratio": round(c / r, 1),
            "raw_runs": [round(v, 1) for v in raw_rates], "cache_runs": [round(v, 1) for v in cache_rates]}
        print(f"  num_workers={workers}: raw {r:.1f}/s, cache {c:.1f}/s, ratio {c / r:.1f}x", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jpeg", type=int, default=1000)
    parser.add_argument("--png", type=int, default=500)
    parser.add_argument("--dicom", type=int, default=300)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    results, skipped = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        labels = KERMANY / "labels.csv"
        if labels.is_file():
            paths = [str((KERMANY / p).resolve()) for p in pd.read_csv(labels)["path"][:args.jpeg]]
            with Image.open(paths[0]) as first:  # the shared copy was resized by its uploader: say so
                label = f"jpeg (Kermany, real, {first.width}x{first.height} {first.mode})"
            results[label] = run_format(
                "jpeg", paths, tmp / "cache", args.workers, args.repeats, 2)
        else:
            skipped["jpeg"] = f"{labels} not found (the real images are not part of the repository)"
            print(f"jpeg skipped: {skipped['jpeg']}")
        results["png (generated, 1024x1024 8-bit)"] = run_format(
            "png", make_pngs(tmp / "png", args.png, rng), tmp / "cache", args.workers, args.repeats, 2)
        results["dicom (generated, 2048x2048 16-bit)"] = run_format(
            "dicom", make_dicoms(tmp / "dicom", args.dicom, rng), tmp / "cache", args.workers, args.repeats, 2)
    report = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "gpu": "none used"},
        "setup": {"size": SIZE, "resize": RESIZE_METHOD, "batch_size": BATCH, "repeats": args.repeats,
                  "statistic": "median images/s over full passes, persistent workers, warm-up one batch per worker",
                  "generated_files": f"{DISTINCT} distinct PNGs byte-copied to the count; DICOMs from 4 "
                                     "bases, column-rolled per file"},
        "formats": results, "skipped": skipped, "total_wall_s": round(time.perf_counter() - started, 1),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cache_throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# DataLoader throughput: decode every epoch vs decode-once ImageCache (224x224 uint8)", "",
             f"{os.cpu_count()} CPU cores, {platform.platform()}, Python {platform.python_version()}, "
             f"torch {torch.__version__}; batch {BATCH}, persistent workers when num_workers > 0, median of {args.repeats} full passes "
             "after a warm-up, all in one run (ratios compare figures from the same run); "
             f"total wall time {report['total_wall_s']} s.", "",
             "| format | images | num_workers | raw images/s | cache images/s | cache / raw |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        for workers, w in r["by_workers"].items():
            lines.append(f"| {name} | {r['images']} | {workers} | {w['raw_images_per_s']:.1f} | "
                         f"{w['cache_images_per_s']:.1f} | {w['ratio']:.1f}x |")
    lines += ["", "num_workers=0 reads in the training process itself; with workers, the cached rate is bounded "
              "by the DataLoader's hand-over of batches from the workers (shared memory), not by the memmap: a "
              "cache needs no loader workers, decoding does.",
              "", "Cache build (decode + resize once, not in the throughput above):", ""]
    lines += [f"- {name}: {r['build_s']} s for {r['images']} images with {r['build_workers']} workers "
              f"({r['build_images_per_s']} images/s)" for name, r in results.items()]
    lines += [f"- {name} skipped: {why}" for name, why in skipped.items()]
    (out / "cache_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
