"""``medpeft demo``: why PEFT needs a foundation model and pays off when labels are scarce, on built-in
phantom chest X-rays, in under 10 minutes on 2 CPU cores.

1. Generate phantom X-rays of 1,200 patients (five findings as multi-labels) and split them by patient.
2. Make a foundation model without labels: MAE-pretrain a small ViT on the training images
   (``medpeft pretrain``; the test patients are never seen).
3. A study (``medpeft study run``): training from scratch, and a linear probe, full fine-tuning and LoRA
   of the MAE encoder, each with 1%, 10% and 100% of the training labels.
4. The study report (``medpeft study report``): tables, paired tests and plots of AUROC vs label fraction.

Every step is the ordinary command with its own folder under `out`; finished steps are reused, so
running the demo again only prints the table.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml
from rich.console import Console
from rich.table import Table

from medpeft.config import load_pretrain_config
from medpeft.data.phantoms import FINDINGS, generate_phantoms
from medpeft.engine import rundir
from medpeft.files import write_text_atomic
from medpeft.pretrain import MAE_CHECKPOINT, pretrain

IMAGE_SIZE = 64
PATIENTS = 1200
ENCODER = {"name": "vit_tiny_patch16_224", "img_size": IMAGE_SIZE,
           "kwargs": {"embed_dim": 96, "depth": 4, "num_heads": 3, "patch_size": 8}}
SPLIT = {"val_fraction": 0.2, "test_fraction": 0.3, "seed": 0}
MAE = {"mask_ratio": 0.75, "decoder_embed_dim": 64, "decoder_depth": 2, "decoder_num_heads": 4, "preview_every": 10}
PRETRAIN = {"epochs": 40, "batch_size": 64, "lr": 1.5e-3, "warmup_epochs": 4, "precision": "fp32"}
METHODS = {
    "scratch": {"method": {"name": "full"}, "model": {"weights": "random"}, "train": {"lr": 1e-3}},
    "linear_probe": {"train": {"lr": 1e-2, "weight_decay": 0.0}},
    "full": {"train": {"lr": 5e-4, "layer_decay": 0.75}},
    "lora": {"method": {"r": 8, "alpha": 16, "targets": ["qkv"]}, "train": {"lr": 3e-3}},
}
FRACTIONS = [0.01, 0.1, 1.0]
# Fewer labels, more epochs: each fraction gets a few hundred optimiser steps at most.
EPOCHS = {0.01: 30, 0.1: 15, 1.0: 6}


def study_spec(csv: Path, checkpoint: Path, cache: Path) -> dict:
    data = {"csv": str(csv), "patient_column": "patient_id", "labels": list(FINDINGS), "split": SPLIT,
            "cache_dir": str(cache)}
    return {
        "name": "demo-phantoms",
        "base": {"model": {**ENCODER, "weights": str(checkpoint), "global_pool": "avg", "drop_path_rate": 0.0},
                 "data": data, "train": {"batch_size": 16, "warmup_epochs": 1}, "augment": {"scale": [0.7, 1.0]}},
        "axes": {"backbone": {"phantom-mae": {}}, "dataset": {"phantoms": {}}, "method": METHODS,
                 "fraction": FRACTIONS, "seed": [0]},
        "overrides": [{"where": {"fraction": f}, "set": {"train.epochs": e}} for f, e in EPOCHS.items()],
    }


def run_demo(out: str | Path = "demo-runs", jobs: int = 2, console: Console | None = None) -> pd.DataFrame:
    """Run the demo under `out`; return the comparison (one row per method, test mean AUROC per fraction)."""
    from medpeft.study.report import REPORT, write_report
    from medpeft.study.runner import run_study

    console = console or Console()
    out = Path(out).resolve()
    csv = out / "phantoms" / "labels.csv"
    if not csv.is_file():
        console.rule("[bold]1. phantom chest X-rays")
        generate_phantoms(csv.parent, n_patients=PATIENTS, size=IMAGE_SIZE, difficulty=0.2, seed=0)

    mae_dir = out / "mae"
    if not rundir.is_complete(mae_dir):
        console.rule("[bold]2. MAE pretraining without labels")
        pretrain(load_pretrain_config(base={
            "model": ENCODER, "data": {"csv": str(csv), "patient_column": "patient_id", "split": SPLIT,
                                       "cache_dir": str(out / "cache")},
            "mae": MAE, "train": PRETRAIN, "output_dir": str(mae_dir)}))

    console.rule("[bold]3. scratch vs linear probe vs full fine-tuning vs LoRA at 1%, 10%, 100% labels")
    study_file = out / "study.yaml"
    write_text_atomic(study_file, yaml.safe_dump(
        study_spec(csv, mae_dir / MAE_CHECKPOINT, out / "cache"), sort_keys=False))
    run_study(study_file, out / "study", jobs=jobs)
    report = write_report(out / "study")
    comparison = pd.read_csv(out / "study" / REPORT / "comparison.csv")
    console.print(comparison_table(comparison))
    console.print(f"report: {report}  (and {report.with_suffix('.md').name}, figures/ beside it)")
    return comparison


def comparison_table(comparison: pd.DataFrame) -> Table:
    """The report's comparison (test mean AUROC in points per label fraction) as a console table."""
    fractions = [c.removesuffix(":mean") for c in comparison.columns if c.endswith(":mean")]
    table = Table(title="Phantom X-rays, 5 findings: test mean AUROC (points) by share of training labels")
    table.add_column("method")
    table.add_column("trainable %", justify="right")
    for fraction in fractions:
        table.add_column(fraction.rsplit(" ", 1)[-1], justify="right")
    for _, row in comparison.iterrows():
        table.add_row(row["method"], f"{row['trainable_percent']:.3g}",
                      *(f"{row[f'{f}:mean']:.1f}" for f in fractions))
    return table
