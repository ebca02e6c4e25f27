"""Train the same short LoRA and full fine-tuning runs in fp32, bf16 and fp16 (fp16: CUDA only) on
built-in phantoms and report validation AUROC and training throughput per precision.

    python benchmarks/precision_check.py [--device cuda] [--out benchmarks/results]

Writes precision_<device>.json and .md. Checks that every precision trains end to end on the
device and how far the reduced-precision AUROC lands from fp32 on the same split and seed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from medpeft.config import config_from_dict
from medpeft.data.phantoms import FINDINGS, generate_phantoms
from medpeft.train import recipe


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--patients", type=int, default=300)
    args = parser.parse_args()
    precisions = ["fp32", "bf16"] + (["fp16"] if args.device.startswith("cuda") else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        csv = generate_phantoms(Path(tmp) / "phantoms", n_patients=args.patients, size=64, difficulty=0.0, seed=0)
        for method in ({"name": "full"}, {"name": "lora", "r": 8}):
            for precision in precisions:
                metrics = recipe.train(config_from_dict({
                    "model": {"name": args.model, "weights": "random", "img_size": 64,
                              "global_pool": "avg", "kwargs": {"patch_size": 8}},
                    "data": {"csv": str(csv), "patient_column": "patient_id", "labels": list(FINDINGS)},
                    "method": method,
                    "train": {"epochs": args.epochs, "batch_size": 32, "lr": 5e-4, "precision": precision,
                              "device": args.device},
                    "output_dir": f"{tmp}/{method['name']}-{precision}",
                }), quiet=True)
                log = [json.loads(line) for line in open(f"{tmp}/{method['name']}-{precision}/log.jsonl")]
                seconds = sum(r["seconds"] for r in log if r["event"] == "epoch")
                rows.append({"method": method["name"], "precision": precision,
                             "val_auroc": metrics["val"]["mean_auroc"], "test_auroc": metrics["test"]["mean_auroc"],
                             "train_images_per_s": metrics["split_sizes"]["train"] * args.epochs / seconds})
                print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "cuda" if args.device.startswith("cuda") else "cpu"
    device_name = torch.cuda.get_device_name() if name == "cuda" else "CPU"
    (out / f"precision_{name}.json").write_text(json.dumps({"device": device_name, "rows": rows}, indent=2))
    lines = [f"# Precision check on {device_name} ({args.model}, 64 px, {args.patients} phantom patients, "
             f"{args.epochs} epochs)", "", f"`{' '.join(sys.argv)}`", "",
             "| method | precision | val mean AUROC | test mean AUROC | test - fp32 | train images/s |",
             "| --- | --- | --- | --- | --- | --- |"]
    fp32 = {r["method"]: r["test_auroc"] for r in rows if r["precision"] == "fp32"}
    lines += [f"| {r['method']} | {r['precision']} | {r['val_auroc']:.4f} | {r['test_auroc']:.4f} | "
              f"{r['test_auroc'] - fp32[r['method']]:+.4f} | {r['train_images_per_s']:.0f} |" for r in rows]
    (out / f"precision_{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
