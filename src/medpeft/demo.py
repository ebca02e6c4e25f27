"""``medpeft demo``: the experiment of Lian et al. 2024 (does a foundation model make label-scarce
training work, and does LoRA match full fine-tuning?) on built-in phantom chest X-rays, sized for 2 CPU cores.

1. Generate phantom X-rays of 5,000 patients (five findings as multi-labels) and split them by patient.
2. Make a foundation model without labels: MAE-pretrain a small ViT on the training images
   (``medpeft pretrain``; the val and test patients are never seen).
3. A study (``medpeft study run``): training from scratch, and a linear probe (on standardised features, the
   MAE protocol), full fine-tuning and LoRA (rank 8 on the query and value projections, as Lian et al.
   2024) of the MAE encoder, each with 1%,
   10% and 100% of the training labels.
4. The study report (``medpeft study report``): tables, paired tests and plots of AUROC vs label fraction.
   The demo prints its table and its verdicts: LoRA vs full fine-tuning (the report's sentence), and
   each foundation-based method vs training from scratch at the fewest labels (the report's paired
   bootstrap, Holm-adjusted over the three).

Every step is the ordinary command with its own folder under `out`; finished steps are reused, so
running the demo again only prints the table. The settings are the same for every method, and the demo
reports whatever they give.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from rich.console import Console
from rich.table import Table

from medpeft.config import load_pretrain_config
from medpeft.data.phantoms import FINDINGS, generate_phantoms
from medpeft.engine import rundir
from medpeft.engine.runtime import cpu_precision
from medpeft.files import write_text_atomic
from medpeft.pretrain import MAE_CHECKPOINT, pretrain

IMAGE_SIZE = 64
PATIENTS = 5000
DIFFICULTY = 0.1
ENCODER = {"name": "vit_tiny_patch16_224", "img_size": IMAGE_SIZE,
           "kwargs": {"embed_dim": 96, "depth": 4, "num_heads": 3, "patch_size": 8}}
# Not stratified: pretraining has no labels to stratify by, and it must draw the very split the study
# draws, so that the MAE never sees the study's val and test images.
SPLIT = {"val_fraction": 0.05, "test_fraction": 0.25, "seed": 0, "stratify": False}
# Pixels as they are, not normalised per patch: the findings are changes of density over whole patches
# (opacities, fluid, a larger heart), which a per-patch mean and variance would remove from the target.
MAE = {"mask_ratio": 0.75, "norm_pix_loss": False, "decoder_embed_dim": 64, "decoder_depth": 2,
       "decoder_num_heads": 4, "preview_every": 10}
# bf16 autocast (pretraining and the cells) makes the steps cheaper on a CPU with bf16 matmul instructions; the
# time saved goes to the foundation: as many MAE epochs as the demo's 10 minutes allow there. Other CPUs only
# emulate bf16, far slower than fp32: they run the same recipe in fp32.
PRECISION = cpu_precision()
PRETRAIN = {"epochs": 30, "batch_size": 64, "lr": 1.5e-3, "warmup_epochs": 2, "precision": PRECISION}
LORA = {"r": 8, "alpha": 16, "targets": ["q", "v"]}
METHODS = {
    "scratch": {"method": {"name": "full"}, "model": {"weights": "random"}, "train": {"lr": 1e-3}},
    "linear_probe": {"method": {"norm": True}, "train": {"lr": 1e-2, "weight_decay": 0.0}},
    "full": {"train": {"lr": 5e-4, "layer_decay": 0.75}},
    "lora": {"method": LORA, "train": {"lr": 3e-3}},
}
FRACTIONS = [0.01, 0.1, 1.0]
# Fewer labels, more epochs and smaller batches: each fraction gets a few hundred optimiser steps. The 1%
# runs validate every 5th epoch: 50 validations of the val images took longer than their training.
SCHEDULE = {0.01: {"train.epochs": 50, "train.batch_size": 8, "train.eval_every": 5}, 0.1: {"train.epochs": 8},
            1.0: {"train.epochs": 4, "train.batch_size": 32}}
FOUNDATION = tuple(m for m in METHODS if m != "scratch")  # the methods that start from the MAE encoder


def study_spec(csv: Path, checkpoint: Path, cache: Path) -> dict:
    data = {"csv": str(csv), "patient_column": "patient_id", "labels": list(FINDINGS), "split": SPLIT,
            "cache_dir": str(cache)}
    return {
        "name": "demo-phantoms",
        "base": {"model": {**ENCODER, "weights": str(checkpoint), "global_pool": "avg", "drop_path_rate": 0.0},
                 "data": data, "train": {"batch_size": 16, "warmup_epochs": 1, "precision": PRECISION},
                 "augment": {"scale": [0.7, 1.0]}},
        "axes": {"backbone": {"phantom-mae": {}}, "dataset": {"phantoms": {}}, "method": METHODS,
                 "fraction": FRACTIONS, "seed": [0]},
        "overrides": [{"where": {"fraction": f}, "set": settings} for f, settings in SCHEDULE.items()],
    }


def run_demo(out: str | Path = "demo-runs", jobs: int = 2, console: Console | None = None) -> pd.DataFrame:
    """Run the demo under `out`; print its table and verdicts; return the comparison (one row per method,
    test mean AUROC per fraction)."""
    from medpeft.study.report import REPORT, write_report
    from medpeft.study.runner import run_study

    console = console or Console()
    out = Path(out).resolve()
    csv = out / "phantoms" / "labels.csv"
    if not csv.is_file():
        console.rule("[bold]1. phantom chest X-rays")
        generate_phantoms(csv.parent, n_patients=PATIENTS, size=IMAGE_SIZE, difficulty=DIFFICULTY, seed=0)

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
    for line in verdicts(out / "study"):
        console.print(line, highlight=False)
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


def verdicts(study_dir: Path) -> list[str]:
    """What the demo found, in the paper's terms and with the report's statistics.

    - LoRA vs full fine-tuning over the label fractions: the report's verdict (paired bootstrap over the
      test images, p-values adjusted across the report's comparisons).
    - Each foundation-based method vs training from scratch at the fewest labels: the difference of test
      mean AUROC (points), its paired bootstrap CI and p-value (the report's ``paired_tests``), Holm-adjusted
      over the methods compared.
    - The weakest finding of full fine-tuning with every label, and LoRA's trainable share with its reason.
    """
    from medpeft.metrics.multiple import adjust_p_values
    from medpeft.study.report import REPORT, paired_tests, verdict
    from medpeft.study.spec import ReportOptions

    results = pd.read_csv(study_dir / REPORT / "results.csv")
    pairwise = pd.read_csv(study_dir / REPORT / "pairwise.csv")
    options = ReportOptions()  # the demo's study file sets none: the report's defaults
    lines = [f"LoRA vs full fine-tuning: {verdict('lora', 'full', pairwise[pairwise['method'] == 'lora'], False)}"]

    fewest = results["fraction"].min()
    runs = results[results["fraction"] == fewest].set_index("method")["run_dir"]
    tests = {m: paired_tests([(runs[m], runs["scratch"])], list(FINDINGS), options) for m in FOUNDATION}
    adjusted = adjust_p_values(np.array([t["p_value"] for t in tests.values()]), "holm")
    parts = [f"{m} {t['difference']:+.1f} [{t['ci_low']:.1f}, {t['ci_high']:.1f}] (p {p:.2g})"
             for (m, t), p in zip(tests.items(), adjusted)]
    lines.append(f"Foundation vs scratch at {100 * fewest:g}% labels (points, 95% CI, Holm p): " + "; ".join(parts))

    full = results[(results["method"] == "full") & (results["fraction"] == results["fraction"].max())].iloc[0]
    per_label = {f: 100 * full[f"test_auroc:{f}"] for f in FINDINGS}
    weakest = min(per_label, key=per_label.get)
    lines.append(f"Full fine-tuning with every label: weakest finding {weakest} {per_label[weakest]:.1f}.")
    share = results.loc[results["method"] == "lora", "trainable_percent"].iloc[0]
    d = ENCODER["kwargs"]["embed_dim"]
    lines.append(f"LoRA trains {share:.2g}% of the encoder: rank {LORA['r']} on q and v adds 4rd parameters to a "
                 f"block of about 12d² (d = {d} here, r/3d = {100 * LORA['r'] / (3 * d):.2g}%); on the paper's "
                 f"ViT-B/16 (d = 768) the same rank trains {100 * LORA['r'] / (3 * 768):.2g}%.")
    return lines
