"""Generative PEFT on the real pediatric chest X-rays (issue 32): a small text-to-image diffusion model
pretrained on the phantoms is adapted to the Kermany X-rays (64 px; prompts "chest x-ray, normal" /
"... bacteria" / "... virus") with every generative method, and each adapted model is measured.

    OMP_NUM_THREADS=1 python benchmarks/generate_kermany.py [--work studies-out/generate-kermany] \
        [--jobs 2] [--out benchmarks/results] [--scale 1.0] [--mae-epochs 40] \
        [--foundation-epochs 3] [--epochs 2] [--steps 10]

Steps, each a medpeft command as a user runs it, reused when finished (run the same command again to
resume after a kill):
1. Phantoms (5 findings, 64 px) and the foundation: ``medpeft generate train`` of ``random:pixel-64-small``,
   every parameter of the UNet and the text encoder, on the phantoms' prompts.
   At the same time, the judge's foundation: ``medpeft pretrain studies/kermany-mae-pretrain.yaml`` (the
   Kermany MAE ViT-tiny, labels unused; --mae-epochs shortens the 80-epoch recipe, warmup scaled, bf16 where
   the CPU has bf16 matmul instructions, else fp32, as every step).
2. The judge: ``medpeft train`` of that MAE (the split it drew, unstratified, so the judge's test images
   are ones the MAE never saw) fully fine-tuned on normal / bacteria / virus with every training label.
3. Per method (full, attention, bias, norm, norm_bias_attention, lora, svdiff, difffit; one hand-picked
   learning rate for full fine-tuning and one for the others, not tuned): ``medpeft generate train`` from
   the foundation on the Kermany training split, then ``medpeft generate evaluate`` against the judge
   (FID, KID, precision / recall vs the real test images; memorisation vs the training images; label
   fidelity), then usefulness: ``medpeft generate sample --like val`` (a synthetic copy of the val split's
   label mix), a classifier trained on it alone and on it with the real val images, each evaluated on the
   real test images, against the classifier trained on the real val images alone.

Writes generate_kermany.json and generate_kermany.md. Skips (exit 0, saying why) without the data.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import yaml

from medpeft.engine.runtime import cpu_name, cpu_precision

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "../shared/data/kermany-pediatric-cxr/labels.csv"
PRETRAIN = "studies/kermany-mae-pretrain.yaml"  # the split it draws is KERMANY's (unstratified, seed 0)
FULL_EPOCHS, FULL_WARMUP = 80, 5
CLASSES = ["normal", "bacteria", "virus"]
SPLIT = {"val_fraction": 0.15, "test_fraction": 0.15, "seed": 0, "stratify": False}
KERMANY = {"csv": str(DATA), "patient_column": "patient_id", "split": SPLIT, "label_column": "subtype",
           "labels": CLASSES, "task": "multiclass", "cache_dir": str(ROOT / "studies-out/cache")}
FINDINGS = ["cardiomegaly", "pleural_effusion", "nodule", "consolidation", "pneumothorax"]
METHODS = {"full": 2e-4, "attention": 1e-3, "bias": 1e-3, "norm": 1e-3, "norm_bias_attention": 1e-3, "lora": 1e-3,
           "svdiff": 1e-3, "difffit": 1e-3}
DIFFUSION = {"snr_gamma": 5.0, "prompt_dropout": 0.1, "ema_decay": 0.999}
PRECISION = cpu_precision()  # of every training step; recorded in the JSON
JUDGE_MODEL = {"name": "vit_tiny_patch16_224", "img_size": 64, "drop_path_rate": 0.0, "global_pool": "avg",
               "kwargs": {"depth": 4, "patch_size": 8}}


def medpeft(*args: str) -> None:
    print("$ medpeft", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "medpeft", *args], cwd=ROOT, check=True)


def done(run: Path) -> bool:
    return (run / "metrics.json").is_file()


def write_config(path: Path, config: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def foundation(work: Path, scale: float, epochs: int) -> Path:
    from medpeft.data.phantoms import generate_phantoms

    csv = work / "phantoms" / "labels.csv"
    if not csv.is_file():
        generate_phantoms(csv.parent, n_patients=round(3000 * scale), size=64, seed=0)
    run = work / "foundation"
    if not done(run):
        medpeft("generate", "train", str(write_config(work / "foundation.yaml", {
            "model": {"source": "random:pixel-64-small"},
            "data": {"csv": str(csv), "patient_column": "patient_id", "labels": FINDINGS,
                     "split": {"val_fraction": 0.05, "test_fraction": 0.0, "seed": 0}},
            "method": {"name": "full", "components": ["unet", "text_encoder"]}, "diffusion": DIFFUSION,
            "train": {"epochs": max(1, round(epochs * scale)), "batch_size": 32, "lr": 1e-3, "warmup_epochs": 0.2,
                      "precision": PRECISION},
            "output_dir": str(run)})))
    return run


def mae(work: Path, epochs: int) -> Path:
    """The Kermany MAE in <work>/mae-pretrain (reused when finished): the recipe of PRETRAIN, shortened to
    ``epochs`` with the warmup scaled, in PRECISION."""
    run = work / "mae-pretrain"
    if not done(run):
        medpeft("pretrain", PRETRAIN, "--out", str(run), "--set", f"train.epochs={epochs}", "--set",
                f"train.warmup_epochs={math.ceil(FULL_WARMUP * epochs / FULL_EPOCHS)}", "--set",
                f"train.precision={PRECISION}")
    return run


def classifier(work: Path, name: str, data: dict, epochs: int) -> Path:
    run = work / "classifiers" / name
    if not done(run):
        medpeft("train", str(write_config(work / "classifiers" / f"{name}.yaml", {
            "model": {**JUDGE_MODEL, "weights": str(work / "mae-pretrain" / "mae.pth")}, "data": data,
            "method": {"name": "full"},
            "train": {"epochs": epochs, "batch_size": 64, "lr": 5e-4, "layer_decay": 0.75, "warmup_epochs": 1,
                      "precision": PRECISION},
            "augment": {"scale": [0.5, 1.0]}, "output_dir": str(run)})))
    return run


def real_test_auroc(run: Path) -> float:
    """The classifier's mean AUROC on the real Kermany test images (external evaluation, same split; the
    data file is written once, before the methods run in parallel)."""
    evaluation = run / "evaluations" / "kermany-test" / "metrics.json"
    if not evaluation.is_file():
        medpeft("evaluate", str(run), "--data", str(run.parent / "kermany-test.yaml"), "--split", "test")
    return json.loads(evaluation.read_text())["mean_auroc"]


def method_cell(work: Path, method: str, lr: float, judge: Path, scale: float, epochs: int, steps: int) -> dict:
    run = work / "runs" / method
    if not done(run):
        medpeft("generate", "train", str(write_config(work / "runs" / f"{method}.yaml", {
            "model": {"source": str(work / "foundation")}, "data": KERMANY, "method": {"name": method},
            "diffusion": DIFFUSION,
            "train": {"epochs": max(1, round(epochs * scale)), "batch_size": 32, "lr": lr, "warmup_epochs": 0.2,
                      "precision": PRECISION},
            "output_dir": str(run)})))
    evaluation = run / "evaluations" / "generated" / "metrics.json"
    if not evaluation.is_file():
        medpeft("generate", "evaluate", str(run), "--extractor", str(judge), "--n", str(round(300 * scale)),
                "--steps", str(steps), "--guidance", "3.0")
    synthetic = work / "synthetic" / method
    if not synthetic.is_dir():
        medpeft("generate", "sample", str(run), "--like", "val", "--steps", str(steps), "--guidance", "3.0",
                "--out", str(synthetic))
    table = pd.read_csv(synthetic / "prompts.csv")
    table["path"] = [str(synthetic / p) for p in table["path"]]
    both = pd.concat([table, pd.read_csv(work / "real-val.csv")], ignore_index=True)
    both.to_csv(work / "synthetic" / f"{method}-and-real.csv", index=False)
    usefulness = {}
    for name, csv in (("synthetic", synthetic / "prompts.csv"), ("synthetic_and_real",
                                                                  work / "synthetic" / f"{method}-and-real.csv")):
        data = {"csv": str(csv), "patient_column": "patient_id", "labels": CLASSES,
                "task": "multiclass", "split": {"val_fraction": 0.15, "test_fraction": 0.0, "seed": 0}}
        usefulness[name] = real_test_auroc(classifier(work, f"{method}-{name}", data, epochs=10))
    return {"method": method, "lr": lr, "train": json.loads((run / "metrics.json").read_text()),
            "evaluation": json.loads(evaluation.read_text()), "usefulness": usefulness}


def real_val_csv(work: Path) -> Path:
    """The real val split's images as a labels CSV (absolute paths): the real-only usefulness baseline."""
    from medpeft.config import load_data_config
    from medpeft.data import read_split_dataset

    path = work / "real-val.csv"
    if not path.is_file():
        table = read_split_dataset(load_data_config(base={"data": KERMANY}))
        rows = table[table["split"] == "val"]
        pd.DataFrame({"path": rows["path"].astype(str), "patient_id": rows["patient_id"].astype(str),
                      **{c: rows[c].astype(int) for c in CLASSES}}).to_csv(path, index=False)
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="studies-out/generate-kermany")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="Shrinks every budget (a smoke run: 0.05).")
    parser.add_argument("--foundation-epochs", type=int, default=3, help="On the phantoms.")
    parser.add_argument("--epochs", type=int, default=2, help="Of each method on the Kermany training split.")
    parser.add_argument("--mae-epochs", type=int, default=40, help="The judge's MAE pretraining.")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps when sampling.")
    parser.add_argument("--methods", default=",".join(METHODS), help="Comma-separated subset (a smoke run).")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--markdown", action="store_true", help="Only rewrite the .md from the .json in --out.")
    args = parser.parse_args()
    if args.markdown:
        record = json.loads((Path(args.out) / "generate_kermany.json").read_text())
        (Path(args.out) / "generate_kermany.md").write_text(markdown(record))
        return
    methods = {name: METHODS[name] for name in args.methods.split(",")}
    if not DATA.is_file():
        print(f"skipped: needs {DATA}")
        return
    work = (ROOT / args.work).resolve()
    start = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        base, encoder = pool.map(lambda step: step(), [lambda: foundation(work, args.scale, args.foundation_epochs),
                                                       lambda: mae(work, args.mae_epochs)])
    judge = classifier(work, "judge", KERMANY, epochs=max(1, round(10 * args.scale)))
    real_val_csv(work)
    write_config(work / "classifiers" / "kermany-test.yaml", {"data": KERMANY})
    real_only = real_test_auroc(classifier(work, "real-val-only", {
        "csv": str(work / "real-val.csv"), "patient_column": "patient_id", "labels": CLASSES, "task": "multiclass",
        "split": {"val_fraction": 0.15, "test_fraction": 0.0, "seed": 0}}, epochs=10))
    with ThreadPoolExecutor(args.jobs) as pool:
        cells = list(pool.map(lambda item: method_cell(work, *item, judge, args.scale, args.epochs,
                                                                    args.steps), methods.items()))
    record = {"command": " ".join(["python", "benchmarks/generate_kermany.py", *sys.argv[1:]]),
              "seconds": time.perf_counter() - start, "threads": os.environ.get("OMP_NUM_THREADS", "default"),
              "cpu": cpu_name(), "precision": PRECISION,
              "foundation": json.loads((base / "metrics.json").read_text()),
              "mae": json.loads((encoder / "metrics.json").read_text()),
              "judge_test_auroc": json.loads((judge / "metrics.json").read_text())["test"]["mean_auroc"],
              "real_only_test_auroc": real_only, "methods": cells}
    out = Path(args.out)
    (out / "generate_kermany.json").write_text(json.dumps(record, indent=2))
    (out / "generate_kermany.md").write_text(markdown(record))
    print(markdown(record))


