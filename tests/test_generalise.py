"""Recipes that generalise beyond the internal split: test-time augmentation, an ensemble of runs on one
backbone, and decision thresholds re-fitted on a labelled sample of the target site."""

import io
import json
import shutil
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from scipy.special import expit, logit
from sklearn.metrics import roc_auc_score
from torchvision.transforms.v2 import functional as F

import medpeft
from medpeft.cli import main
from medpeft.config import config_from_dict
from medpeft.data import read_dataset
from medpeft.errors import ConfigError, DataError
from medpeft.inference import IDENTITY, View, evaluate, fit_thresholds, load_ensemble, predict, tta_views
from medpeft.metrics.thresholds import select_threshold, select_thresholds

LABELS = ["bright", "dark"]
PROBS = [f"prob:{label}" for label in LABELS]
PREDS = [f"pred:{label}" for label in LABELS]


@pytest.fixture(scope="module")
def runs(squares_csv, tmp_path_factory):
    """Two finished runs of one task on one random-init backbone (same seed): LoRA and a linear probe."""
    from conftest import TINY_VIT

    root = tmp_path_factory.mktemp("generalise")
    base = {"model": dict(TINY_VIT),
            "data": {"csv": str(squares_csv), "patient_column": "patient", "labels": LABELS,
                     "split": {"val_fraction": 0.25, "test_fraction": 0.25, "seed": 0}},
            "train": {"epochs": 3, "batch_size": 8, "lr": 0.003, "warmup_epochs": 0.5}}
    made = {}
    for name, method in (("lora", {"name": "lora", "r": 4, "alpha": 8}), ("probe", {"name": "linear_probe"})):
        torch.manual_seed(0)
        medpeft.train(config_from_dict({**base, "method": method, "output_dir": str(root / name)}), quiet=True)
        made[name] = root / name
    return made


def _images(run_dir, split="test") -> list[str]:
    run = medpeft.load_run(run_dir)
    ids = pd.read_csv(run_dir / "split.csv", dtype=str).query("split == @split")["image_id"]
    return read_dataset(run.config.data).set_index("image_id").loc[ids, "path"].tolist()


