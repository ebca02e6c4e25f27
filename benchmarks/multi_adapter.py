"""Many task adapters on one backbone vs one model per task: memory and prediction time.

    python benchmarks/multi_adapter.py [--model vit_base_patch16_224] [--img-size 224] [--images 32]

Four single-finding tasks (nodule, cardiomegaly, effusion, pneumothorax) are fine-tuned with LoRA (qkv,
r 8) for one epoch on phantoms from one backbone checkpoint (random ViT weights saved as a file, as a
foundation model would be). For N = 1, 2, 4 tasks, each in a fresh process:
  shared:   medpeft.load_runs(N runs) -> one backbone in memory, each task's adapter and head on it;
            medpeft.inference.predict decodes every image once and applies each task.
  separate: N x medpeft.load_run -> N full models; each predicts on its own.
Memory is the bytes of the distinct parameter and buffer tensors the loaded models hold (exact), and
the process's resident-set growth while loading (what the OS saw). Writes multi_adapter.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("nodule", "cardiomegaly", "pleural_effusion", "pneumothorax")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def tensor_mb(models) -> float:
    """MB of the distinct storages behind all parameters and buffers of `models`."""
    seen = {}
    for model in models:
        for t in (*model.parameters(), *model.buffers()):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values()) / 2**20


def measure(mode: str, run_dirs: list[str], images: str) -> dict:
    """In this process: load the runs as `mode` says, predict once to warm up, then time a prediction."""
    import torch

    import medpeft
    from medpeft.inference import predict

    torch.set_num_threads(os.cpu_count())
    before = rss_mb()
    runs = medpeft.load_runs(run_dirs) if mode == "shared" else [medpeft.load_run(d) for d in run_dirs]
    loaded = rss_mb()

    def once():
        return predict(runs, images) if mode == "shared" else [predict([run], images) for run in runs]

    once()
    start = time.perf_counter()
    once()
    return {"tensor_mb": tensor_mb([run.model for run in runs]), "rss_growth_mb": loaded - before,
            "predict_s": time.perf_counter() - start}


def prepare(work: Path, model: str, img_size: int, n_images: int) -> tuple[list[str], str]:
    """Phantoms, a backbone checkpoint file and one finished LoRA run per task (reused if present)."""
    import timm
    import torch

    import medpeft
    from medpeft.config import config_from_dict
    from medpeft.data.phantoms import generate_phantoms

    csv = work / "phantoms" / "labels.csv"
    if not csv.is_file():
        generate_phantoms(csv.parent, n_patients=n_images, images_per_patient=(1, 1), size=img_size, seed=0)
    checkpoint = work / "backbone.pth"
    if not checkpoint.is_file():
        torch.manual_seed(0)
        torch.save({"model": timm.create_model(model, num_classes=0).state_dict()}, checkpoint)
    run_dirs = []
    for task in TASKS:
        run_dir = work / "runs" / task
        if not (run_dir / "metrics.json").is_file():
            medpeft.train(config_from_dict({
                "model": {"name": model, "weights": str(checkpoint), "img_size": img_size},
                "data": {"csv": str(csv), "patient_column": "patient_id", "labels": [task],
                         "split": {"val_fraction": 0.25, "test_fraction": 0.25, "seed": 0}},
                "method": {"name": "lora", "r": 8, "alpha": 16, "targets": ["qkv"]},
                "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "warmup_epochs": 0},
                "output_dir": str(run_dir)}), quiet=True)
        run_dirs.append(str(run_dir))
    return run_dirs, str(csv.parent / "images")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=32, help="Phantom images (one per patient) to predict on.")
    parser.add_argument("--work", default=None, help="Folder for phantoms, checkpoint and runs (default: a temp dir).")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--child", nargs=3, metavar=("MODE", "RUNS", "IMAGES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, runs, images = args.child
        print(json.dumps(measure(mode, runs.split(","), images)))
        return

    work = Path(args.work or tempfile.mkdtemp(prefix="medpeft-multi-"))
    run_dirs, images = prepare(work, args.model, args.img_size, args.images)
    rows = []
    for n in (1, 2, 4):
        for mode in ("shared", "separate"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, ",".join(run_dirs[:n]), images],
                                 check=True, capture_output=True, text=True).stdout
            rows.append({"tasks": n, "mode": mode, **json.loads(out.strip().splitlines()[-1])})
            print(rows[-1], flush=True)
    adapter_mb = sum(f.stat().st_size for f in (Path(run_dirs[0]) / "weights").iterdir()) / 2**20
    record = {"command": "python benchmarks/multi_adapter.py " + " ".join(sys.argv[1:]), "model": args.model,
              "img_size": args.img_size, "images": args.images, "method": "lora r8 qkv + head",
              "adapter_file_mb": adapter_mb, "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "rows": rows}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "multi_adapter.json").write_text(json.dumps(record, indent=2) + "\n")

    by = {(r["tasks"], r["mode"]): r for r in rows}
    lines = [f"# Task adapters on one backbone vs one model per task ({args.model}, {args.img_size} px)", "",
             f"    {record['command']}", "",
             f"LoRA r 8 on qkv + head per task (adapter file {adapter_mb:.2f} MB); prediction on {args.images} "
             f"images for every task, {os.cpu_count()} CPU cores, fp32. Tensor MB: distinct parameter and "
             f"buffer storage held; RSS: the process's growth while loading. Each cell in a fresh process.", "",
             "| tasks | shared: tensor MB | separate: tensor MB | ratio | shared: RSS MB | separate: RSS MB "
             "| shared: predict s | separate: predict s | ratio |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for n in (1, 2, 4):
        s, p = by[(n, "shared")], by[(n, "separate")]
        lines.append(f"| {n} | {s['tensor_mb']:.1f} | {p['tensor_mb']:.1f} | {s['tensor_mb'] / p['tensor_mb']:.2f} "
                     f"| {s['rss_growth_mb']:.0f} | {p['rss_growth_mb']:.0f} | {s['predict_s']:.2f} "
                     f"| {p['predict_s']:.2f} | {s['predict_s'] / p['predict_s']:.2f} |")
    growth = (by[(4, "shared")]["tensor_mb"] - by[(1, "shared")]["tensor_mb"]) / 3
    lines += ["", f"Each task added to the shared backbone costs {growth:.2f} MB of tensors "
              f"(its adapter file: {adapter_mb:.2f} MB); a separate model costs "
              f"{(by[(4, 'separate')]['tensor_mb'] - by[(1, 'separate')]['tensor_mb']) / 3:.1f} MB."]
    (out_dir / "multi_adapter.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
