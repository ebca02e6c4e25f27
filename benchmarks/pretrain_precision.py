"""MAE pretraining step time in fp32 vs bf16 autocast, measured in one process, interleaved.

    python benchmarks/pretrain_precision.py [--model vit_small_patch16_224] [--img-size 224] [--batch 16]

One MAE training step (forward, backward, AdamW) of the medical recipe (mask ratio 0.9, decoder 512 x 8)
per measurement, as `medpeft pretrain` runs it in each precision (freed memory kept for reuse; bf16 on the
CPU: timm's attention without the fused kernel); fp32 and bf16 alternate so machine noise hits both alike;
the ratio of the medians is the figure. Writes pretrain_precision.json and .md to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from medpeft import accel
from medpeft.accel.memory import reuse_freed_memory
from medpeft.config import TrainConfig, load_pretrain_config
from medpeft.engine.runtime import EMULATED_BF16, autocast, cpu_bf16_matmul
from medpeft.pretrain.recipe import build_mae

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    if not cpu_bf16_matmul():
        raise SystemExit(f"bf16: {EMULATED_BF16}")
    torch.set_num_threads(os.cpu_count())
    reuse_freed_memory()
    config = load_pretrain_config(base={"model": {"name": args.model, "img_size": args.img_size},
                                        "data": {"format": "images", "csv": "."}, "output_dir": "-"})
    model = build_mae(config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size)
    device = torch.device("cpu")

    def step(precision: str) -> float:
        accel.apply(model, "vit", TrainConfig(precision=precision, device="cpu"), device)  # the attention kernel
        start = time.perf_counter()
        with autocast(device, precision):
            loss, _, _ = model(images, config.mae.mask_ratio)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times = {"fp32": [], "bf16": []}
    for precision in times:  # warm-up
        step(precision)
    for _ in range(args.repeats):
        for precision in times:
            times[precision].append(step(precision))
    median = {p: statistics.median(t) for p, t in times.items()}
    record = {"model": args.model, "img_size": args.img_size, "batch": args.batch,
              "mask_ratio": config.mae.mask_ratio, "threads": torch.get_num_threads(), "seconds": times,
              "median_s": median, "bf16_speedup": median["fp32"] / median["bf16"]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pretrain_precision.json").write_text(json.dumps(record, indent=2) + "\n")
    text = (f"# MAE pretraining step, fp32 vs bf16 autocast (CPU)\n\n"
            f"`python benchmarks/pretrain_precision.py`: {args.model} at {args.img_size} px, batch {args.batch}, "
            f"mask ratio {config.mae.mask_ratio}, decoder {config.mae.decoder_embed_dim} x {config.mae.decoder_depth}, "
            f"{torch.get_num_threads()} threads, {args.repeats} interleaved steps each (medians).\n\n"
            f"| precision | step (s) | images/s |\n| --- | ---: | ---: |\n"
            + "".join(f"| {p} | {m:.3f} | {args.batch / m:.1f} |\n" for p, m in median.items())
            + f"\nbf16 / fp32 speed-up: {record['bf16_speedup']:.2f}x\n")
    (out / "pretrain_precision.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