def _invoke(*args) -> tuple[int, str]:
    """`medpeft ARGS` in this process: (exit code, stdout and stderr)."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit) as exited, redirect_stdout(out), \
            redirect_stderr(out):
        patch.setattr(sys, "argv", ["medpeft", *map(str, args)])
        main()
    return exited.value.code or 0, out.getvalue().strip()


# ----------------------------------------------------------------------------- test-time augmentation
def test_tta_views_follow_the_training_augmentation(runs):
    config = medpeft.load_run(runs["lora"]).config  # augment: scale [0.5, 1], hflip 0.5 (the defaults)
    assert [v.name for v in tta_views(config)] == ["identity", "hflip", "crop0.75", "crop0.75+hflip"]
    no_flip = replace(config, augment=replace(config.augment, hflip=0.0))
    assert [v.name for v in tta_views(no_flip)] == ["identity", "crop0.75"]
    with pytest.raises(ConfigError, match="no view besides the image itself"):
        tta_views(replace(config, augment=replace(config.augment, enabled=False)))
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    assert torch.equal(View(hflip=True)(x), x.flip(-1)) and torch.equal(IDENTITY(x), x)
    crop = View(area=0.25)(x)  # the central 16 x 16 pixels, resized back to 32 x 32
    assert torch.equal(crop, F.resize(x[..., 8:24, 8:24], [32, 32], antialias=True))


def test_tta_of_the_identity_view_is_plain_prediction_and_views_average_the_logits(runs, tmp_path):
    run = medpeft.load_run(runs["lora"])
    paths = _images(runs["lora"])
    plain = run.predict(paths)
    identity = run.predict(paths, tta=[IDENTITY])
    assert identity.equals(plain)
    tta = run.predict(paths, tta=True)
    assert tta.equals(run.predict(paths, tta=True))  # deterministic
    assert not np.allclose(tta[PROBS], plain[PROBS], atol=1e-4)
    # The mean of the views' logits: the calibrated probabilities' logits average too (logits / T is linear).
    views = [logit(run.predict(paths, tta=[view])[PROBS].to_numpy(float)) for view in tta_views(run.config)]
    np.testing.assert_allclose(tta[PROBS].to_numpy(float), expit(np.mean(views, axis=0)), atol=1e-5)
    assert (tta[PREDS].to_numpy() == (tta[PROBS].to_numpy() >= list(run.thresholds.values()))).all()
    # A view is what it says: the mirrored view of a mirrored image is the image.
    Image.open(paths[0]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "mirrored.png")
    mirrored = run.predict([tmp_path / "mirrored.png"], tta=[View(hflip=True)])
    np.testing.assert_allclose(mirrored[PROBS].to_numpy(float), plain[PROBS].to_numpy(float)[:1], atol=1e-5)


def test_evaluate_with_tta_records_its_views(runs):
    run = runs["lora"]
    plain = evaluate(run)
    identity = evaluate(run, tta=[IDENTITY], name="identity")
    assert {k: v for k, v in identity.items() if k != "evaluation"} == {k: v for k, v in plain.items()
                                                                        if k != "evaluation"}
    metrics = evaluate(run, tta=True)
    written = json.loads((run / "evaluations" / "test-tta" / "metrics.json").read_text())
    assert written["evaluation"]["tta"] == {"lora": ["identity", "hflip", "crop0.75", "crop0.75+hflip"]}
    assert plain["evaluation"]["tta"] is None and metrics["n"] == plain["n"]
    saved = pd.read_csv(run / "evaluations" / "test-tta" / "predictions.csv")
    tta = medpeft.load_run(run).predict(_images(run), tta=True)  # predict's TTA, before temperature scaling
    raw = expit(logit(tta[PROBS].to_numpy(float)) * medpeft.load_run(run).temperatures)
    np.testing.assert_allclose(saved[PROBS].to_numpy(float), raw, atol=1e-5)
    code, output = _invoke("evaluate", run, "--tta", "--name", "cli-tta")
    assert code == 0, output
    assert json.loads((run / "evaluations" / "cli-tta" / "metrics.json").read_text())["evaluation"]["tta"]


# ----------------------------------------------------------------------------- ensembles
def _calibrated_val(run_dir) -> tuple[np.ndarray, np.ndarray]:
    """Val targets and temperature-scaled probabilities, by image id, from predictions.csv and calibration.json."""
    val = pd.read_csv(run_dir / "predictions.csv", dtype={"image_id": str}).query("split == 'val'")
    val = val.sort_values("image_id")
    temperatures = json.loads((run_dir / "calibration.json").read_text())["temperatures"]
    probs = expit(logit(val[PROBS].to_numpy(float)) / [temperatures[label] for label in LABELS])
    return val[[f"target:{label}" for label in LABELS]].to_numpy(float), probs


def test_an_ensemble_of_one_run_is_the_run(runs):
    paths = _images(runs["lora"])
    run = medpeft.load_run(runs["lora"])
    alone = run.predict(paths)
    ensemble = load_ensemble([runs["lora"]])
    table = ensemble.predict(paths)
    assert table.columns.tolist() == ["input", "error", *(f"ensemble/{c}" for c in PROBS + PREDS)]
    np.testing.assert_allclose(table[[f"ensemble/{c}" for c in PROBS]], alone[PROBS], atol=1e-6)
    assert (table[[f"ensemble/{c}" for c in PREDS]].to_numpy() == alone[PREDS].to_numpy()).all()
    assert ensemble.thresholds == pytest.approx(run.thresholds, rel=1e-5) and ensemble.rule == "youden"


def test_an_ensemble_of_two_is_the_mean_of_their_calibrated_probabilities(runs, tmp_path):
    paths = _images(runs["lora"])
    means = np.mean([medpeft.load_run(runs[n]).predict(paths)[PROBS].to_numpy(float) for n in runs], axis=0)
    ensemble = load_ensemble([runs["lora"], runs["probe"]], threshold="sensitivity:0.9")
    table = predict([ensemble], paths)
    np.testing.assert_allclose(table[[f"ensemble/{c}" for c in PROBS]], means, atol=1e-6)
    (targets, lora), (_, probe) = _calibrated_val(runs["lora"]), _calibrated_val(runs["probe"])
    expected = select_thresholds(targets, (lora + probe) / 2, LABELS, "sensitivity:0.9")
    assert ensemble.thresholds == pytest.approx(expected, rel=1e-5) and ensemble.rule == "sensitivity:0.9"
    assert (table["ensemble/pred:dark"].to_numpy() == (means[:, 1] >= expected["dark"])).all()
    # The backbone once: the probe's frozen blocks are the LoRA run's tensors.
    lora_model, probe_model = (run.model for run in ensemble.runs)
    assert lora_model.blocks[0].mlp.fc1.weight.data_ptr() == probe_model.blocks[0].mlp.fc1.weight.data_ptr()

    code, output = _invoke("predict", "--runs", f"{runs['lora']},{runs['probe']}", "--ensemble", *paths[:4],
                           "--out", tmp_path / "e.csv")
    assert code == 0, output
    assert "lora, probe (ensemble)" in output and "ensemble: youden thresholds" in " ".join(output.split())
    assert pd.read_csv(tmp_path / "e.csv").columns.tolist()[2:] == [f"ensemble/{c}" for c in PROBS + PREDS]

    metrics = evaluate(runs["lora"], ensemble_with=[runs["probe"]])
    assert metrics["evaluation"]["name"] == "test-ensemble"
    assert metrics["evaluation"]["ensemble"] == [str(runs["lora"]), str(runs["probe"])]
    test = pd.read_csv(runs["lora"] / "predictions.csv", dtype={"image_id": str}).query("split == 'test'")
    by_path = dict(zip(paths, means))
    for k, label in enumerate(LABELS):  # the same images in the run's table order
        scored = read_dataset(ensemble.runs[0].config.data).set_index("image_id").loc[test["image_id"], "path"]
        auroc = roc_auc_score(test[f"target:{label}"], [by_path[p][k] for p in scored])
        assert metrics["per_label"][label]["auroc"] == pytest.approx(auroc, abs=1e-9)
    with pytest.raises(ConfigError, match="--calibrated"):
        evaluate(runs["lora"], ensemble_with=[runs["probe"]], calibrated=True)


def test_an_ensemble_of_runs_of_another_task_or_split_is_a_one_line_error(runs, tmp_path):
    relabelled = tmp_path / "relabelled"
    shutil.copytree(runs["probe"], relabelled)
    config = yaml.safe_load((relabelled / "config.yaml").read_text())
    config["data"]["labels"] = ["bright", "Dark"]
    (relabelled / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    for name in ("metrics.json", "calibration.json", "thresholds.json"):
        (relabelled / name).write_text((relabelled / name).read_text().replace('"dark"', '"Dark"'))
    with pytest.raises(ConfigError, match=rf"^{relabelled}: predicts \['bright', 'Dark'\] .*one task"):
        load_ensemble([runs["lora"], relabelled])
    code, output = _invoke("predict", "--runs", f"{runs['lora']},{relabelled}", "--ensemble", _images(runs["lora"])[0],
                           "--out", tmp_path / "p.csv")
    assert code == 2 and output.startswith(f"error: {relabelled}: predicts") and len(output.splitlines()) == 1
    code, output = _invoke("evaluate", runs["lora"], "--ensemble-with", relabelled)
    assert code == 2 and output.startswith(f"error: {relabelled}: predicts") and len(output.splitlines()) == 1

    other_split = tmp_path / "other-split"
    shutil.copytree(runs["probe"], other_split)
    predictions = pd.read_csv(other_split / "predictions.csv", dtype={"image_id": str})
    first_val = predictions.index[predictions["split"] == "val"][0]
    predictions.drop(index=first_val).to_csv(other_split / "predictions.csv", index=False)
    with pytest.raises(ConfigError, match=rf"^{other_split}: its val or test images differ"):
        load_ensemble([runs["lora"], other_split])


# ----------------------------------------------------------------------------- thresholds of the target site
def _shifted_sample(run_dir, folder, factor=0.45) -> tuple:
    """Every squares image darkened (another site's exposure) under `folder`, and SAMPLE.csv of relative paths."""
    folder.mkdir()
    config = medpeft.load_run(run_dir).config
    data = read_dataset(config.data)
    rows = []
    for i, (path, bright, dark) in enumerate(zip(data["path"], data["bright"], data["dark"])):
        pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float32) * factor
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"s{i:03d}.png")
        rows.append({"path": f"s{i:03d}.png", "bright": int(bright), "dark": int(dark)})
    sample = pd.DataFrame(rows)
    sample.to_csv(folder / "sample.csv", index=False)
    return folder / "sample.csv", sample


