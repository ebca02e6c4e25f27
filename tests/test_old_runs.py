"""Run directories written by medpeft 0.1 before the config schema and recipe were restructured
(tests/fixtures/runs_v0_1: LoRA on q/v, AdaLoRA, SSF, norm tuning of a CNN with BatchNorm statistics)
still load, predict what they predicted then, evaluate to their recorded metrics, and their configs
train again to the same metrics."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import interrupted_at_call, write_squares_dataset

import medpeft
from medpeft.config import RunConfig, build, upgrade_saved

FIXTURES = Path(__file__).parent / "fixtures" / "runs_v0_1"
RUNS = sorted(p.name for p in FIXTURES.iterdir())


@pytest.fixture(scope="module")
def old_runs(tmp_path_factory):
    """The fixture runs beside the squares images they were trained on (their config names squares/labels.csv)."""
    root = tmp_path_factory.mktemp("old")
    write_squares_dataset(root / "squares")
    shutil.copytree(FIXTURES, root / "runs")
    return root


@pytest.mark.parametrize("name", RUNS)
def test_an_old_run_predicts_what_it_predicted_when_it_was_written(old_runs, name, monkeypatch):
    monkeypatch.chdir(old_runs)
    run = medpeft.load_run(Path("runs") / name)
    expected = pd.read_csv(old_runs / "runs" / name / "expected_predictions.csv")
    images = [str(old_runs / "squares" / image) for image in expected["input"]]
    table = run.predict(images)
    probs = [c for c in expected.columns if c.startswith("prob:")]
    assert list(table.columns) == list(expected.columns)
    np.testing.assert_allclose(table[probs].to_numpy(float), expected[probs].to_numpy(float), atol=1e-5)
    # A decision is prob >= the label's threshold, and Youden's threshold is one of the val images' scores: an
    # image scored within the tolerance of it may fall either side on another CPU's float kernels.
    thresholds = pd.read_json(old_runs / "runs" / name / "thresholds.json", typ="series")["thresholds"]
    for column in [c for c in expected.columns if c.startswith("pred:")]:
        label = column[len("pred:"):]
        clear = np.abs(expected[f"prob:{label}"] - thresholds[label]) > 1e-5
        assert clear.mean() > 0.9
        np.testing.assert_array_equal(table[column][clear].to_numpy(float), expected[column][clear].to_numpy(float))


@pytest.mark.parametrize("name", RUNS)
def test_an_old_run_evaluates_to_its_recorded_test_metrics(old_runs, name, monkeypatch):
    monkeypatch.chdir(old_runs)
    recorded = pd.read_json(old_runs / "runs" / name / "metrics.json", typ="series")["test"]
    metrics = medpeft.evaluate(Path("runs") / name, "test")
    assert metrics["mean_auroc"] == pytest.approx(recorded["mean_auroc"], abs=1e-6)
    assert metrics["n"] == recorded["n"]


@pytest.mark.parametrize("name", ["lora_qv", "cnn_norm"])
def test_an_old_runs_config_trains_again_to_its_recorded_metrics(old_runs, name, monkeypatch, tmp_path):
    """Deterministic on the CPU: this medpeft trains a 0.1 run's saved config to the same metrics."""
    monkeypatch.chdir(old_runs)
    saved = upgrade_saved(yaml.safe_load((FIXTURES / name / "config.yaml").read_text()))
    metrics = medpeft.train(build(RunConfig, {**saved, "output_dir": str(tmp_path / name)}), quiet=True)
    recorded = pd.read_json(FIXTURES / name / "metrics.json", typ="series")
    for split in ("val", "test"):
        assert metrics[split]["mean_auroc"] == pytest.approx(recorded[split]["mean_auroc"], abs=1e-6)


def test_an_unfinished_run_started_by_0_1_resumes(run_config):
    """Its config.yaml has every reader's data keys and no train.accel: the same config as this medpeft
    reads it, so the run resumes instead of being refused as another config's."""
    from medpeft.train import recipe

    with interrupted_at_call(recipe, "evaluate_split", 2):
        medpeft.train(build(RunConfig, run_config), quiet=True)
    path = Path(run_config["output_dir"]) / "config.yaml"
    saved = yaml.safe_load(path.read_text())
    del saved["train"]["accel"]
    saved["data"].update(views=None, frontal_only=False, uncertainty="med-peft", class_info=None, patient_pattern=None)
    path.write_text(yaml.safe_dump(saved, sort_keys=False))
    metrics = medpeft.train(build(RunConfig, run_config), quiet=True)
    assert metrics["epochs_run"] == run_config["train"]["epochs"]
    assert '"event": "resume", "epoch": 1' in (Path(run_config["output_dir"]) / "log.jsonl").read_text()
