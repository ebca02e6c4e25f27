"""Run directories written by medpeft 0.1 before the config schema and recipe were restructured
(tests/fixtures/runs_v0_1: LoRA on q/v, AdaLoRA, SSF, norm tuning of a CNN with BatchNorm statistics)
still load, predict what they predicted then, and evaluate to their recorded metrics."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import write_squares_dataset

import medpeft

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
    decisions = [c for c in expected.columns if c.startswith("pred:")]
    np.testing.assert_array_equal(table[decisions].to_numpy(float), expected[decisions].to_numpy(float))


@pytest.mark.parametrize("name", RUNS)
def test_an_old_run_evaluates_to_its_recorded_test_metrics(old_runs, name, monkeypatch):
    monkeypatch.chdir(old_runs)
    recorded = pd.read_json(old_runs / "runs" / name / "metrics.json", typ="series")["test"]
    metrics = medpeft.evaluate(Path("runs") / name, "test")
    assert metrics["mean_auroc"] == pytest.approx(recorded["mean_auroc"], abs=1e-6)
    assert metrics["n"] == recorded["n"]