def _rates(targets: np.ndarray, calls: np.ndarray) -> tuple[float, float]:
    """Sensitivity and specificity of 0/1 calls."""
    return calls[targets == 1].mean(), 1 - calls[targets == 0].mean()


def test_thresholds_refitted_on_a_shifted_sample_restore_the_rule_there(runs, tmp_path):
    csv, sample = _shifted_sample(runs["lora"], tmp_path / "site-b")
    files = [str(tmp_path / "site-b" / p) for p in sample["path"]]
    before = {name: (runs["lora"] / name).read_bytes() for name in ("thresholds.json", "calibration.json")}
    for rule in ("sensitivity:0.9", "youden"):
        run = medpeft.load_run(runs["lora"], threshold=rule)
        (fitted,), record = fit_thresholds([run], csv, rule)
        probs = run.predict(files)[PROBS].to_numpy(float)
        assert record["images"] == len(sample) and record["thresholds"]["lora"]["before"] == run.thresholds
        for k, label in enumerate(LABELS):
            y, p = sample[label].to_numpy(), probs[:, k]
            assert fitted.thresholds[label] == pytest.approx(select_threshold(y, p, rule), rel=1e-6)
            assert fitted.thresholds[label] != pytest.approx(run.thresholds[label], abs=1e-3)
            old, new = _rates(y, p >= run.thresholds[label]), _rates(y, p >= fitted.thresholds[label])
            if rule == "youden":
                assert sum(new) >= sum(old)
            else:
                assert new[0] >= 0.9
        assert fitted.rule == rule
    # The darker site: the val threshold misses the bright squares, the re-fitted one finds them.
    assert _rates(sample["bright"].to_numpy(), probs[:, 0] >= run.thresholds["bright"])[0] < 0.5
    assert before == {name: (runs["lora"] / name).read_bytes() for name in before}

    code, output = _invoke("predict", runs["lora"], *files[:5], "--fit-threshold", csv, "--threshold",
                           "sensitivity:0.9", "--out", tmp_path / "p.csv")
    assert code == 0, output
    unwrapped = "".join(output.split())  # the console wraps lines at spaces or inside the long path
    assert "".join(f"re-fitted on {csv} (64 images), val -> sample: bright ".split()) in unwrapped
    written = json.loads((tmp_path / "p.thresholds.json").read_text())
    fitted = fit_thresholds([medpeft.load_run(runs["lora"], "sensitivity:0.9")], csv, "sensitivity:0.9")[1]
    assert written == fitted
    table = pd.read_csv(tmp_path / "p.csv")
    after = written["thresholds"]["lora"]["after"]
    assert (table[PREDS].to_numpy() == (table[PROBS].to_numpy() >= [after[k] for k in LABELS])).all()


