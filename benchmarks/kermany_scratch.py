"""Pneumonia vs normal on the real pediatric chest X-rays (../shared/data/kermany-pediatric-cxr):
one `medpeft train` run of configs/kermany-pneumonia-vit-scratch.yaml, a small ViT from random init.

    python benchmarks/kermany_scratch.py [--out benchmarks/results]

Writes kermany_scratch.json and .md: validation / test AUROC, wall time, peak memory, the command.
Skips (exit 0, with the reason) when the data folder is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/kermany-pneumonia-vit-scratch.yaml"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    data = ROOT / "../shared/data/kermany-pediatric-cxr/labels.csv"
    if not data.is_file():
        print(f"skipped: {data} not found (the real images are not part of the repository)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "medpeft", "train", CONFIG, "--out", f"{tmp}/run"]
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True)
        wall = time.perf_counter() - start
        metrics = json.loads(Path(f"{tmp}/run/metrics.json").read_text())
    result = {
        "command": f"medpeft train {CONFIG}",
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, no GPU",
        "wall_time_s": round(wall, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
        "split_sizes": metrics["split_sizes"],
        "best_epoch": metrics["best_epoch"],
        "val_auroc": metrics["val"]["mean_auroc"],
        "test_auroc": metrics["test"]["mean_auroc"],
        "trainable_parameters": metrics["parameters"]["trainable"],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kermany_scratch.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "kermany_scratch.md").write_text(
        "# Kermany pediatric CXR, pneumonia vs normal, small ViT from random init\n\n"
        f"`{result['command']}` on {result['machine']}\n\n"
        "| images train / val / test | val AUROC | test AUROC | best epoch | wall time | peak RSS |\n"
        "| --- | --- | --- | --- | --- | --- |\n"
        f"| {' / '.join(str(v) for v in result['split_sizes'].values())} | {result['val_auroc']:.4f} | "
        f"{result['test_auroc']:.4f} | {result['best_epoch']} | {result['wall_time_s']:.0f} s | "
        f"{result['peak_rss_mb']} MB |\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
