"""``medpeft demo``: the whole workflow on built-in phantom X-rays, in a few minutes on a CPU.

1. Generate two phantom datasets: a larger "pretraining" set with obvious findings and a small
   labelled task set of other patients with subtler ones.
2. Make a small foundation model: a ViT trained from scratch on the pretraining set to find
   three of the five findings; its weights are the checkpoint the next step loads.
3. Fine-tune that checkpoint on the small task set, all five findings (two are new to it), with
   LoRA, full fine-tuning and a linear probe, and compare them.

Every step is an ordinary ``medpeft train`` run with its own run directory; finished runs are
reused, so running the demo again only prints the table.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from medpeft.config import config_from_dict
from medpeft.data.phantoms import FINDINGS, generate_phantoms
from medpeft.train import recipe, rundir

IMAGE_SIZE = 64
MODEL = {"name": "vit_tiny_patch16_224", "img_size": IMAGE_SIZE, "drop_path_rate": 0.0, "global_pool": "avg",
         "kwargs": {"embed_dim": 96, "depth": 4, "num_heads": 3, "patch_size": 8}}
PRETRAINING_FINDINGS = ["cardiomegaly", "pleural_effusion", "consolidation"]
METHODS = {
    "lora": {"method": {"name": "lora", "r": 8, "alpha": 16, "targets": ["qkv"]}, "lr": 3e-3},
    "full": {"method": {"name": "full"}, "lr": 5e-4},
    "linear_probe": {"method": {"name": "linear_probe"}, "lr": 1e-2},
}


def _data(csv: Path, labels: list[str]) -> dict:
    return {"csv": str(csv), "patient_column": "patient_id", "labels": labels,
            "split": {"val_fraction": 0.2, "test_fraction": 0.3, "seed": 0}}


def _train(config: dict, console: Console) -> dict:
    run_dir = Path(config["output_dir"])
    if rundir.is_complete(run_dir):
        return json.loads((run_dir / rundir.METRICS).read_text())
    console.rule(f"[bold]{run_dir.name}")
    return recipe.train(config_from_dict(config))


def run_demo(out: str | Path = "demo-runs", console: Console | None = None) -> list[dict]:
    """Run the demo under `out`; returns one row per fine-tuning method."""
    console = console or Console()
    out = Path(out)
    pretraining_csv = out / "phantoms-pretraining" / "labels.csv"
    task_csv = out / "phantoms-task" / "labels.csv"
    if not pretraining_csv.is_file():
        generate_phantoms(pretraining_csv.parent, n_patients=1000, size=IMAGE_SIZE, difficulty=0.0, seed=0)
    if not task_csv.is_file():
        generate_phantoms(task_csv.parent, n_patients=120, size=IMAGE_SIZE, difficulty=0.2, seed=1)

    foundation = out / "foundation"
    _train({"model": {**MODEL, "weights": "random"}, "data": _data(pretraining_csv, PRETRAINING_FINDINGS),
            "method": {"name": "full"}, "train": {"epochs": 30, "batch_size": 32, "lr": 1e-3},
            "augment": {"scale": [0.7, 1.0]}, "output_dir": str(foundation)}, console)
    checkpoint = foundation / rundir.WEIGHTS / "adapter.safetensors"

    rows = []
    for name, setting in METHODS.items():
        metrics = _train({
            "model": {**MODEL, "weights": str(checkpoint)}, "data": _data(task_csv, list(FINDINGS)),
            "method": setting["method"], "train": {"epochs": 15, "batch_size": 16, "lr": setting["lr"]},
            "augment": {"scale": [0.7, 1.0]}, "output_dir": str(out / f"task-{name}"),
        }, console)
        rows.append({"method": name, **metrics["parameters"], "val_auroc": metrics["val"]["mean_auroc"],
                     "test_auroc": metrics["test"]["mean_auroc"], "seconds": metrics["wall_time_s"]})
    console.print(comparison_table(rows))
    console.print(f"runs in {out}/ (config.yaml, split.csv, metrics.json, weights/ in each)")
    return rows


def comparison_table(rows: list[dict]) -> Table:
    table = Table(title="Phantom X-rays, 5 findings: fine-tuning a small ViT foundation model")
    for column in ("method", "trainable", "trainable %", "val AUROC", "test AUROC", "time (s)"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        table.add_row(row["method"], f"{row['trainable']:,}", f"{row['trainable_percent']:.2f}",
                      f"{row['val_auroc']:.3f}", f"{row['test_auroc']:.3f}", f"{row['seconds']:.0f}")
    return table