def verdict(record: dict) -> list[str]:
    """Which method wins on each measure, and whether PEFT beats full fine-tuning on FID (Dutt et al.'s
    question; one run each, no test)."""
    cells = {c["method"]: c for c in record["methods"]}
    fid = {m: c["evaluation"]["fid"] for m, c in cells.items()}
    best = min(fid, key=fid.get)
    below = [m for m in fid if m != "full" and fid[m] < fid["full"]]
    useful = {m: c["usefulness"]["synthetic_and_real"] for m, c in cells.items()}
    alone = {m: c["usefulness"]["synthetic"] for m, c in cells.items()}
    copied = max(c["evaluation"]["copied_share"] for c in cells.values())
    return [f"- Lowest FID: {best} ({fid[best]:.4g}, {cells[best]['train']['parameters']['trainable_percent']:.3g}% "
            f"trainable). {len(below)} of {len(fid) - 1} PEFT methods reach a lower FID than full fine-tuning "
            f"({fid['full']:.4g})" + (f": {', '.join(below)}." if below else "."),
            f"- Most useful synthetic images: {max(alone, key=alone.get)} alone "
            f"({100 * max(alone.values()):.1f} real test AUROC), {max(useful, key=useful.get)} with the real val "
            f"images ({100 * max(useful.values()):.1f}); the real val images alone: "
            f"{100 * record['real_only_test_auroc']:.1f}.",
            f"- Memorisation: at most {100 * copied:.1f}% of a method's images are closer to a training image than "
            "95% of unseen real images are."]


