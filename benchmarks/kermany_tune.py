"""`medpeft tune` on the real pediatric chest X-rays (../shared/data/kermany-pediatric-cxr): does a 16-trial
search find a better val AUROC than the default config of the Kermany LoRA 10% task (issue 31)?

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/kermany_tune.py [--work studies-out/kermany-tune] \
        [--pretrain-epochs 80] [--trials 16] [--out benchmarks/results]

Runs, from the repository root:
1. The foundation: the ViT-tiny MAE of studies/kermany-mae-pretrain.yaml (labels unused, the study's
   patient-level split, seed 0: test patients never seen),
       medpeft pretrain studies/kermany-mae-pretrain.yaml --out WORK/mae-pretrain \
           [--set train.epochs=E --set train.warmup_epochs=W]
   the full recipe is 80 epochs (5 warmup); a shorter budget E scales the warmup to ceil(5 E / 80).
2. The default config: the seed-0 cell (pneumonia, lora, fraction 0.1) of studies/kermany-mae-tuned.yaml
   (before its search; drawn unstratified, the split pretraining drew, so the MAE never saw its val and
   test patients, which fine-tuning checks) with
   KERMANY_MAE=WORK/mae-pretrain/mae.pth, i.e. the study's base merged with those levels and the 0.1
   override (LoRA r 8, alpha 16 on qkv, lr 3e-3, 10 epochs, batch 32), written as WORK/lora-10.yaml.
3.     medpeft tune WORK/lora-10.yaml --trials 16 --out WORK/tune-lora-10
   (trial 0 = the default; then seeded TPE with median pruning on the per-epoch val AUROC).

Writes kermany_tune.json and kermany_tune.md: the default and best val AUROC and their difference (what
the search selected on), trials complete / pruned, the best params, the search's wall time (Optuna's trial
start / end times) and every trial; as information only, the test AUROC of the default trial and of the
best trial's run (best.yaml trains the same config and seed) with the paired bootstrap CI of best - default
(2000 stratified resamples of the test images; the same for val). Every step is reused when complete and a
killed search resumes: re-run the same command. Skips (exit 0, with the reason) when the data folder is
absent.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

from medpeft.files import write_json_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "../shared/data/kermany-pediatric-cxr/labels.csv"
PRETRAIN = "studies/kermany-mae-pretrain.yaml"
STUDY = "studies/kermany-mae-tuned.yaml"  # the split pretraining drew (stratify: false)
CELL = {"backbone": "vit-tiny-kermany-mae", "dataset": "pneumonia", "method": "lora", "fraction": 0.1, "seed": 0}
FULL_EPOCHS, FULL_WARMUP = 80, 5
N_RESAMPLES, BOOTSTRAP_SEED = 2000, 0  # as the study report's paired tests


def _medpeft(*args: str, env: dict | None = None) -> float:
    print("$ medpeft", " ".join(args), flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "medpeft", *args], cwd=ROOT, check=True, env={**os.environ, **(env or {})})
    return time.perf_counter() - start


def _relative(path: Path) -> str:
    return os.path.relpath(path, ROOT)


def pretrain(work: Path, epochs: int) -> tuple[list[str], dict]:
    """The MAE foundation in <work>/mae-pretrain (reused when its metrics.json exists): the command and
    its metrics."""
    run = work / "mae-pretrain"
    command = ["pretrain", PRETRAIN, "--out", _relative(run)]
    if epochs != FULL_EPOCHS:
        command += ["--set", f"train.epochs={epochs}", "--set",
                    f"train.warmup_epochs={math.ceil(FULL_WARMUP * epochs / FULL_EPOCHS)}"]
    if not (run / "metrics.json").is_file():
        _medpeft(*command)
    metrics = json.loads((run / "metrics.json").read_text())
    if metrics["epochs_run"] != epochs:
        sys.exit(f"{run} holds a {metrics['epochs_run']}-epoch pretraining, not {epochs}: pass --pretrain-epochs "
                 f"{metrics['epochs_run']} or delete it")
    return command, metrics


def default_config(work: Path, mae: Path) -> Path:
    """The study cell CELL as a plain run config file (no output_dir: medpeft tune places each trial)."""
    from medpeft.study.spec import load_study

    os.environ["KERMANY_MAE"] = _relative(mae)  # medpeft runs from the repository root
    cell = next(c for c in load_study(ROOT / STUDY).cells
                if all(getattr(c, axis) == level for axis, level in CELL.items()))
    path = work / "lora-10.yaml"
    write_text_atomic(path, yaml.safe_dump(cell.config, sort_keys=False))
    return path


def trial_times(tune_dir: Path) -> dict[int, dict]:
    """Per trial number: seconds from start to end and the epochs it reported (Optuna's storage)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="tune", storage=f"sqlite:///{(tune_dir / 'tune.sqlite').resolve()}")
    return {t.number: {"seconds": (t.datetime_complete - t.datetime_start).total_seconds()
                       if t.datetime_complete and t.datetime_start else None,
                       "epochs_reported": len(t.intermediate_values)} for t in study.trials}


def paired(run_best: Path, run_default: Path, labels: list[str], split: str) -> dict:
    """best - default mean AUROC on one split: paired stratified bootstrap CI and p, DeLong (one label)."""
    from medpeft.engine import rundir
    from medpeft.metrics.compare import bootstrap_auroc_difference, delong_test

    ids_b, targets, best = rundir.read_predictions(run_best, split, labels)
    ids_d, targets_d, default = rundir.read_predictions(run_default, split, labels)
    assert (ids_b == ids_d).all() and (targets == targets_d).all(), f"{split}: the runs hold different images"
    interval = bootstrap_auroc_difference(targets, best, default, n_resamples=N_RESAMPLES, seed=BOOTSTRAP_SEED)
    result = {"images": len(ids_b), "difference": interval.estimate, "ci_low": interval.ci_low,
              "ci_high": interval.ci_high, "bootstrap_p": interval.p_value}
    if len(labels) == 1:
        delong = delong_test(targets[:, 0], best[:, 0], default[:, 0])
        result["delong_p"] = delong.p_value
    return result


def summarise(tune_dir: Path, tune_json: dict) -> dict:
    """tune.json with each trial's run metrics (val / test AUROC, epochs, wall time) and the comparisons."""
    times = trial_times(tune_dir)
    rows = []
    for trial in tune_json["trials"]:
        metrics_file = tune_dir / trial["run_dir"] / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if trial["state"] == "complete" else None
        rows.append({
            "number": trial["number"], "state": trial["state"], "default": bool(trial.get("default")),
            "retry_of": trial.get("retry_of"), "params": trial["params"], "val_auroc": trial["value"],
            "test_auroc": metrics and metrics["test"]["mean_auroc"],
            "epochs": metrics["epochs_run"] if metrics else times[trial["number"]]["epochs_reported"],
            "best_epoch": metrics and metrics["best_epoch"], "seconds": times[trial["number"]]["seconds"],
            "run_dir": trial["run_dir"], "error": trial.get("error"),
        })
    default, best = tune_json["default"], tune_json["best"]
    by_number = {row["number"]: row for row in rows}
    result = {
        "default": by_number[default["number"]], "best": by_number[best["number"]],
        "val_difference": tune_json["difference"],
        "counts": {state: sum(r["state"] == state for r in rows) for state in ("complete", "pruned", "failed")},
        "search_seconds": sum(r["seconds"] or 0.0 for r in rows), "space": tune_json["space"], "trials": rows,
    }
    if best["number"] != default["number"] and default["state"] == "complete":
        labels = json.loads((tune_dir / best["run_dir"] / "metrics.json").read_text())["labels"]
        result["paired"] = {split: paired(tune_dir / best["run_dir"], tune_dir / default["run_dir"], labels, split)
                            for split in ("val", "test")}
    return result


def _score(value) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _params(params: dict) -> str:
    return ", ".join(f"{key.split('.')[-1]} {value:.3g}" if isinstance(value, float) else f"{key.split('.')[-1]} {value}"
                     for key, value in params.items())


def verdict(result: dict) -> str:
    d, best, default = result["val_difference"], result["best"], result["default"]
    tested = result["trials_asked"]
    if d is None:
        return f"No verdict: the default trial did not complete within {tested} trials."
    if best["number"] == default["number"]:
        return (f"No: within {tested} trials `medpeft tune` found no config with a higher val AUROC than the "
                f"default ({_score(default['val_auroc'])}).")
    found = (f"Yes by the issue's criterion: within {tested} trials `medpeft tune` found a config (trial "
             f"{best['number']}: {_params(best['params'])}) whose val AUROC, {_score(best['val_auroc'])}, beats the "
             f"default's, {_score(default['val_auroc'])}, by {100 * d:+.2f} points")
    test = result.get("paired", {}).get("test")
    if test is None:
        return found + "."
    if test["ci_low"] > 0:
        reading = "the gain holds on unseen patients"
    elif test["ci_high"] < 0:
        reading = "worse on unseen patients: the val gain did not carry over"
    else:
        reading = "no measurable difference on unseen patients"
    return (f"{found}; on the test split, which the search never looked at, best - default is "
            f"{100 * test['difference']:+.2f} points (95% CI [{100 * test['ci_low']:+.2f}, "
            f"{100 * test['ci_high']:+.2f}]): {reading} (one training seed; the interval covers the sampling of "
            f"test images, not of training runs).")


def _markdown(record: dict) -> str:
    r, pre = record["result"], record["pretraining"]
    lines = [
        "# `medpeft tune` on the real Kermany pediatric X-rays: LoRA at 10% of the labels (issue 31)", "",
        f"Commands (repository root, {record['machine']}, `OMP_NUM_THREADS=1 MKL_NUM_THREADS=1`, the cores "
        f"shared with other jobs):", "",
        *(f"    {c}" for c in record["commands"]), "",
        f"Foundation: {pre['note']} {pre['train_images']:,} unlabelled training images, {pre['epochs']} epochs in "
        f"{pre['wall_time_s'] / 60:.1f} min, reconstruction loss (val) {pre['val_loss_first']:.3f} after epoch 1, "
        f"{pre['val_loss_last']:.3f} at the end.", "",
        f"Default config (`{record['default_config']}`): {record['cell']}; "
        f"{record['split_sizes']['train']} training images, {record['split_sizes']['val']} val, "
        f"{record['split_sizes']['test']} test. Search space: "
        + "; ".join(f"`{k}` {v}" for k, v in r["space"].items()) + ".", "",
        "## Result", "",
        "| | trial | val AUROC | test AUROC (information only) | params |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for name in ("default", "best"):
        row = r[name]
        lines.append(f"| {name} | {row['number']} | {_score(row['val_auroc'])} | {_score(row['test_auroc'])} | "
                     f"{_params(row['params'])} |")
    diff = r["val_difference"]
    lines += ["", f"- best - default, val AUROC (selected on): {'–' if diff is None else f'{100 * diff:+.2f}'} points"]
    for split, p in r.get("paired", {}).items():
        delong = f", DeLong p {p['delong_p']:.3g}" if "delong_p" in p else ""
        lines.append(f"- best - default, {split} ({p['images']} images): {100 * p['difference']:+.2f} points, 95% "
                     f"paired bootstrap CI [{100 * p['ci_low']:+.2f}, {100 * p['ci_high']:+.2f}] ({N_RESAMPLES} "
                     f"stratified resamples), bootstrap p {p['bootstrap_p']:.3g}{delong}")
    counts = r["counts"]
    lines += [
        f"- trials: {counts['complete']} complete, {counts['pruned']} pruned, {counts['failed']} failed "
        f"(asked: {record['result']['trials_asked']} complete or pruned); search time {r['search_seconds'] / 60:.1f} "
        f"min (sum of the trials' start-to-end times)",
    ]
    if record.get("study_reference"):
        ref = record["study_reference"]
        lines.append(f"- for reference, the study's own seed-0 run of this cell in benchmarks/results/kermany_mae.json "
                     f"(its own 80-epoch foundation, an earlier medpeft version; not expected to match bit for bit): "
                     f"val {_score(ref['val_mean_auroc'])}, test {_score(ref['test_mean_auroc'])}")
    lines += ["", f"**Verdict.** {record['verdict']}", "",
              "Val AUROC of the best trial is the maximum of the search's trials on one val split, so it is biased "
              "upwards; the test columns were never used to select anything.", "",
              "## Every trial", "",
              "Pruned trials: val AUROC is the last epoch's report, epochs the epochs reported before the median "
              "rule stopped them.", "",
              "| trial | state | val AUROC | test AUROC | epochs (best) | time (s) | params |",
              "| ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    for row in r["trials"]:
        tag = " (default)" if row["default"] else (f" (retry of {row['retry_of']})" if row["retry_of"] is not None else "")
        best_epoch = "" if row["best_epoch"] is None else f" ({row['best_epoch']})"
        seconds = "–" if row["seconds"] is None else f"{row['seconds']:.0f}"
        lines.append(f"| {row['number']}{tag} | {row['state']} | {_score(row['val_auroc'])} | "
                     f"{_score(row['test_auroc'])} | {row['epochs']}{best_epoch} | {seconds} | {_params(row['params'])} |")
    return "\n".join(lines) + "\n"


def _study_reference() -> dict | None:
    """The study's own seed-0 run of the cell, if benchmarks/results/kermany_mae.json holds it."""
    path = ROOT / "benchmarks" / "results" / "kermany_mae.json"
    if not path.is_file():
        return None
    for cell in json.loads(path.read_text())["cells"]:
        if all(cell.get(axis) == level for axis, level in CELL.items() if axis != "backbone"):
            return {k: cell[k] for k in ("val_mean_auroc", "test_mean_auroc", "wall_time_s")}
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="studies-out/kermany-tune", help="Git-ignored folder for the runs.")
    parser.add_argument("--pretrain-epochs", type=int, default=FULL_EPOCHS,
                        help=f"MAE pretraining epochs (the recipe's {FULL_EPOCHS} by default).")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    if not DATA.is_file():
        print(f"skipped: {DATA} not found (the real images are not part of the repository)")
        return
    work = (ROOT / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    pretrain_command, pre = pretrain(work, args.pretrain_epochs)
    config = default_config(work, work / "mae-pretrain" / "mae.pth")
    tune_dir = work / "tune-lora-10"
    tune_command = ["tune", _relative(config), "--trials", str(args.trials), "--out", _relative(tune_dir)]
    seconds = _medpeft(*tune_command)  # resumes a stopped search; a finished one only rewrites tune.json
    tune_json = json.loads((tune_dir / "tune.json").read_text())
    result = {**summarise(tune_dir, tune_json), "trials_asked": args.trials}
    default_metrics = json.loads((tune_dir / result["default"]["run_dir"] / "metrics.json").read_text())
    history = pre["history"]
    full = pre["epochs_run"] == FULL_EPOCHS
    record = {
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, no GPU",
        "commands": [" ".join(["medpeft", *pretrain_command]),
                     f"KERMANY_MAE={_relative(work / 'mae-pretrain' / 'mae.pth')}: the cell {CELL} of {STUDY} "
                     f"-> {_relative(config)}", " ".join(["medpeft", *tune_command])],
        "pretraining": {
            "epochs": pre["epochs_run"], "wall_time_s": pre["wall_time_s"], "train_images": pre["split_sizes"]["train"],
            "val_loss_first": history[0]["val_loss"], "val_loss_last": history[-1]["val_loss"], "history": history,
            "note": "the full recipe of " + PRETRAIN + "." if full else
                    f"{PRETRAIN} shortened from {FULL_EPOCHS} to {pre['epochs_run']} epochs (warmup scaled): the 2 "
                    f"cores were shared with other CPU-heavy jobs, under which the full recipe would have taken "
                    f"hours; default and tuned trials fine-tune the same foundation.",
        },
        "cell": "pneumonia vs normal, LoRA r 8 / alpha 16 on qkv, lr 3e-3, weight decay 0.05, 10 epochs, batch 32, "
                "10% of the training labels, seed 0",
        "default_config": _relative(config), "config": yaml.safe_load(config.read_text()),
        "split_sizes": default_metrics["split_sizes"], "tune_last_invocation_s": seconds,
        "study_reference": _study_reference() if full else None, "result": result,
    }
    record["verdict"] = verdict(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "kermany_tune.json", record)
    write_text_atomic(out / "kermany_tune.md", _markdown(record))
    print(_markdown(record))


if __name__ == "__main__":
    main()
