"""Evidence around a run: temperature scaling fitted on val and applied by predict / export / evaluate,
calibration and subgroup results in every evaluation, and evaluation on another dataset (external
validation) whose label names differ."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy.special import expit, logit
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

import medpeft
from medpeft.cli import app
from medpeft.config import config_from_dict
from medpeft.data import read_dataset
from medpeft.data.labels import LABEL_MAP, LABEL_MAP_DATASETS, match_labels
from medpeft.errors import ConfigError, RunDirError
from medpeft.inference import evaluate

LABELS = ["bright", "dark"]


def _ece(y, p, bins=10):
    """Equal-mass ECE written out: sort, cut into `bins` runs of near-equal size, weigh |mean y - mean p|."""
    order = np.argsort(p, kind="stable")
    return sum(len(b) / len(p) * abs(y[b].mean() - p[b].mean()) for b in np.array_split(order, bins) if len(b))


@pytest.fixture(scope="module")
def run(squares_csv, tmp_path_factory):
    from conftest import TINY_VIT

    root = tmp_path_factory.mktemp("evidence")
    csv = pd.read_csv(squares_csv)
    csv["sex"] = np.where(np.arange(len(csv)) % 4 < 2, "F", "M")  # whole patients (2 rows each)
    csv["age"] = (20 + 7 * (np.arange(len(csv)) // 2) % 60).astype(str)
    csv["path"] = [str(squares_csv.parent / p) for p in csv["path"]]
    csv.to_csv(root / "labels.csv", index=False)
    config = {"model": dict(TINY_VIT),
              "data": {"csv": str(root / "labels.csv"), "patient_column": "patient", "labels": LABELS,
                       "subgroup_columns": ["sex"], "age_column": "age",
                       "split": {"val_fraction": 0.25, "test_fraction": 0.25, "seed": 0}},
              "method": {"name": "lora", "r": 4, "alpha": 8},
              "train": {"epochs": 3, "batch_size": 8, "lr": 0.003, "warmup_epochs": 0.5},
              "output_dir": str(root / "run")}
    medpeft.train(config_from_dict(config), quiet=True)
    return root / "run"


def _saved(run_dir, split):
    rows = pd.read_csv(run_dir / "predictions.csv", dtype={"image_id": str})
    return rows[rows["split"] == split].reset_index(drop=True)


def _temperatures(run_dir):
    record = json.loads((run_dir / "calibration.json").read_text())
    return np.array([record["temperatures"][label] for label in LABELS]), record


def test_temperature_scaling_is_fitted_on_val_and_reported_beside_the_raw_calibration(run):
    temperatures, record = _temperatures(run)
    assert record["fitted_on"] == "val" and record["val_nll_after"] <= record["val_nll_before"]
    val = _saved(run, "val")
    y, p = val[[f"target:{k}" for k in LABELS]].to_numpy(), val[[f"prob:{k}" for k in LABELS]].to_numpy()
    nll = lambda q: -np.mean(y * np.log(q) + (1 - y) * np.log(1 - q))  # noqa: E731
    assert nll(p) == pytest.approx(record["val_nll_before"], rel=1e-4)
    assert nll(expit(logit(p) / temperatures)) == pytest.approx(record["val_nll_after"], rel=1e-4)
    metrics = json.loads((run / "metrics.json").read_text())["test"]
    test = _saved(run, "test")
    for k, label in enumerate(LABELS):
        y, p = test[f"target:{label}"].to_numpy(), test[f"prob:{label}"].to_numpy()
        scaled = expit(logit(p) / temperatures[k])
        calibration = metrics["calibration"]
        assert calibration["raw"]["per_label"][label]["ece"] == pytest.approx(_ece(y, p), abs=1e-6)
        assert calibration["calibrated"]["per_label"][label]["ece"] == pytest.approx(_ece(y, scaled), abs=1e-5)
        assert calibration["raw"]["per_label"][label]["brier"] == pytest.approx(np.mean((p - y) ** 2), abs=1e-6)
        assert roc_auc_score(y, scaled) == pytest.approx(metrics["per_label"][label]["auroc"], abs=1e-12)
    assert calibration["binning"] == "equal-mass" and calibration["n_bins"] == 10


def test_subgroups_of_the_csv_columns_equal_sklearn_on_each_group(run):
    metrics = json.loads((run / "metrics.json").read_text())["test"]
    test = _saved(run, "test")
    assert set(metrics["subgroups"]) == {"sex", "age"}
    for value, group in metrics["subgroups"]["sex"]["groups"].items():
        rows = test[test["meta:sex"] == value]
        assert group["n"] == len(rows)
        for label in LABELS:
            y = rows[f"target:{label}"]
            expected = roc_auc_score(y, rows[f"prob:{label}"]) if y.nunique() == 2 else None
            assert group["per_label"][label] == pytest.approx(expected, abs=1e-12)
    assert set(metrics["subgroups"]["age"]["groups"]) <= {"20-39", "40-59", "60-79", "80+", "0-19"}


def test_predict_and_export_apply_the_temperatures_with_the_same_decisions(run, tmp_path):
    temperatures, _ = _temperatures(run)
    test = _saved(run, "test")
    loaded = medpeft.load_run(run)
    table = read_dataset(loaded.config.data).set_index("image_id")
    out = loaded.predict(table.loc[test["image_id"], "path"].tolist())
    raw = test[[f"prob:{k}" for k in LABELS]].to_numpy()
    np.testing.assert_allclose(out[[f"prob:{k}" for k in LABELS]].to_numpy(), expit(logit(raw) / temperatures),
                               atol=1e-5)
    stored = json.loads((run / "thresholds.json").read_text())["thresholds"]
    for k, label in enumerate(LABELS):  # the thresholds moved with the probabilities: the same calls
        assert (out[f"pred:{label}"].to_numpy() == (raw[:, k] >= stored[label])).all()
    manifest = loaded.export(tmp_path / "export")
    assert manifest["calibration"]["temperatures"] == pytest.approx(dict(zip(LABELS, temperatures)))
    assert manifest["decision"]["on"] == "calibrated probabilities"


def test_evaluate_writes_a_named_folder_and_leaves_the_run_as_it_was(run):
    before = {name: (run / name).read_bytes() for name in ("metrics.json", "predictions.csv")}
    metrics = evaluate(run)
    stored = json.loads((run / "metrics.json").read_text())["test"]
    assert metrics["mean_auroc"] == pytest.approx(stored["mean_auroc"], abs=1e-6)
    written = json.loads((run / "evaluations" / "test" / "metrics.json").read_text())
    assert written["evaluation"]["name"] == "test" and written["evaluation"]["absent"] == []
    saved = pd.read_csv(run / "evaluations" / "test" / "predictions.csv")
    np.testing.assert_allclose(saved[[f"prob:{k}" for k in LABELS]], _saved(run, "test")[[f"prob:{k}" for k in LABELS]],
                               atol=1e-6)
    assert before == {name: (run / name).read_bytes() for name in before}
    calibrated = evaluate(run, calibrated=True)
    assert (run / "evaluations" / "test-calibrated").is_dir()
    assert calibrated["per_label"]["bright"]["auroc"] == pytest.approx(metrics["per_label"]["bright"]["auroc"])


def test_external_data_with_other_label_names_meet_through_the_map(run, tmp_path):
    csv = pd.read_csv(run.parent / "labels.csv").rename(columns={"bright": "Bright", "dark": "dark_spot"})
    csv = csv.drop(columns=["dark_spot"])
    csv.to_csv(tmp_path / "other.csv", index=False)
    spec = tmp_path / "hospital-b.yaml"
    spec.write_text(yaml.safe_dump({"data": {"csv": str(tmp_path / "other.csv"), "patient_column": "patient",
                                             "labels": ["Bright"], "subgroup_columns": ["sex"]}}))
    metrics = evaluate(run, split="all", data=spec)
    assert metrics["evaluation"]["label_map"] == {"bright": "Bright", "dark": None}
    assert metrics["evaluation"]["absent"] == ["dark"] and list(metrics["per_label"]) == ["bright"]
    assert metrics["n"] == len(csv)
    folder = run / "evaluations" / "hospital-b"
    scored = pd.read_csv(folder / "predictions.csv", dtype={"image_id": str}).set_index("image_id")
    own = _saved(run, "test").set_index("image_id")  # the same images: the same probabilities
    np.testing.assert_allclose(scored.loc[own.index, "prob:bright"], own["prob:bright"], atol=1e-6)
    assert scored["target:bright"].tolist() == csv["Bright"].astype(float).tolist()
    assert set(metrics["subgroups"]) == {"sex"}
    result = CliRunner().invoke(app, ["evaluate", str(run), "--data", str(spec), "--name", "b2",
                                      "--map", "bright=Bright"])
    assert result.exit_code == 0, result.output
    assert (run / "evaluations" / "b2" / "metrics.json").is_file()


def test_bad_external_evaluations_are_one_line_errors(run, tmp_path):
    spec = tmp_path / "x.yaml"
    spec.write_text(yaml.safe_dump({"data": {"csv": str(run.parent / "labels.csv"), "labels": ["sex"]}}))
    with pytest.raises(ConfigError, match="none of the run's labels"):
        evaluate(run, split="all", data=spec)
    with pytest.raises(ConfigError, match="the run has no label 'cancer'"):
        evaluate(run, split="all", data=spec, label_map={"cancer": "sex"})
    with pytest.raises(ConfigError, match="evaluation name"):
        evaluate(run, name="../escape")
    result = CliRunner().invoke(app, ["evaluate", str(run), "--data", str(spec), "--map", "bright"])
    assert result.exit_code == 2 and "RUN_LABEL=DATA_LABEL" in result.output
    (tmp_path / "old").mkdir()
    for name in ("config.yaml", "metrics.json", "split.csv", "predictions.csv", "thresholds.json"):
        (tmp_path / "old" / name).write_bytes((run / name).read_bytes())
    with pytest.raises(RunDirError, match="calibration.json"):
        evaluate(tmp_path / "old", calibrated=True)


def test_label_map_is_one_table_joining_the_datasets_by_finding():
    from medpeft.data.labels import CHEXPERT_LABELS, NIH_LABELS, RSNA_CLASSES, RSNA_LABELS

    columns = dict(zip(LABEL_MAP_DATASETS, zip(*LABEL_MAP)))
    assert set(NIH_LABELS) <= set(columns["nih"]) and set(CHEXPERT_LABELS) <= set(columns["chexpert"])
    assert set(RSNA_LABELS + RSNA_CLASSES[:1] + RSNA_CLASSES[2:]) <= set(columns["rsna"])
    for column in columns.values():  # a name means one finding
        names = [n for n in column if n]
        assert len(names) == len(set(names))
    matched = match_labels(NIH_LABELS, CHEXPERT_LABELS)
    assert matched["Effusion"] == "Pleural Effusion" and matched["Nodule"] is None and matched["Hernia"] is None
    assert match_labels(["pleural_effusion"], NIH_LABELS) == {"pleural_effusion": "Effusion"}
    assert match_labels(["Lung Opacity"], RSNA_CLASSES) == {"Lung Opacity": "Lung Opacity"}
    assert match_labels(["x"], ["y"], {"x": "y"}) == {"x": "y"}


def test_an_nih_run_evaluates_on_a_chexpert_set_of_the_same_images_through_the_label_map(tmp_path):
    from conftest import TINY_VIT
    from phantom_layouts import write_phantom_layouts

    files = write_phantom_layouts(tmp_path / "data", n_patients=30, size=32, prevalence=0.4)
    config = {"model": dict(TINY_VIT), "method": {"name": "linear_probe"},
              "data": {"format": "nih", "csv": files["nih"], "labels": ["Cardiomegaly", "Effusion", "Nodule"],
                       "split": {"val_fraction": 0.3, "test_fraction": 0.3, "seed": 0}},
              "train": {"epochs": 1, "batch_size": 16, "lr": 0.01}, "output_dir": str(tmp_path / "nih-run")}
    medpeft.train(config_from_dict(config), quiet=True)
    run = tmp_path / "nih-run"
    spec = tmp_path / "chexpert.yaml"
    spec.write_text(yaml.safe_dump({"data": {"format": "chexpert", "csv": files["chexpert"]}}))
    metrics = evaluate(run, data=spec)
    assert metrics["evaluation"]["label_map"] == {"Cardiomegaly": "Cardiomegaly", "Effusion": "Pleural Effusion",
                                                  "Nodule": None}
    assert metrics["evaluation"]["absent"] == ["Nodule"] and list(metrics["per_label"]) == ["Cardiomegaly", "Effusion"]
    assert set(metrics["subgroups"]) == {"sex", "age", "frontal_lateral", "ap_pa"}
    evaluate(run, split="all")  # the NIH layout's every image, for comparison
    nih = pd.read_csv(run / "evaluations" / "all" / "predictions.csv", dtype={"image_id": str})
    chexpert = pd.read_csv(run / "evaluations" / "chexpert" / "predictions.csv", dtype={"image_id": str})
    # patient N, follow-up F is 000000NN_00F.png in one layout and .../patientNNNNN/study{F+1}/... in the other
    parts = chexpert["image_id"].str.extract(r"patient(\d+)/study(\d+)/").astype(int)
    chexpert.index = [f"{p:08d}_{s - 1:03d}.png" for p, s in zip(parts[0], parts[1])]
    nih = nih.set_index("image_id").loc[chexpert.index]
    for ours in ("Cardiomegaly", "Effusion"):
        np.testing.assert_allclose(chexpert[f"prob:{ours}"], nih[f"prob:{ours}"], atol=1e-6)
        np.testing.assert_array_equal(chexpert[f"target:{ours}"], nih[f"target:{ours}"])
        assert metrics["per_label"][ours]["auroc"] == pytest.approx(
            roc_auc_score(chexpert[f"target:{ours}"], chexpert[f"prob:{ours}"]), abs=1e-12)