def test_a_bad_sample_csv_is_one_line_naming_the_file_row_and_column(runs, tmp_path):
    csv, sample = _shifted_sample(runs["lora"], tmp_path / "site")
    run = medpeft.load_run(runs["lora"])

    def refused(frame, match):
        frame.to_csv(csv, index=False)
        with pytest.raises(DataError, match=match):
            fit_thresholds([run], csv)

    refused(sample.drop(columns="dark"), rf"^{csv}: column 'dark' not found")
    refused(sample.assign(dark=sample["dark"].astype(str).where(sample.index != 2, "yes")),
            rf"^{csv}: row 4: column 'dark' has 'yes', expected 0 or 1")
    refused(sample.assign(path=sample["path"].where(sample.index != 0, "gone.png")),
            rf"^{csv}: row 2: image 'gone.png' not found")
    refused(sample.assign(bright=0), rf"^{csv}: column 'bright' has no positives")
    refused(sample.iloc[:0], rf"^{csv}: no rows")
    (csv.parent / sample["path"].iloc[1]).write_bytes(b"not an image")
    refused(sample, rf"^{csv}: row 3: {csv.parent / sample['path'].iloc[1]}: ")
    with pytest.raises(DataError, match=rf"^{tmp_path / 'missing.csv'}: sample CSV not found"):
        fit_thresholds([run], tmp_path / "missing.csv")
    sample.assign(dark=sample["dark"].astype(str).where(sample.index != 2, "2")).to_csv(csv, index=False)
    code, output = _invoke("predict", runs["lora"], sample["path"].iloc[0], "--fit-threshold", csv,
                           "--out", tmp_path / "p.csv")
    assert code == 2 and output == f"error: {csv}: row 4: column 'dark' has '2', expected 0 or 1"
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "p.thresholds.json").exists()
