"""Faults that benchmarks/faults.py found in the command line, each reproduced here on its own."""

import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

import medpeft
from conftest import TINY_VIT, interrupted_at_call
from medpeft.config import SplitConfig, config_from_dict
from medpeft.data.splits import assign_splits
from medpeft.errors import ConfigError, DataError


def test_a_patient_in_two_splits_of_a_split_column_is_named_with_the_column_and_rows():
    table = pd.DataFrame({"patient_id": ["a", "b", "a", "b"], "split": ["train", "val", "val", "val"]})
    with pytest.raises(DataError, match=r"^x.csv: patient 'a' is in more than one split \(train, val\): split "
                                        r"column 'fold' has 'train' at row 2 and 'val' at row 4$"):
        assign_splits(table, SplitConfig(column="fold"), "x.csv")


def test_an_unreadable_config_of_an_unfinished_run_is_named_and_a_moved_one_resumes(run_config, tmp_path):
    from medpeft.train import recipe

    config = config_from_dict(run_config)
    with interrupted_at_call(recipe, "evaluate_split", 2):  # in epoch 2, after epoch 1's checkpoint
        medpeft.train(config, quiet=True)
    moved = tmp_path / "moved"
    shutil.copytree(config.output_dir, moved)
    (Path(config.output_dir) / "config.yaml").write_bytes(b"model: [\x00\xff")
    with pytest.raises(ConfigError, match=rf"^{Path(config.output_dir) / 'config.yaml'}: not "):
        medpeft.train(config, quiet=True)
    resumed = medpeft.train(config_from_dict({**run_config, "output_dir": str(moved)}), quiet=True)
    assert '"event": "resume"' in (moved / "log.jsonl").read_text()
    assert resumed["best_epoch"] >= 0


def test_a_study_without_a_method_axis_runs_the_base_method(tmp_path, squares_csv):
    from medpeft.study.spec import load_study

    (tmp_path / "study.yaml").write_text(yaml.safe_dump({"base": {
        "model": TINY_VIT, "data": {"csv": str(squares_csv), "patient_column": "patient", "labels": ["bright"]},
        "method": {"name": "lora", "r": 2}}, "axes": {"seed": [0, 1]}}))
    cells = load_study(tmp_path / "study.yaml").cells
    assert [(c.method, c.config["method"]["name"], c.config["method"]["r"]) for c in cells] == [("lora", "lora", 2)] * 2
