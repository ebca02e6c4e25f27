"""Calibration and subgroup evidence of a run on the real pediatric chest X-rays
(../shared/data/kermany-pediatric-cxr): configs/kermany-pneumonia-vit-scratch.yaml (pneumonia vs normal, a
small ViT from random init), trained with two subgroup columns, then evaluated raw and calibrated.

    python benchmarks/kermany_evidence.py [--work runs-evidence] [--out benchmarks/results]

The dataset has no demographic column. Two subgroup columns are added to a copy of labels.csv:
- exposure: the tertile (low / mid / high) of the image's mean grey level over the whole dataset, an
  acquisition attribute; every tertile holds both classes.
- subtype: normal / bacteria / virus. Within a subtype every image has one class, so its AUROC is
  undefined and the evaluation flags the group; the benchmark also scores each pneumonia subtype against
  the normal test images with `medpeft evaluate --data` (a CSV of those images), which is defined.

The calibration table also holds PEFT with few labels: LoRA (r 8 on qkv) at 1% of the labels, seed 0, text
and random head, the cells of studies/kermany-text-head.yaml on the tiny CheXzero-layout CLIP that
benchmarks/text_head.py pretrains (--clip, default studies-out/kermany-clip; those rows are left out with a
note when it is absent).

Writes kermany_evidence.json and .md: per run, val NLL and test ECE (10 equal-mass bins) / Brier before and
after temperature scaling and the temperature; for the 100% run, the per-subgroup test AUROC with 95% bootstrap intervals, the
worst group and the largest gap. A finished run is reused (delete <work> to start over). Skips (exit 0,
with the reason) when the data folder is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from medpeft.files import write_json_atomic, write_text_atomic
from medpeft.study.spec import load_study

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "../shared/data/kermany-pediatric-cxr"
CONFIG = "configs/kermany-pneumonia-vit-scratch.yaml"
TEXT_HEAD_STUDY = "studies/kermany-text-head.yaml"


def _medpeft(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "medpeft", *args], cwd=ROOT, check=True)


def _labels_with_subgroups(work: Path) -> Path:
    """labels.csv with absolute paths and the exposure tertile of every image."""
    path = work / "labels.csv"
    if path.is_file():
        return path
    table = pd.read_csv(DATA / "labels.csv", dtype=str)
    table["path"] = [str((DATA / p).resolve()) for p in table["path"]]
    grey = np.array([np.asarray(Image.open(p).convert("L"), dtype=np.float32).mean() for p in table["path"]])
    table["exposure"] = pd.qcut(grey, 3, labels=["low", "mid", "high"]).astype(str)
    write_text_atomic(path, table.to_csv(index=False))
    return path


def _subtype_sets(run: Path, labels: Path, work: Path) -> dict[str, Path]:
    """Per pneumonia subtype, a data config of the run's test normals and that subtype's test images."""
    split = pd.read_csv(run / "split.csv", dtype=str)
    table = pd.read_csv(labels, dtype=str).merge(split[split["split"] == "test"][["image_id"]],
                                                   left_on="path", right_on="image_id")
    sets = {}
    for subtype in ("bacteria", "virus"):
        rows = table[table["subtype"].isin(["normal", subtype])]
        csv = work / f"test-normal-{subtype}.csv"
        write_text_atomic(csv, rows.drop(columns="image_id").to_csv(index=False))
        spec = work / f"normal-vs-{subtype}.yaml"
        write_text_atomic(spec, json.dumps({"data": {"csv": str(csv), "patient_column": "patient_id",
                                                     "label_column": "label", "labels": ["PNEUMONIA"],
                                                     "negative_names": ["NORMAL"]}}))
        sets[subtype] = spec
    return sets


def _calibration(run: Path) -> dict:
    """The run's temperature, val NLL, and test ECE / Brier / AUROC raw and calibrated (medpeft evaluate
    --calibrated)."""
    metrics = json.loads((run / "metrics.json").read_text())
    record = json.loads((run / "calibration.json").read_text())
    _medpeft("evaluate", str(run), "--calibrated")
    calibrated = json.loads((run / "evaluations" / "test-calibrated" / "metrics.json").read_text())
    label = metrics["labels"][0]
    parts = {part: metrics["test"]["calibration"][part]["per_label"][label] for part in ("raw", "calibrated")}
    return {"train_images": metrics["split_sizes"]["train"], "temperature": record["temperatures"][label],
            "val_nll_before": record["val_nll_before"], "val_nll_after": record["val_nll_after"],
            "raw": {"ece": parts["raw"]["ece"], "brier": parts["raw"]["brier"],
                    "auroc": metrics["test"]["mean_auroc"]},
            "calibrated": {"ece": parts["calibrated"]["ece"], "brier": parts["calibrated"]["brier"],
                           "auroc": calibrated["mean_auroc"]},
            "reliability": {part: parts[part]["reliability"] for part in parts}}


def _clip_runs(work: Path, clip: Path) -> dict[str, Path]:
    """The seed-0 LoRA cells of the text-head study (text and random head), trained into <work>."""
    os.environ["KERMANY_CLIP"] = str(clip)
    runs = {}
    for cell in load_study(ROOT / TEXT_HEAD_STUDY).cells:
        if cell.method == "lora" and cell.seed == 0:
            head = cell.backbone.removesuffix("-head")
            run = work / f"clip-lora-{head}"
            if not (run / "metrics.json").is_file():
                config = work / f"clip-lora-{head}.yaml"
                write_text_atomic(config, yaml.safe_dump({**cell.config, "output_dir": str(run)}))
                _medpeft("train", str(config))
            runs[head] = run
    return runs


def _subgroup_rows(subgroups: dict) -> list[dict]:
    rows = []
    for column, result in subgroups.items():
        for value, group in result["groups"].items():
            rows.append({"column": column, "group": value, "n": group["n"],
                         "positives": sum(group["positives"].values()), "negatives": sum(group["negatives"].values()),
                         "auroc": group["mean_auroc"], "ci": [group["ci_low"], group["ci_high"]],
                         "small": group["small"], "worst": value == result["worst"]})
    return rows


def _points(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _markdown(result: dict) -> str:
    sizes = result["split_sizes"]
    lines = [
        "# Calibration and subgroups of a run on the real Kermany pediatric X-rays",
        "",
        f"`python benchmarks/kermany_evidence.py` on {result['machine']}: `medpeft train {CONFIG}` (pneumonia vs "
        f"normal, small ViT from random init, full fine-tuning; {sizes['val']} val and {sizes['test']} test images) "
        f"with `data.subgroup_columns: [exposure, subtype]` ({sizes['train']} training images, "
        f"{result['train_wall_s']:.0f} s), then `medpeft evaluate RUN --calibrated`. PEFT with few labels: "
        f"{result['clip_note']}",
        "",
        "## Calibration: temperature scaling fitted on val",
        "",
        f"ECE over {result['n_bins']} equal-mass bins (points, x100); Brier score; T: the temperature "
        f"(probabilities = sigmoid(logit / T); T < 1 sharpens an under-confident model).",
        "",
        "| run | probabilities | T | val NLL | test ECE | test Brier | test AUROC |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, cal in result["calibration"].items():
        for part, nll, t in (("raw", cal["val_nll_before"], "–"),
                             ("calibrated", cal["val_nll_after"], f"{cal['temperature']:.3f}")):
            row = cal[part]
            lines.append(f"| {name} ({cal['train_images']} training images) | {part} | {t} | {nll:.4f} | "
                         f"{_points(row['ece'])} | {row['brier']:.4f} | {_points(row['auroc'])} |")
    lines += [
        "",
        "![reliability](kermany_evidence_reliability.png)",
        "",
        "Temperature scaling divides the logits by one number per label: it sharpens or softens the "
        "probabilities around 0.5 and never changes their order (AUROC stays), but it has no intercept. Where a "
        "model's probabilities sit in a narrow band off 0.5 (here the random head's), no temperature moves "
        "them to the observed shares; the calibrated ECE then stays high and says so.",
        "",
        "## Subgroups (test split of the ViT run)",
        "",
        "AUROC in points with its 95% stratified bootstrap interval (1000 resamples within the group). A group is "
        "flagged when it has fewer than 10 positives or 10 negatives (a subtype holds one class only: no AUROC).",
        "",
        "| column | group | images | positives / negatives | AUROC | 95% CI | note |",
        "| --- | --- | ---: | ---: | ---: | --- | --- |",
    ]
    for row in result["subgroups"]:
        ci = "–" if row["ci"][0] is None else f"[{_points(row['ci'][0])}, {_points(row['ci'][1])}]"
        note = "flagged: too small or one class" if row["small"] else ("worst group" if row["worst"] else "")
        lines.append(f"| {row['column']} | {row['group']} | {row['n']} | {row['positives']} / {row['negatives']} | "
                     f"{_points(row['auroc'])} | {ci} | {note} |")
    lines += ["", *(f"- {column}: worst group {g['worst']} ({_points(g['worst_auroc'])}), largest gap "
                    f"{_points(g['gap'])} points" for column, g in result["summary"].items() if g["worst"]), "",
              "## Each pneumonia subtype against the normal test images (`medpeft evaluate --data`)", "",
              "| subtype | images (positives / normals) | AUROC |", "| --- | ---: | ---: |"]
    for subtype, row in result["subtype_vs_normal"].items():
        lines.append(f"| {subtype} | {row['n']} ({row['positives']} / {row['negatives']}) | {_points(row['auroc'])} |")
    return "\n".join(lines) + "\n"


def _reliability_figure(calibration: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(calibration), figsize=(4 * len(calibration), 4), squeeze=False)
    for ax, (name, cal) in zip(axes[0], calibration.items()):
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--")
        for part, curve in cal["reliability"].items():
            ax.plot(curve["predicted"], curve["observed"], marker="o", label=part)
        ax.set(xlabel="mean predicted probability", ylabel="observed share of pneumonia", xlim=(0, 1),
               ylim=(0, 1), title=name.replace(", ", "\n", 1))
        ax.legend()
    fig.suptitle("test reliability, 10 equal-mass bins")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default=str(ROOT / "runs-evidence"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--clip", default=str(ROOT / "studies-out" / "kermany-clip"),
                        help="The folder benchmarks/text_head.py writes (clip.pt, finetune.csv).")
    args = parser.parse_args()
    if not (DATA / "labels.csv").is_file():
        print(f"skipped: {DATA / 'labels.csv'} not found (the real images are not part of the repository)")
        return
    work, out = Path(args.work).resolve(), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    labels = _labels_with_subgroups(work)
    run = work / "vit-full"
    if not (run / "metrics.json").is_file():
        _medpeft("train", CONFIG, "--out", str(run), "--set", f"data.csv={labels}",
                 "--set", "data.subgroup_columns=[exposure, subtype]")
    metrics = json.loads((run / "metrics.json").read_text())
    calibration = {"ViT from scratch, full fine-tuning, all labels": _calibration(run)}
    clip_note = "not run: no CLIP at --clip (run benchmarks/text_head.py first)."
    if (Path(args.clip) / "clip.pt").is_file():
        for head, clip_run in _clip_runs(work, Path(args.clip).resolve()).items():
            calibration[f"CLIP + LoRA, 1% labels, {head} head"] = _calibration(clip_run)
        clip_note = (f"LoRA on the CheXzero-layout CLIP of benchmarks/text_head.py, cells of {TEXT_HEAD_STUDY} "
                     f"(1% of the labels, seed 0, its own patient split).")
    test = metrics["test"]
    subtype = {}
    for name, spec in _subtype_sets(run, labels, work).items():
        _medpeft("evaluate", str(run), "--data", str(spec))
        m = json.loads((run / "evaluations" / spec.stem / "metrics.json").read_text())
        label = m["per_label"]["PNEUMONIA"]
        subtype[name] = {"n": m["n"], "positives": label["positives"], "negatives": label["negatives"],
                         "auroc": label["auroc"]}
    result = {
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, no GPU",
        "train_wall_s": round(metrics["wall_time_s"], 1), "split_sizes": metrics["split_sizes"],
        "test_auroc": test["mean_auroc"], "clip_note": clip_note,
        "n_bins": test["calibration"]["n_bins"], "binning": test["calibration"]["binning"],
        "calibration": calibration,
        "subgroups": _subgroup_rows(test["subgroups"]),
        "summary": {c: {k: g[k] for k in ("worst", "worst_auroc", "gap")} for c, g in test["subgroups"].items()},
        "subtype_vs_normal": subtype,
    }
    out.mkdir(parents=True, exist_ok=True)
    _reliability_figure(calibration, out / "kermany_evidence_reliability.png")
    write_json_atomic(out / "kermany_evidence.json", result)
    write_text_atomic(out / "kermany_evidence.md", _markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()
