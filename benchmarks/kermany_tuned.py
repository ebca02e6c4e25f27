"""The tuned comparison on the real pediatric chest X-rays (../shared/data/kermany-pediatric-cxr): training
from scratch vs a linear probe, full fine-tuning and LoRA of an MAE encoder pretrained on the training
images without labels, at 1%, 10% and 100% of the training labels, 3 seeds, every method's
hyperparameters searched per label fraction first (studies/kermany-mae-tuned.yaml).

    python benchmarks/kermany_tuned.py [--pretrain-dir studies-out/kermany-mae-pretrain]
                                       [--work studies-out] [--jobs 2] [--out benchmarks/results]

Runs the commands of studies/kermany-mae-tuned.yaml from the repository root (a finished pretraining run
in --pretrain-dir is reused, a study resumes; the report is rewritten), then writes kermany_tuned.json
and kermany_tuned.md:

- per method and label fraction, on the internal test split (the patients no run saw): AUROC, and
  accuracy, sensitivity and specificity at each run's own threshold (Youden's J on its val split,
  RUN/thresholds.json), each the mean over seeds with a 95% CI from 2000 stratified bootstrap resamples
  of the test images (one resample drawn for every seed and method, the statistic averaged over seeds);
- LoRA (and the linear probe) vs full fine-tuning per label fraction: the report's seed-paired bootstrap
  difference of test AUROC, its CI and its Holm-adjusted p-value and verdict (report/pairwise.csv);
- the searches: default vs tuned val AUROC and the tuned values (report/tuning.csv).

Skips (exit 0, with the reason) when the data folder is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from medpeft.train.components import trained_images

from kermany_mae import DATA, ROOT, run  # the untuned study's benchmark: the data, the repository, one command

STUDY = "studies/kermany-mae-tuned.yaml"
LABEL = "PNEUMONIA"
RESAMPLES = 2000
STATISTICS = ("auroc", "accuracy", "sensitivity", "specificity")


def test_predictions(run_dir: Path) -> tuple[pd.Series, pd.Series, float]:
    """A run's test targets and probabilities (indexed by image) and its val-chosen threshold."""
    frame = pd.read_csv(run_dir / "predictions.csv")
    frame = frame[frame["split"] == "test"].set_index("image_id")
    threshold = json.loads((run_dir / "thresholds.json").read_text())["thresholds"][LABEL]
    return frame[f"target:{LABEL}"], frame[f"prob:{LABEL}"], threshold


def statistics(y: np.ndarray, prob: np.ndarray, threshold: float) -> np.ndarray:
    """AUROC, accuracy, sensitivity, specificity (points) of one set of predictions."""
    call = prob >= threshold
    return 100 * np.array([roc_auc_score(y, prob), (call == y).mean(), call[y == 1].mean(), (~call)[y == 0].mean()])


