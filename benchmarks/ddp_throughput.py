"""Training throughput of `medpeft train` in 1 process vs N data-parallel processes (torch DDP), with
the model FLOP utilisation against the measured matmul peak of the dtype.

    python benchmarks/ddp_throughput.py [--model vit_small_patch16_224] [--processes 1,2] [--methods full,lora]
                                        [--images 96] [--batch 16] [--precision fp32] [--repeats 2]
                                        [--work /tmp/ddp-bench] [--out benchmarks/results]

Setup: generated 224 px PNGs (bright / dark squares, 2 labels), random-init --model, one epoch of
--images training images at global batch --batch, each cell a fresh `medpeft train ... --devices P`
(CPU: P gloo processes; the machine's cores are shared out, so on a 2-core CPU 2 processes get 1
thread each where 1 process gets 2; GPU: one process per GPU, NCCL). Cells are interleaved across
repeats (P=1, P=2, P=1, ...) and the faster repeat is kept: the machine may be shared.
  * images/s: training images of the epoch / seconds of its training loop (the last step log's
    running rate: from the epoch's start, data loading and the first step included).
  * FLOPs: one training step (forward + backward) of the model with the method, counted by
    torch.utils.flop_counter.FlopCounterMode (matmul / conv / attention; elementwise ops and the
    optimiser left out); GFLOP/s = images/s x FLOPs per image.
  * peak: the best of 5 square matmuls (4096, CPU; 8192, GPU) in the dtype of --precision, with all
    the machine's threads; MFU = GFLOP/s / peak.
Writes ddp_throughput.json (raw figures, machine, command) and ddp_throughput.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from medpeft.config import config_from_dict  # noqa: E402
from medpeft.engine import rundir  # noqa: E402
from medpeft.engine.assemble import build_model  # noqa: E402
from medpeft.files import write_json_atomic, write_text_atomic  # noqa: E402

METHODS = {"full": {"name": "full"}, "lora": {"name": "lora", "r": 8, "targets": ["qkv"]}}


def write_images(root: Path, n: int, size: int = 224) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    rows = ["path,bright,dark"]
    for i in range(n):
        bright, dark = (int(v) for v in rng.integers(0, 2, 2))
        image = rng.normal(110, 25, (size, size))
        image[20:80, 20:80] += 90 * bright
        image[-80:-20, -80:-20] -= 70 * dark
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / f"{i:04d}.png")
        rows.append(f"{i:04d}.png,{bright},{dark}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


def run_config(args, csv: Path, method: str, out: Path) -> dict:
    # Half of the images train; val and test a quarter each (both needed by a run).
    return {"model": {"name": args.model, "weights": "random", "img_size": 224, "drop_path_rate": 0.0},
            "data": {"csv": str(csv), "labels": ["bright", "dark"],
                     "split": {"val_fraction": 0.25, "test_fraction": 0.25, "seed": 0}},
            "method": METHODS[method],
            "train": {"epochs": 1, "batch_size": args.batch, "eval_batch_size": 32, "precision": args.precision,
                      "warmup_epochs": 0, "log_every_steps": 1},
            "output_dir": str(out)}


def flops_per_image(config: dict) -> float:
    """Counted FLOPs of one training step (forward + backward) per image, in this process."""
    model = build_model(config_from_dict(config)).model.train()
    x = torch.randn(2, 3, 224, 224)
    with FlopCounterMode(display=False) as counter:
        model(x).float().sum().backward()
    return counter.get_total_flops() / len(x)


def matmul_peak_gflops(precision: str) -> float:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = 8192 if device == "cuda" else 4096
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(6):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def run_cell(config_path: Path, processes: int) -> float:
    """Images/s of the epoch's training loop of one fresh `medpeft train` run."""
    out = Path(yaml.safe_load(config_path.read_text())["output_dir"])
    command = [sys.executable, "-m", "medpeft", "train", str(config_path), "--devices", str(processes)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    steps = [json.loads(line) for line in (out / rundir.LOG).read_text().splitlines() if '"event": "step"' in line]
    return steps[-1]["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--methods", default="full,lora")
    parser.add_argument("--images", type=int, default=96, help="training images (the data set is twice as many)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ddp-bench"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    processes = [int(p) for p in args.processes.split(",")]
    methods = args.methods.split(",")

    csv = write_images(args.work / "images", 2 * args.images)
    peak = matmul_peak_gflops(args.precision)
    results = []
    for method in methods:
        flops = flops_per_image(run_config(args, csv, method, args.work / "unused"))
        best = {}
        for repeat in range(args.repeats):
            for p in processes:
                out = args.work / f"{method}-p{p}-r{repeat}"
                subprocess.run(["rm", "-rf", str(out)], check=True)
                path = args.work / f"{method}-p{p}-r{repeat}.yaml"
                path.write_text(yaml.safe_dump(run_config(args, csv, method, out)))
                ips = run_cell(path, p)
                print(f"{method} processes={p} repeat={repeat}: {ips:.2f} images/s", flush=True)
                best[p] = max(best.get(p, 0.0), ips)
        for p in processes:
            gflops = best[p] * flops / 1e9
            results.append({"method": method, "processes": p, "images_per_s": round(best[p], 2),
                            "vs_1_process": round(best[p] / best[processes[0]], 3),
                            "gflop_per_image": round(flops / 1e9, 2), "gflop_per_s": round(gflops, 1),
                            "mfu": round(gflops / peak, 3)})

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    meta = {"command": " ".join(sys.argv), "model": args.model, "precision": args.precision, "batch": args.batch,
            "train_images": args.images, "device": device, "platform": platform.platform(),
            "torch": torch.__version__, "matmul_peak_gflop_per_s": round(peak, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "ddp_throughput.json", {**meta, "results": results})
    lines = [f"# Data-parallel training throughput: {args.model}, 224 px, global batch {args.batch}, "
             f"{args.precision}, {device}", "",
             f"`{meta['command']}`; matmul peak {peak:.0f} GFLOP/s ({args.precision}). Each cell is one fresh "
             f"`medpeft train --devices P` run of one epoch of {args.images} images; best of {args.repeats} "
             f"interleaved repeats.", "",
             "| method | processes | images/s | vs 1 process | GFLOP / image (train step) | GFLOP/s | MFU |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r['method']} | {r['processes']} | {r['images_per_s']:.2f} | {r['vs_1_process']:.2f} | "
                     f"{r['gflop_per_image']:.1f} | {r['gflop_per_s']:.0f} | {100 * r['mfu']:.0f}% |")
    write_text_atomic(args.out / "ddp_throughput.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
