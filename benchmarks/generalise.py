"""Recipes that generalise beyond the internal split, measured on the real pediatric chest X-rays
(../shared/data/kermany-pediatric-cxr): test-time augmentation, a 3-seed ensemble of adapters on one
backbone, and decision thresholds re-fitted on a small labelled sample of a shifted "target site".

    python benchmarks/generalise.py [--work studies-out/generalise] [--out benchmarks/results]

1. Backbone: the ViT-tiny of studies/kermany-mae-pretrain.yaml (64 px, depth 4, 8 px patches)
   MAE-pretrained without labels on the training images of its patient-level split (seed 0), for
   --mae-epochs (default 20; the study's 80 do not fit the shared cores).
2. Recipe: LoRA (r 8, alpha 16 on qkv, lr 3e-3, batch 64, augment scale [0.5, 1] and hflip 0.5), the
   pneumonia cell of studies/kermany-mae.yaml at all labels, for --epochs (default 4), train.seed 0, 1, 2
   on that split (its test patients unseen by pretraining and training).
3. Target site ("site B"): the official Kermany test set is not available, so the internal test images
   are passed through a fixed transform of what another hospital's scanner and processing give (`site_b`):
   a different detector response (gamma 1.6 on grey levels in [0, 1]: darker mid-tones), lower contrast
   (x 0.7 about mid-grey) and a softer detector (Gaussian blur of radius 1.5 px at the files' 224 px).
4. Measured with medpeft.evaluate on the internal test split and on site B: AUROC with its 95% stratified
   bootstrap interval (2000 resamples) of seed 0 alone, seed 0 with --tta, the 3-seed ensemble and the
   ensemble with --tta, and each one's paired bootstrap difference to seed 0 alone (the same images and
   resamples). Thresholds (youden and sensitivity:0.9), for seed 0 and for the ensemble: sensitivity and
   specificity at the threshold chosen on the internal val split, on the internal test split and on site B,
   against a threshold re-fitted on a labelled sample of site B (--sample images, half of each class, whole
   patients; `_draw`) with medpeft.inference.fit_thresholds, both scored on the rest of site B; and the
   same over --draws samples (seeds 0, 1, ...), as mean and sd.

Writes generalise.json and generalise.md. Finished steps (pretraining, runs, site B images) are reused:
delete <work> to start over. Skips (exit 0, with the reason) when the data folder is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "../shared/data/kermany-pediatric-cxr"
PRETRAIN = "studies/kermany-mae-pretrain.yaml"
LABEL = "PNEUMONIA"
SEEDS = (0, 1, 2)
RULES = ("youden", "sensitivity:0.9")
GAMMA, CONTRAST, BLUR = 1.6, 0.7, 1.5


def site_b(image: Image.Image) -> Image.Image:
    """An image as the target site's scanner would give it: grey levels x in [0, 1] -> 0.5 + CONTRAST *
    (x ** GAMMA - 0.5), then a Gaussian blur of radius BLUR px. Deterministic."""
    x = np.asarray(image.convert("L"), dtype=np.float64) / 255
    x = 0.5 + CONTRAST * (x ** GAMMA - 0.5)
    out = Image.fromarray(np.clip(np.round(x * 255), 0, 255).astype(np.uint8))
    return out.filter(ImageFilter.GaussianBlur(BLUR))


def _medpeft(*args: str) -> float:
    print("$ medpeft", " ".join(args), flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "medpeft", *args], cwd=ROOT, check=True)
    return time.perf_counter() - start


def _train(work: Path, mae_epochs: int, epochs: int) -> tuple[list[Path], dict]:
    """The MAE backbone and the 3 LoRA runs (reused when finished); the wall time of each step, kept in
    <work>/times.json for the invocations that reuse it."""
    record = work / "times.json"
    times = json.loads(record.read_text()) if record.is_file() else {}
    mae = work / "mae"
    if not (mae / "metrics.json").is_file():
        times["pretrain_s"] = _medpeft("pretrain", PRETRAIN, "--out", str(mae), "--set", f"train.epochs={mae_epochs}",
                                       "--set", "train.warmup_epochs=2", "--set", f"data.csv={DATA / 'labels.csv'}",
                                       "--set", f"data.cache_dir={work / 'cache'}")
    runs = []
    for seed in SEEDS:
        run = work / f"lora-seed{seed}"
        config = {
            "model": {"name": "vit_tiny_patch16_224", "weights": str(mae / "mae.pth"), "img_size": 64,
                      "drop_path_rate": 0.0, "global_pool": "avg", "kwargs": {"depth": 4, "patch_size": 8}},
            "data": {"csv": str(DATA / "labels.csv"), "patient_column": "patient_id", "label_column": "label",
                     "labels": [LABEL], "negative_names": ["NORMAL"], "cache_dir": str(work / "cache"),
                     "split": {"val_fraction": 0.15, "test_fraction": 0.15, "seed": 0}},
            "method": {"name": "lora", "r": 8, "alpha": 16, "targets": ["qkv"]},
            "train": {"epochs": epochs, "batch_size": 64, "lr": 3.0e-3, "warmup_epochs": 1, "weight_decay": 0.05,
                      "seed": seed},
            "augment": {"scale": [0.5, 1.0], "hflip": 0.5},
            "output_dir": str(run)}
        if not (run / "metrics.json").is_file():
            (work / f"lora-seed{seed}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            times[f"train_seed{seed}_s"] = _medpeft("train", str(work / f"lora-seed{seed}.yaml"))
        runs.append(run)
    record.write_text(json.dumps({k: round(v, 1) for k, v in times.items()}))
    return runs, times


def _site(run: Path, work: Path) -> Path:
    """Site B: the run's test images through `site_b`, as PNGs with labels.csv; its data config's path."""
    folder = work / "site-b"
    spec = work / "site-b.yaml"
    if not spec.is_file():
        split = pd.read_csv(run / "split.csv", dtype=str)
        table = pd.read_csv(DATA / "labels.csv", dtype=str)
        table = table[table["path"].isin(split.loc[split["split"] == "test", "image_id"])]
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for path, label, patient in zip(table["path"], table["label"], table["patient_id"]):
            name = Path(path).with_suffix(".png").name
            site_b(Image.open(DATA / path)).save(folder / name)
            rows.append({"path": name, "label": label, LABEL: int(label == LABEL), "patient_id": patient})
        pd.DataFrame(rows).to_csv(folder / "labels.csv", index=False)
        spec.write_text(yaml.safe_dump({"data": {
            "csv": str(folder / "labels.csv"), "patient_column": "patient_id", "label_column": "label",
            "labels": [LABEL], "negative_names": ["NORMAL"]}}))
    return spec


def _aurocs(runs: list[Path], spec: Path | None) -> dict:
    """Per variant (single, tta, ensemble, ensemble + tta): AUROC, 95% CI, and the paired difference to single."""
    from medpeft.inference import evaluate
    from medpeft.metrics import auroc
    from medpeft.metrics.compare import bootstrap_auroc_difference, percentile_interval, resampled_mean_aurocs

    variants = {"seed 0": {}, "seed 0 + TTA": {"tta": True}, "3-seed ensemble": {"ensemble_with": runs[1:]},
                "3-seed ensemble + TTA": {"ensemble_with": runs[1:], "tta": True}}
    scores, targets = {}, None
    for variant, options in variants.items():
        metrics = evaluate(runs[0], data=spec, **options)
        folder = runs[0] / "evaluations" / metrics["evaluation"]["name"]
        rows = pd.read_csv(folder / "predictions.csv", dtype={"image_id": str})
        assert targets is None or (rows[f"target:{LABEL}"].to_numpy() == targets).all()
        targets, scores[variant] = rows[f"target:{LABEL}"].to_numpy(), rows[f"prob:{LABEL}"].to_numpy()
    resampled = resampled_mean_aurocs(targets, *scores.values(), n_resamples=2000, seed=0)
    result = {"images": len(targets), "positives": int(targets.sum()), "variants": {}}
    for k, (variant, score) in enumerate(scores.items()):
        low, high = percentile_interval(resampled[:, k], 0.95)
        difference = bootstrap_auroc_difference(targets, score, scores["seed 0"], n_resamples=2000, seed=0)
        result["variants"][variant] = {
            "auroc": auroc(targets, score), "ci": [low, high],
            "minus_single": None if k == 0 else {"estimate": difference.estimate, "ci": [difference.ci_low,
                                                 difference.ci_high], "p_value": difference.p_value}}
    return result


def _draw(table: pd.DataFrame, size: int, seed: int) -> np.ndarray:
    """A labelled sample of site B: per class, whole patients in a seeded random order until size / 2 images
    (a Kermany patient's images share one class). Sensitivity and specificity, and so both rules, are per
    class: a sample with both classes in equal parts chooses them best for its size. (N,) bool."""
    taken = np.zeros(len(table), dtype=bool)
    for value in (0, 1):
        rows = table[table[LABEL] == value]
        patients = rows["patient_id"].drop_duplicates().sample(frac=1.0, random_state=seed)
        sizes = rows.groupby("patient_id").size()[patients].cumsum().to_numpy()
        taken |= table["patient_id"].isin(patients.iloc[:int(np.searchsorted(sizes, size / 2)) + 1]).to_numpy()
    return taken


def _rates(targets: np.ndarray, probs: np.ndarray, threshold: float) -> dict:
    calls = probs >= threshold
    positives, negatives = targets == 1, targets == 0
    return {"threshold": threshold, "sensitivity": float(calls[positives].mean()),
            "specificity": float(1 - calls[negatives].mean()),
            "tp": int((calls & positives).sum()), "fn": int((~calls & positives).sum()),
            "tn": int((~calls & negatives).sum()), "fp": int((calls & negatives).sum())}


def _summary(rates: list[dict]) -> dict:
    return {key: {"mean": float(np.mean([r[key] for r in rates])), "sd": float(np.std([r[key] for r in rates], ddof=1)),
                  "min": float(np.min([r[key] for r in rates])), "max": float(np.max([r[key] for r in rates]))}
            for key in ("threshold", "sensitivity", "specificity")}


def _thresholds(runs: list[Path], spec: Path, size: int, draws: int) -> dict:
    """Per predictor and rule: sensitivity / specificity at the val threshold on the internal test split and
    on the rest of site B, and at the threshold re-fitted on a site-B sample, on the same rest: for the
    seed-0 sample through medpeft.inference.fit_thresholds (written as SAMPLE.csv), and over `draws`
    samples (seeds 0, 1, ...) by the same rule on the same probabilities."""
    import medpeft
    from medpeft.inference import fit_thresholds, load_ensemble
    from medpeft.metrics.thresholds import select_threshold

    folder = Path(yaml.safe_load(spec.read_text())["data"]["csv"]).parent
    site = pd.read_csv(folder / "labels.csv", dtype={"patient_id": str})
    y = site[LABEL].to_numpy()
    samples = [_draw(site, size, seed) for seed in range(draws)]
    site[samples[0]][["path", LABEL]].to_csv(folder / "sample.csv", index=False)
    internal = pd.read_csv(runs[0] / "split.csv", dtype=str).query("split == 'test'")["image_id"]
    internal_y = (pd.read_csv(DATA / "labels.csv", dtype=str).set_index("path").loc[internal, "label"] == LABEL)
    result = {"sample": {"images": int(samples[0].sum()), "positives": int(y[samples[0]].sum()), "draws": draws},
              "rest": {"images": int((~samples[0]).sum()), "positives": int(y[~samples[0]].sum())}, "predictors": {}}
    loaders = {"seed 0": lambda rule: medpeft.load_run(runs[0], threshold=rule),
               "3-seed ensemble": lambda rule: load_ensemble(runs, threshold=rule)}
    for name, load in loaders.items():
        column = ("" if name == "seed 0" else "ensemble/") + f"prob:{LABEL}"
        predictor = load(RULES[0])
        internal_p = predictor.predict([str(DATA / p) for p in internal])[column].to_numpy()
        p = predictor.predict([str(folder / f) for f in site["path"]])[column].to_numpy()
        for rule in RULES:
            ruled = load(rule)
            val_t = ruled.thresholds[LABEL]
            (fitted,), _ = fit_thresholds([ruled], folder / "sample.csv", rule)
            refits = [select_threshold(y[s], p[s], rule) for s in samples]
            assert abs(refits[0] - fitted.thresholds[LABEL]) < 1e-6  # the same choice as the command line's
            result["predictors"][f"{name}, {rule}"] = {
                "internal test, val threshold": _rates(internal_y.to_numpy().astype(int), internal_p, val_t),
                "site B rest, val threshold": _rates(y[~samples[0]], p[~samples[0]], val_t),
                "site B rest, re-fitted threshold": _rates(y[~samples[0]], p[~samples[0]], refits[0]),
                "over draws, val threshold": _summary([_rates(y[~s], p[~s], val_t) for s in samples]),
                "over draws, re-fitted threshold": _summary([_rates(y[~s], p[~s], t)
                                                             for s, t in zip(samples, refits)])}
    return result


def _points(value) -> str:
    return f"{100 * value:.1f}"


def _markdown(result: dict) -> str:
    sizes, t = result["split_sizes"], result["thresholds"]
    lines = [
        "# Recipes that generalise: TTA, a 3-seed ensemble and thresholds re-fitted at the target site",
        "",
        f"`python benchmarks/generalise.py` on {result['machine']} (cores shared with other work): real Kermany "
        f"pediatric X-rays, pneumonia vs normal. A ViT-tiny (64 px, depth 4) MAE-pretrained without labels for "
        f"{result['mae_epochs']} epochs, then LoRA (r 8 on qkv, {result['epochs']} epochs, all "
        f"{sizes['train']} training images) with train.seed 0, 1, 2 on one patient-level split "
        f"({sizes['val']} val, {sizes['test']} test images). Site B: the internal test images through a fixed "
        f"transform of another scanner (gamma {GAMMA}, contrast x{CONTRAST} about mid-grey, Gaussian blur "
        f"{BLUR} px at 224 px; `site_b` in the script). Wall time of the steps: "
        f"{', '.join(f'{k} {v / 60:.1f} min' for k, v in result['step_times_s'].items())}; site B, evaluations "
        f"and thresholds {result['evaluation_wall_s'] / 60:.1f} min.",
        "",
        "## AUROC (points), 95% stratified bootstrap interval; paired difference to seed 0 alone",
        "",
        "TTA: `--tta`, the mean logit over the views the recipe's augmentation covered (identity, hflip, a centred "
        "crop of 0.75 of the area, and its mirror). Ensemble: `--ensemble-with`, the mean of the 3 runs' "
        "temperature-scaled probabilities. Differences: same images, same 2000 resamples (p: bootstrap).",
        "",
        "| test set | images (positives) | predictor | AUROC | 95% CI | minus seed 0 | 95% CI | p |",
        "| --- | ---: | --- | ---: | --- | ---: | --- | ---: |",
    ]
    for where, block in result["auroc"].items():
        for variant, row in block["variants"].items():
            diff = row["minus_single"]
            d = ("", "", "") if diff is None else (
                f"{100 * diff['estimate']:+.1f}", f"[{100 * diff['ci'][0]:+.1f}, {100 * diff['ci'][1]:+.1f}]",
                f"{diff['p_value']:.3f}")
            lines.append(f"| {where} | {block['images']} ({block['positives']}) | {variant} | {_points(row['auroc'])} "
                         f"| [{_points(row['ci'][0])}, {_points(row['ci'][1])}] | {d[0]} | {d[1]} | {d[2]} |")
    lines += [
        "",
        "## Sensitivity / specificity (%) at the decision threshold",
        "",
        f"'val threshold': chosen by the rule on the internal val split (the run's, or the ensemble's on its mean "
        f"probabilities). 're-fitted': chosen by the same rule on a labelled sample of site B, scored on the rest "
        f"of site B, never on the sample. Sample 0: {t['sample']['images']} images of whole patients, "
        f"{t['sample']['positives']} pneumonia (half of each class; `medpeft predict --fit-threshold`), rest "
        f"{t['rest']['images']} images, {t['rest']['positives']} pneumonia. Over {t['sample']['draws']} samples "
        f"(seeds 0, 1, ...): mean +- sd over the draws, each scored on its own rest.",
        "",
        "| predictor, rule | internal test, val threshold | site B, val threshold | site B, re-fitted (sample 0) | "
        f"threshold val -> re-fitted | {t['sample']['draws']} samples: val threshold | re-fitted | re-fitted "
        "threshold |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in t["predictors"].items():
        cells = [f"{_points(r['sensitivity'])} / {_points(r['specificity'])}" for r in list(row.values())[:3]]
        spread = [f"{_points(r['sensitivity']['mean'])} +- {_points(r['sensitivity']['sd'])} / "
                  f"{_points(r['specificity']['mean'])} +- {_points(r['specificity']['sd'])}"
                  for r in (row["over draws, val threshold"], row["over draws, re-fitted threshold"])]
        refit = row["over draws, re-fitted threshold"]["threshold"]
        lines.append(f"| {name} | {' | '.join(cells)} | {row['site B rest, val threshold']['threshold']:.3f} -> "
                     f"{row['site B rest, re-fitted threshold']['threshold']:.3f} | {' | '.join(spread)} | "
                     f"{refit['mean']:.3f} +- {refit['sd']:.3f} |")
    single = {where: block["variants"]["seed 0"]["auroc"] for where, block in result["auroc"].items()}
    youden = t["predictors"]["seed 0, youden"]
    internal, shifted, refit = (youden[k] for k in ("internal test, val threshold", "site B rest, val threshold",
                                                    "site B rest, re-fitted threshold"))
    lines += [
        "",
        f"Reading: site B costs seed 0 {100 * (single['internal test'] - single['site B']):.1f} AUROC points, "
        f"while at its val-chosen Youden threshold the specificity falls from {_points(internal['specificity'])}% "
        f"on the internal test split to {_points(shifted['specificity'])}% on site B (sensitivity "
        f"{_points(internal['sensitivity'])}% -> {_points(shifted['sensitivity'])}%): the probabilities shift "
        f"while their order mostly holds. Re-fitted on sample 0 the threshold gives "
        f"{_points(refit['sensitivity'])}% / {_points(refit['specificity'])}% on the rest of site B. The spread "
        f"over the samples is what {t['sample']['images']} labelled images buy: a sensitivity rule chosen on "
        f"about {t['sample']['positives']} positives is the noisier one.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default=str(ROOT / "studies-out" / "generalise"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--mae-epochs", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--sample", type=int, default=50, help="Images of site B labelled for the re-fit.")
    parser.add_argument("--draws", type=int, default=20, help="Samples drawn to show the re-fit's spread.")
    args = parser.parse_args()
    if not (DATA / "labels.csv").is_file():
        print(f"skipped: {DATA / 'labels.csv'} not found (the real images are not part of the repository)")
        return
    from medpeft.files import write_json_atomic, write_text_atomic

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    runs, times = _train(work, args.mae_epochs, args.epochs)
    start = time.perf_counter()
    spec = _site(runs[0], work)
    result = {
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, no GPU",
        "mae_epochs": args.mae_epochs, "epochs": args.epochs,
        "split_sizes": json.loads((runs[0] / "metrics.json").read_text())["split_sizes"],
        "site_b": {"gamma": GAMMA, "contrast": CONTRAST, "blur_radius_px": BLUR},
        "auroc": {"internal test": _aurocs(runs, None), "site B": _aurocs(runs, spec)},
        "thresholds": _thresholds(runs, spec, args.sample, args.draws),
        "step_times_s": {k: round(v, 1) for k, v in times.items()},
    }
    result["evaluation_wall_s"] = round(time.perf_counter() - start, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "generalise.json", result)
    write_text_atomic(out / "generalise.md", _markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()
