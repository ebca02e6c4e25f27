"""``medpeft demo --generative``: the generative half of Dutt et al. 2024 on built-in phantoms, sized for
2 CPU cores. Does adapting a diffusion "foundation" to a new hospital with a PEFT method work, and how do
the methods compare with full fine-tuning?

1. Phantom chest X-rays (32 px) of two hospitals: A, and B with other patients and another exposure
   processing (a gamma curve: brighter mid-tones, less contrast).
2. The foundation: a small text-to-image diffusion model (``random:pixel-32-small``) trained on hospital
   A's images and prompts ("chest x-ray, cardiomegaly, nodule" / "... no finding"), every parameter.
3. The judge: a small ViT classifier of the findings, trained on hospital A's images and hospital B's
   training split (never B's test images), so that it knows B's look: its features measure the images,
   its head scores their findings.
4. Every generative method adapts the foundation to hospital B's training images; each adapted model
   then makes one image per hospital-B test image from its prompt, measured against the real ones with
   the judge (``medpeft generate evaluate``): FID, KID, precision / recall, copied share, label fidelity.

Every step is the ordinary command with its own folder under `out`; finished steps are reused. The
settings are the same for every method but the learning rate (one for full fine-tuning, one for the
others); the demo reports whatever they give.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from medpeft.data.phantoms import FINDINGS, generate_phantoms
from medpeft.engine import rundir

SIZE = 32
GAMMA = 0.6  # hospital B's exposure processing: grey level g -> 255 (g / 255) ** GAMMA
# The demo's budget (patients, epochs, evaluated images, sampler steps); tests pass smaller ones.
BUDGET = {"patients_a": 1500, "patients_b": 500, "foundation_epochs": 5, "judge_epochs": 8, "method_epochs": 3,
          "images": 200, "steps": 15}
METHODS = ("full", "attention", "bias", "norm", "norm_bias_attention", "lora", "svdiff", "difffit")
LR = {"full": 2e-4}  # every other method: 1e-3
DIFFUSION = {"snr_gamma": 5.0, "prompt_dropout": 0.1, "ema_decay": 0.999}
JUDGE = {"name": "vit_tiny_patch16_224", "weights": "random", "img_size": SIZE, "drop_path_rate": 0.0,
         "global_pool": "avg", "kwargs": {"depth": 4, "patch_size": 4}}


def hospital(folder: Path, patients: int, seed: int, gamma: float | None = None) -> Path:
    """Phantoms of one hospital in `folder` (labels.csv and images/), made whole beside it, then renamed."""
    csv = folder / "labels.csv"
    if csv.is_file():
        return csv
    scratch = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(scratch, ignore_errors=True)
    generate_phantoms(scratch, n_patients=patients, size=SIZE, difficulty=0.1, seed=seed)
    if gamma is not None:
        for path in sorted((scratch / "images").glob("*.png")):
            grey = np.asarray(Image.open(path), dtype=np.float64) / 255
            Image.fromarray(np.round(255 * grey ** gamma).astype(np.uint8)).save(path)
    scratch.rename(folder)
    return csv


def _data(csv: Path, test_fraction: float) -> dict:
    return {"csv": str(csv), "patient_column": "patient_id", "labels": list(FINDINGS),
            "split": {"val_fraction": 0.1, "test_fraction": test_fraction, "seed": 0}}


def judge_csv(out: Path, csv_a: Path, csv_b: Path) -> Path:
    """The judge's images: all of hospital A's and hospital B's training split (as the methods draw it), as a
    labels CSV with absolute paths (written atomically; reused)."""
    import pandas as pd

    from medpeft.config import load_data_config
    from medpeft.data import read_split_dataset
    from medpeft.files import write_text_atomic

    path = out / "judge.csv"
    if not path.is_file():
        a, b = (read_split_dataset(load_data_config(base={"data": _data(csv, test)}))
                for csv, test in ((csv_a, 0.0), (csv_b, 0.25)))
        parts = [(a, "a"), (b[b["split"] == "train"], "b")]
        rows = pd.concat([pd.DataFrame({"path": t["path"].astype(str),
                                        "patient_id": f"{h}-" + t["patient_id"].astype(str),
                                        **{f: t[f].astype(int) for f in FINDINGS}}) for t, h in parts])
        write_text_atomic(path, rows.to_csv(index=False))
    return path


def run_generative_demo(out: str | Path = "demo-generative", console: Console | None = None,
                        budget: dict | None = None) -> list[dict]:
    """Run the demo under `out`; print its table and verdict; return one row per method."""
    from medpeft.config import load_config
    from medpeft.generate.config import load_generate_config
    from medpeft.generate.evaluate import EVALUATION, generate_evaluate
    from medpeft.generate.train import generate_train
    from medpeft.train import train

    console, budget, out = console or Console(), {**BUDGET, **(budget or {})}, Path(out).resolve()
    console.rule("[bold]1. phantom chest X-rays of two hospitals")
    csv_a = hospital(out / "hospital-a", budget["patients_a"], seed=0)
    csv_b = hospital(out / "hospital-b", budget["patients_b"], seed=1, gamma=GAMMA)
    common = {"diffusion": DIFFUSION, "augment": {"enabled": False}}

    console.rule("[bold]2. the foundation: a text-to-image diffusion model of hospital A")
    foundation = out / "foundation"
    if not rundir.is_complete(foundation):
        generate_train(load_generate_config(base={
            "model": {"source": f"random:pixel-{SIZE}-small"}, "data": _data(csv_a, 0.0), **common,
            "method": {"name": "full", "components": ["unet", "text_encoder"]},
            "train": {"epochs": budget["foundation_epochs"], "batch_size": 32, "lr": 1e-3, "warmup_epochs": 0.2},
            "output_dir": str(foundation)}))

    console.rule("[bold]3. the judge: a classifier of the findings, of hospital A and B's training split")
    judge = out / "judge"
    if not rundir.is_complete(judge):
        train(load_config(base={"model": JUDGE, "data": _data(judge_csv(out, csv_a, csv_b), 0.0),
                                "method": {"name": "full"},
                                "train": {"epochs": budget["judge_epochs"], "batch_size": 64, "lr": 1e-3},
                                "output_dir": str(judge)}))

    console.rule("[bold]4. every method adapts the foundation to hospital B")
    rows = []
    for method in METHODS:
        run = out / "runs" / method
        if not rundir.is_complete(run):
            generate_train(load_generate_config(base={
                "model": {"source": str(foundation)}, "data": _data(csv_b, 0.25), **common, "method": {"name": method},
                "train": {"epochs": budget["method_epochs"], "batch_size": 32, "lr": LR.get(method, 1e-3),
                          "warmup_epochs": 0.2}, "output_dir": str(run)}), quiet=True)
        saved = run / rundir.EVALUATIONS / EVALUATION / rundir.METRICS  # a finished evaluation is reused
        result = rundir.read_json_object(saved) if saved.is_file() else generate_evaluate(
            run, judge, n=budget["images"], steps=budget["steps"], guidance=3.0)
        share = rundir.read_json_object(run / rundir.METRICS)["parameters"]["trainable_percent"]
        rows.append({"method": method, "trainable_percent": share, **result})
        console.print(f"{method}: FID {result['fid']:.3g}")
    console.print(table(rows))
    console.print(verdict(rows), highlight=False)
    return rows


def table(rows: list[dict]) -> Table:
    shown = Table(title="Phantom hospital B, 5 findings: generated vs real test images "
                        "(judge: a classifier of hospital A and B's training split)")
    for column in ("method", "trainable %", "FID", "KID", "precision", "recall", "copied %", "label fidelity"):
        shown.add_column(column, justify="left" if column == "method" else "right")
    for row in sorted(rows, key=lambda r: r["trainable_percent"]):
        fidelity = (row["label_fidelity"] or {}).get("mean_generated")
        shown.add_row(row["method"], f"{row['trainable_percent']:.3g}", f"{row['fid']:.3g}", f"{row['kid']:.3g}",
                      f"{row['precision']:.2f}", f"{row['recall']:.2f}", f"{100 * row['copied_share']:.1f}",
                      "n/a" if fidelity is None else f"{100 * fidelity:.1f}")
    return shown


def verdict(rows: list[dict]) -> str:
    """Which method made the images closest to hospital B's (lowest FID), and how many PEFT methods beat
    full fine-tuning on FID (one run each: a demonstration, not a test)."""
    best = min(rows, key=lambda r: r["fid"])
    full = next(r["fid"] for r in rows if r["method"] == "full")
    peft = [r for r in rows if r["method"] != "full"]
    better = [r["method"] for r in peft if r["fid"] < full]
    real = [v["real"] for v in rows[0]["label_fidelity"]["labels"].values() if v["real"] is not None]
    return (f"Lowest FID: {best['method']} ({best['fid']:.3g}, {best['trainable_percent']:.3g}% trainable). "
            f"{len(better)} of {len(peft)} PEFT methods reach a lower FID than full fine-tuning ({full:.3g})"
            + (f": {', '.join(better)}." if better else ".")
            + f" The judge scores hospital B's real test images at {100 * np.mean(real):.1f} mean AUROC: the "
            f"ceiling of label fidelity.")