def operating_points(results: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Per method and fraction: each statistic's mean over seeds and its bootstrap CI (see the module)."""
    done = results[results["status"] == "done"]
    runs = {key: [test_predictions(Path(d)) for d in group["run_dir"]]
            for key, group in done.groupby(["method", "fraction"], sort=False)}
    images = next(iter(runs.values()))[0][0].index
    y = next(iter(runs.values()))[0][0].to_numpy().astype(int)
    rng = np.random.default_rng(seed)
    positives, negatives = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    draws = [np.concatenate([rng.choice(positives, len(positives)), rng.choice(negatives, len(negatives))])
             for _ in range(RESAMPLES)]
    rows = []
    for (method, fraction), seeds in runs.items():
        aligned = [(t.loc[images].to_numpy().astype(int), p.loc[images].to_numpy(), th) for t, p, th in seeds]
        assert all((t == y).all() for t, _, _ in aligned), f"{method} {fraction}: the runs' test splits differ"
        point = np.mean([statistics(y, p, th) for _, p, th in aligned], axis=0)
        boot = np.array([np.mean([statistics(y[d], p[d], th) for _, p, th in aligned], axis=0) for d in draws])
        low, high = np.percentile(boot, [2.5, 97.5], axis=0)
        row = {"method": method, "fraction": fraction, "seeds": len(seeds), "test_images": len(y)}
        for i, name in enumerate(STATISTICS):
            row.update({name: point[i], f"{name}_low": low[i], f"{name}_high": high[i]})
        rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrain-dir", default="studies-out/kermany-mae-pretrain",
                        help="The MAE pretraining run (studies/kermany-mae-pretrain.yaml), reused when finished.")
    parser.add_argument("--work", default="studies-out", help="Folder for the study.")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--results-only", action="store_true",
                        help="Only rewrite the results from the finished study and its report.")
    args = parser.parse_args()
    if not DATA.is_file():
        print(f"skipped: {DATA} not found (the real images are not part of the repository)")
        return
    pretrain_dir, study_dir = Path(args.pretrain_dir), Path(args.work) / "kermany-mae-tuned"
    medpeft = [sys.executable, "-m", "medpeft"]
    commands = [[*medpeft, "pretrain", "studies/kermany-mae-pretrain.yaml", "--out", str(pretrain_dir)],
                [*medpeft, "study", "run", STUDY, "--out", str(study_dir), "--jobs", str(args.jobs)],
                [*medpeft, "study", "report", str(study_dir)]]
    env = {"KERMANY_MAE": str(pretrain_dir / "mae.pth"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pretrained = (ROOT / pretrain_dir / "metrics.json").is_file()
    for i, command in enumerate(commands):
        if not ((i == 0 and pretrained) or args.results_only):
            run(command, env)

    report = ROOT / study_dir / "report"
    results = pd.read_csv(report / "results.csv")
    pairwise = pd.read_csv(report / "pairwise.csv")
    tuning = pd.read_csv(report / "tuning.csv")
    points = operating_points(results)
    trainable = results.groupby("method", sort=False)["trainable_percent"].mean()
    pretraining = json.loads((ROOT / pretrain_dir / "metrics.json").read_text())
    versus_full = pairwise[(pairwise["reference"] == "full") & pairwise["method"].isin(["lora", "linear_probe"])]
    record = {
        "commands": [" ".join(["medpeft", *c[3:]]) for c in commands], "env": env,
        "foundation_saw": foundation_saw(ROOT / pretrain_dir, results),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "pretraining": {k: pretraining[k] for k in ("epochs_run", "wall_time_s", "split_sizes")},
        "cells_seconds_summed": float(results["wall_time_s"].sum()),
        "search_seconds_summed": search_seconds(ROOT / study_dir),
        "operating_points": points.to_dict(orient="records"),
        "versus_full": versus_full.to_dict(orient="records"),
        "tuning": tuning.to_dict(orient="records"),
        "cells": results.to_dict(orient="records"),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kermany_tuned.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    text = markdown(record, trainable)
    (out / "kermany_tuned.md").write_text(text)
    print(text)


def foundation_saw(pretrain_dir: Path, results: pd.DataFrame) -> dict:
    """How many of the study's val and test images (over every run) the MAE pretrained on."""
    pretrained = trained_images(pretrain_dir / "split.csv")
    held_out = pd.concat(pd.read_csv(Path(run) / "split.csv") for run in results["run_dir"])
    held_out = held_out[held_out["split"].isin(["val", "test"])].drop_duplicates("image_id")
    return {split: {"images": int(len(group)), "in_pretraining": int(group["image_id"].isin(pretrained).sum())}
            for split, group in held_out.groupby("split")}


def search_seconds(study_dir: Path) -> float:
    """The searches' time: each trial's training run's own wall time, summed."""
    return float(sum(json.loads(m.read_text())["wall_time_s"]
                     for m in (study_dir / "tune").glob("*/trials/*/metrics.json")))


def markdown(record: dict, trainable: pd.Series) -> str:
    env = record["env"]
    lines = ["# Tuned comparison on the real Kermany pediatric X-rays: scratch, linear probe, full fine-tuning "
             "and LoRA of an MAE encoder", "",
             "Commands (repository root, 2 CPU cores, `OMP_NUM_THREADS=1` per process):", ""]
    lines += [f"    {'KERMANY_MAE=' + env['KERMANY_MAE'] + ' ' if 'study run' in c else ''}{c}"
              for c in record["commands"]]
    pre = record["pretraining"]
    lines += ["", f"Foundation: ViT-tiny (depth 4, 8 px patches, 64 px) MAE-pretrained on the "
              f"{pre['split_sizes']['train']:,} training images without labels, {pre['epochs_run']} epochs "
              f"({pre['wall_time_s'] / 60:.0f} min). Pneumonia vs normal; each method and label fraction "
              f"searched first (8 trials, TPE, median pruning on val AUROC, on seed 0; learning rate, weight "
              f"decay and the method's own keys; epochs fixed per fraction), then 3 seeds trained with the best "
              f"values. Time: searches {record['search_seconds_summed'] / 60:.0f} min and cells "
              f"{record['cells_seconds_summed'] / 60:.0f} min of process time summed (2 at a time). The study "
              f"draws the pretraining run's unstratified patient split (`data.split.stratify: false`): of its "
              + ", ".join(f"{n['images']} {split}" for split, n in record["foundation_saw"].items())
              + " images the MAE pretrained on "
              + ", ".join(str(n["in_pretraining"]) for n in record["foundation_saw"].values()) + ".", "",
              "## Internal test split", "",
              "Mean over 3 seeds, 95% CI from 2000 stratified bootstrap resamples of the test images. Accuracy, "
              "sensitivity and specificity at each run's threshold chosen on its val split (Youden's J).", "",
              "| method | trainable % | labels | AUROC | accuracy | sensitivity | specificity |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in record["operating_points"]:
        cells = [f"{row[s]:.1f} [{row[s + '_low']:.1f}, {row[s + '_high']:.1f}]" for s in STATISTICS]
        lines.append(f"| {row['method']} | {trainable[row['method']]:.3g} | {100 * row['fraction']:g}% | "
                     + " | ".join(cells) + " |")
    lines += ["", "## Against full fine-tuning", "",
              "Test AUROC difference (points), seed-paired bootstrap over the test images (the study report's), "
              "p-values Holm-adjusted over the report's whole table.", "",
              "| method | labels | difference | 95% CI | adjusted p | verdict |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    for row in record["versus_full"]:
        lines.append(f"| {row['method']} | {100 * row['fraction']:g}% | {row['difference']:+.2f} | "
                     f"[{row['ci_low']:+.2f}, {row['ci_high']:+.2f}] | {row['p_adjusted']:.3g} | {row['verdict']} |")
    lines += ["", "## The searches", "",
              "Val AUROC (points) of the default config (trial 0) and of the best trial, on seed 0.", "",
              "| method | labels | trials complete / pruned | default | tuned | difference | tuned values |",
              "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in record["tuning"]:
        values = ", ".join(f"{k.split('.')[-1]} {v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]} {v}"
                           for k, v in (json.loads(row["tuned_values"]) or {}).items())
        lines.append(f"| {row['method']} | {100 * row['fraction']:g}% | {row['complete']} / {row['pruned']} | "
                     f"{row['default_val_auroc']:.2f} | {row['tuned_val_auroc']:.2f} | {row['difference']:+.2f} | "
                     f"{values} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