def markdown(record: dict) -> str:
    rows = ["| method | lr | trainable % | train min | FID | KID | precision | recall | copied % | MiFID | "
            "label fidelity | synthetic-only | synthetic + real |", "|" + " --- |" * 13]
    for cell in sorted(record["methods"], key=lambda c: c["train"]["parameters"]["trainable_percent"]):
        e, u = cell["evaluation"], cell["usefulness"]
        fidelity = (e["label_fidelity"] or {}).get("mean_generated")
        rows.append(f"| {cell['method']} | {cell['lr']:g} | {cell['train']['parameters']['trainable_percent']:.3g} | "
                    f"{cell['train']['wall_time_s'] / 60:.1f} | {e['fid']:.4g} | {e['kid']:.3g} | "
                    f"{e['precision']:.3f} | {e['recall']:.3f} | {100 * e['copied_share']:.1f} | {e['mifid']:.4g} | "
                    f"{'n/a' if fidelity is None else f'{100 * fidelity:.1f}'} | {100 * u['synthetic']:.1f} | "
                    f"{100 * u['synthetic_and_real']:.1f} |")
    judged = (record["methods"][0]["evaluation"]["label_fidelity"] or {}).get("labels") or {}
    ceiling = [v["real"] for v in judged.values() if v["real"] is not None]
    foundation, mae = record["foundation"], record["mae"]
    return "\n".join([
        "# Generative PEFT on the real pediatric X-rays (issue 32)", "", f"`{record['command']}` "
        f"({record['seconds'] / 60:.0f} min, not counting the steps it found finished; OMP_NUM_THREADS="
        f"{record['threads']}, 2 CPU cores, {record['cpu']}; training in {record['precision']})", "",
        f"The foundation: random:pixel-64-small trained on the phantoms, {foundation['epochs_run']} epochs in "
        f"{foundation['wall_time_s'] / 60:.1f} min. The judge's MAE: {mae['epochs_run']} epochs on the Kermany "
        f"training images. The judge (feature extractor and label scorer): test mean AUROC "
        f"{100 * record['judge_test_auroc']:.1f}"
        + (f"; on the evaluated real test images {100 * sum(ceiling) / len(ceiling):.1f} (the ceiling of label "
           "fidelity)" if ceiling else "")
        + ". A classifier trained on the real val images alone: real test AUROC "
        f"{100 * record['real_only_test_auroc']:.1f} (the usefulness baseline; label fidelity, synthetic-only and "
        "synthetic + real are AUROCs in points). "
        "One run per method: a measurement, not a test.", "", *rows, "", *verdict(record), ""])


if __name__ == "__main__":
    main()
