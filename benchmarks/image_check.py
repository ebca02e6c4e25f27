"""Seconds the pre-run image check (medpeft.data.images.check_images) takes: the first check of a dataset
(every image decoded, in parallel over the CPUs) vs the same check again (results remembered per file in
image-checks.sqlite: nothing decoded), in one run.

    python benchmarks/image_check.py [--out benchmarks/results]

Images: the 5,216 real Kermany JPEGs (../shared/data/kermany-pediatric-cxr; skipped with the reason when
absent) and --png generated 1024x1024 8-bit PNGs (NIH ChestX-ray14's size; distinct content). Each
check runs with a fresh store in a temporary cache_dir; the second check must find the same problems.
Writes image_check.json and .md.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from medpeft.data.csv_reader import CSVData
from medpeft.data.images import check_images
from medpeft.files import write_json_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
KERMANY = ROOT / "../shared/data/kermany-pediatric-cxr"


def timed_checks(paths: list[str], workdir: Path) -> dict:
    table = pd.DataFrame({"image_id": paths, "path": paths})
    data = CSVData(csv="benchmark", labels=["x"], cache_dir=str(workdir / "cache"))
    start = time.perf_counter()
    first = check_images(table, data)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    second = check_images(table, data)
    warm = time.perf_counter() - start
    assert second.equals(first)
    return {"images": len(paths), "first_s": round(cold, 3), "again_s": round(warm, 3),
            "first_images_per_s": round(len(paths) / cold, 1), "speedup": round(cold / warm, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--png", type=int, default=500)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    rows, skipped = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if (KERMANY / "labels.csv").is_file():
            listed = pd.read_csv(KERMANY / "labels.csv")["path"]
            rows["Kermany JPEG (real, 224 px)"] = timed_checks([str(KERMANY / p) for p in listed], tmp / "k")
        else:
            skipped["Kermany JPEG"] = f"{KERMANY} not found"
        rng = np.random.default_rng(0)
        (tmp / "png").mkdir()
        paths = []
        for i in range(args.png):
            pixels = np.clip(rng.normal(120, 40, (64, 64)), 0, 255).astype(np.uint8)
            path = tmp / "png" / f"{i}.png"
            Image.fromarray(pixels).resize((1024, 1024), Image.Resampling.BILINEAR).save(path)
            paths.append(str(path))
        rows["PNG (generated, 1024 px)"] = timed_checks(paths, tmp / "p")
    result = {"machine": f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} CPUs",
              "rows": rows, "skipped": skipped}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "image_check.json", result)
    lines = ["# Pre-run image check: first vs again (remembered per file)", "",
             f"{result['machine']}; one run, `python benchmarks/image_check.py`.", "",
             "| images | count | first check (s) | images/s | again (s) | speed-up |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {name} | {r['images']} | {r['first_s']} | {r['first_images_per_s']} | {r['again_s']} | "
              f"{r['speedup']}x |" for name, r in rows.items()]
    lines += [f"\nSkipped: {name} ({why})" for name, why in skipped.items()]
    write_text_atomic(args.out / "image_check.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
