"""Train the same runs in fp32, bf16 and fp16 (fp16: CUDA only) and report test AUROC and training
throughput per precision: does reduced precision train as well as fp32?

    python benchmarks/precision_check.py [--data phantoms|kermany] [--device cuda] [--out benchmarks/results]

`--data phantoms` (default): built-in phantom X-rays, full fine-tuning and LoRA of a randomly initialised
ViT. `--data kermany`: the real pediatric chest X-rays in ../shared/data (pneumonia vs normal, the
patient-level split of studies/kermany-mae.yaml), with an encoder that has learnt something: a ViT-tiny
MAE-pretrained on the training images (studies/kermany-mae-pretrain.yaml, --pretrain-epochs, fp32; a
finished pretraining run in --work is reused), then full fine-tuning and LoRA of it as in that study.
Every run of one method has the same seed, split and settings; only train.precision differs. Writes
precision_<data>_<device>.json and .md (phantoms on the CPU: precision_cpu.*). Skips (exit 0) when the
Kermany data folder is absent.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from medpeft.config import config_from_dict, load_pretrain_config
from medpeft.data.phantoms import FINDINGS, generate_phantoms
from medpeft.pretrain.recipe import pretrain
from medpeft.engine.runtime import EMULATED_BF16, cpu_bf16_matmul
from medpeft.train import train

ROOT = Path(__file__).resolve().parents[1]
KERMANY = ROOT / "../shared/data/kermany-pediatric-cxr/labels.csv"


def phantom_runs(args, tmp: Path) -> list[dict]:
    csv = generate_phantoms(tmp / "phantoms", n_patients=args.patients, size=64, difficulty=0.0, seed=0)
    base = {"model": {"name": args.model, "weights": "random", "img_size": 64, "global_pool": "avg",
                      "kwargs": {"patch_size": 8}},
            "data": {"csv": str(csv), "patient_column": "patient_id", "labels": list(FINDINGS)},
            "train": {"epochs": args.epochs, "batch_size": 32, "lr": 5e-4}}
    return [{**base, "method": {"name": "full"}}, {**base, "method": {"name": "lora", "r": 8}}]


def kermany_runs(args, work: Path) -> list[dict]:
    """MAE-pretrain the encoder once (reused when finished), then its full fine-tuning and LoRA runs."""
    mae = work / "precision-mae-pretrain"
    if not (mae / "metrics.json").is_file():
        pretrain(load_pretrain_config(ROOT / "studies/kermany-mae-pretrain.yaml", [
            f"data.csv={KERMANY}", f"data.cache_dir={work / 'cache'}", f"train.epochs={args.pretrain_epochs}",
            f"train.device={args.device}", f"output_dir={mae}"]), quiet=True)
    base = {"model": {"name": "vit_tiny_patch16_224", "weights": str(mae / "mae.pth"), "img_size": 64,
                      "drop_path_rate": 0.0, "global_pool": "avg", "kwargs": {"depth": 4, "patch_size": 8}},
            "data": {"csv": str(KERMANY), "patient_column": "patient_id", "label_column": "label",
                     "labels": ["PNEUMONIA"], "negative_names": ["NORMAL"], "cache_dir": str(work / "cache"),
                     "split": {"val_fraction": 0.15, "test_fraction": 0.15, "seed": 0}},
            "augment": {"scale": [0.5, 1.0]}}
    train = {"epochs": args.epochs, "batch_size": 64, "warmup_epochs": 1, "weight_decay": 0.05}
    return [{**base, "method": {"name": "full"}, "train": {**train, "lr": 5e-4, "layer_decay": 0.75}},
            {**base, "method": {"name": "lora", "r": 8, "alpha": 16, "targets": ["qkv"]},
             "train": {**train, "lr": 3e-3}}]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="phantoms", choices=["phantoms", "kermany"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--epochs", type=int, help="fine-tuning epochs (default: phantoms 6, kermany 4)")
    parser.add_argument("--model", default="vit_small_patch16_224", help="phantoms: the randomly initialised ViT")
    parser.add_argument("--patients", type=int, default=300, help="phantoms: patients generated")
    parser.add_argument("--pretrain-epochs", type=int, default=20, help="kermany: MAE pretraining epochs")
    parser.add_argument("--work", type=Path, default=ROOT / "studies-out", help="kermany: pretraining run, cache")
    args = parser.parse_args()
    args.epochs = args.epochs or (6 if args.data == "phantoms" else 4)
    if args.data == "kermany" and not KERMANY.is_file():
        print(f"skipped: {KERMANY} not found (the real images are not part of the repository)")
        return
    if args.device == "cpu" and not cpu_bf16_matmul():
        raise SystemExit(f"bf16: {EMULATED_BF16}")
    precisions = ["fp32", "bf16"] + (["fp16"] if args.device.startswith("cuda") else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = phantom_runs(args, Path(tmp)) if args.data == "phantoms" else kermany_runs(args, args.work)
        for run in runs:
            method = run["method"]["name"]
            for precision in precisions:
                out = f"{tmp}/{method}-{precision}"
                metrics = train(config_from_dict({
                    **run, "train": {**run["train"], "precision": precision, "device": args.device},
                    "output_dir": out}), quiet=True)
                log = [json.loads(line) for line in open(f"{out}/log.jsonl")]
                seconds = sum(r["seconds"] for r in log if r["event"] == "epoch")
                rows.append({"method": method, "precision": precision,
                             "val_auroc": metrics["val"]["mean_auroc"], "test_auroc": metrics["test"]["mean_auroc"],
                             "train_images_per_s": metrics["split_sizes"]["train"] * args.epochs / seconds})
                print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    name = f"precision_{device}" if args.data == "phantoms" else f"precision_{args.data}_{device}"
    device_name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    what = (f"{args.model}, 64 px, {args.patients} phantom patients, random init" if args.data == "phantoms" else
            f"real pediatric X-rays, pneumonia vs normal; ViT-tiny MAE-pretrained {args.pretrain_epochs} epochs")
    (out / f"{name}.json").write_text(json.dumps({"device": device_name, "command": " ".join(sys.argv),
                                                  "rows": rows}, indent=2))
    lines = [f"# Precision check on {device_name} ({what}, {args.epochs} epochs)", "",
             f"`{' '.join(sys.argv)}`", "",
             "| method | precision | val mean AUROC | test mean AUROC | test - fp32 | train images/s | vs fp32 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    fp32 = {r["method"]: r for r in rows if r["precision"] == "fp32"}
    lines += [f"| {r['method']} | {r['precision']} | {r['val_auroc']:.4f} | {r['test_auroc']:.4f} | "
              f"{r['test_auroc'] - fp32[r['method']]['test_auroc']:+.4f} | {r['train_images_per_s']:.0f} | "
              f"{r['train_images_per_s'] / fp32[r['method']]['train_images_per_s']:.2f}x |" for r in rows]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
