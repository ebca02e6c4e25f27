"""MAE pretraining + PEFT vs training from scratch on the real pediatric chest X-rays
(../shared/data/kermany-pediatric-cxr), labels unused for pretraining.

    python benchmarks/kermany_mae.py [--work studies-out] [--jobs 2] [--out benchmarks/results]

Runs, from the repository root, the commands written in studies/kermany-mae-pretrain.yaml and
studies/kermany-mae.yaml (pretrain, study run, study report; finished steps are reused), then writes
kermany_mae.json and kermany_mae.md (and the last reconstruction preview and the AUROC vs
fraction plot as PNGs): the test mean AUROC per method, task and label fraction (mean +- sd
over 3 seeds), each method's seed-paired difference to training from scratch, pretraining losses and
times. Skips (exit 0, with the reason) when the data folder is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "../shared/data/kermany-pediatric-cxr/labels.csv"


def run(command: list[str], env: dict | None = None) -> float:
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, **(env or {})})
    return time.perf_counter() - start


def differences(results: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Per dataset, fraction and method: the seed-paired difference to `reference`, mean and sd (points)."""
    done = results[results["status"] == "done"]
    ref = done[done["method"] == reference].set_index(["dataset", "fraction", "seed"])["test_mean_auroc"]
    rows = []
    for (dataset, fraction, method), group in done.groupby(["dataset", "fraction", "method"], sort=False):
        scores = group.set_index(["dataset", "fraction", "seed"])["test_mean_auroc"]
        paired = (scores - ref).dropna() * 100
        rows.append({"dataset": dataset, "fraction": fraction, "method": method,
                     "auroc_mean": 100 * scores.mean(), "auroc_sd": 100 * scores.std(), "seeds": len(scores),
                     f"minus_{reference}_mean": paired.mean(), f"minus_{reference}_sd": paired.std(),
                     "paired_seeds": len(paired)})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="studies-out", help="Folder for the pretraining run and the study.")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    if not DATA.is_file():
        print(f"skipped: {DATA} not found (the real images are not part of the repository)")
        return
    work = Path(args.work)
    pretrain_dir, study_dir = work / "kermany-mae-pretrain", work / "kermany-mae"
    medpeft = [sys.executable, "-m", "medpeft"]
    commands = [
        [*medpeft, "pretrain", "studies/kermany-mae-pretrain.yaml", "--out", str(pretrain_dir)],
        [*medpeft, "study", "run", "studies/kermany-mae.yaml", "--out", str(study_dir), "--jobs", str(args.jobs)],
        [*medpeft, "study", "report", str(study_dir)],
    ]
    env = {"KERMANY_MAE": str(pretrain_dir / "mae.pth")}
    pretrained = (ROOT / pretrain_dir / "metrics.json").is_file()  # a finished pretraining run is reused
    seconds = [0.0 if i == 0 and pretrained else run(command, env) for i, command in enumerate(commands)]

    pretraining = json.loads((ROOT / pretrain_dir / "metrics.json").read_text())
    seconds[0] = pretraining["wall_time_s"]
    report = ROOT / study_dir / "report"
    results = pd.read_csv(report / "results.csv")
    table = differences(results, "scratch")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(report / "figures" / "auroc_vs_fraction.png", out / "kermany_mae_auroc_vs_fraction.png")
    last_preview = sorted((ROOT / pretrain_dir / "previews").iterdir())[-1]
    shutil.copy(last_preview, out / "kermany_mae_preview.png")
    record = {
        "commands": [" ".join(["medpeft", *c[3:]]) for c in commands],
        "env": env,
        "seconds": {"pretrain": seconds[0], "study_last_invocation": seconds[1], "report": seconds[2],
                    "cells_summed": float(results["wall_time_s"].sum())},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "pretraining": {k: pretraining[k] for k in ("model", "encoder_parameters", "epochs_run", "wall_time_s",
                                                      "split_sizes", "history")},
        "cells": results.to_dict(orient="records"),
        "summary": table.to_dict(orient="records"),
    }
    (out / "kermany_mae.json").write_text(json.dumps(record, indent=2) + "\n")

    lines = ["# MAE pretraining + PEFT vs training from scratch on the real Kermany pediatric X-rays", "",
             "Commands (repository root, 2 CPU cores):", ""]
    lines += [f"    {'KERMANY_MAE=' + env['KERMANY_MAE'] + ' ' if 'study run' in c else ''}{c}"
              for c in record["commands"]]
    history = pretraining["history"]
    lines += ["", f"Pretraining: {pretraining['split_sizes']['train']:,} unlabelled training images, "
              f"{pretraining['epochs_run']} epochs in {seconds[0] / 60:.1f} min; reconstruction loss (val) "
              f"{history[0]['val_loss']:.3f} after epoch 1, {history[-1]['val_loss']:.3f} at the end. "
              f"Study: {len(results)} cells, {results['wall_time_s'].sum() / 60:.0f} min of cell time summed "
              f"(each cell's own wall time, 2 at a time; a resumed study counts only the cells it ran).", "",
              "Test mean AUROC in points, mean +- sd over seeds; 'vs scratch': the seed-paired difference to "
              "training from scratch, mean +- sd.", "",
              "| task | labels | method | test AUROC | vs scratch |", "| --- | ---: | --- | ---: | ---: |"]
    for row in table.itertuples():
        versus = "" if row.method == "scratch" else f"{row.minus_scratch_mean:+.1f} +- {row.minus_scratch_sd:.1f}"
        lines.append(f"| {row.dataset} | {100 * row.fraction:g}% | {row.method} | "
                     f"{row.auroc_mean:.1f} +- {row.auroc_sd:.1f} | {versus} |")
    (out / "kermany_mae.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
