"""Studies with a `tune` section: each task is searched first with its first seed's config, every seed trains
with the best values, a finished search is reused, a failed one fails its task's cells, and the report shows
the tuned values and the tuned-vs-default val AUROC."""

import json

import pandas as pd
import pytest
import yaml

from medpeft.errors import ConfigError
from medpeft.study.report import write_report
from medpeft.study.runner import run_study
from medpeft.study.spec import load_study
from medpeft.study.store import Store

from test_study import write_study

TUNE = {"trials": 2, "space": {"train.epochs": None, "method.alpha": None, "method.dropout": None,
                               "train.weight_decay": None}}
TASK = "default__default__lora__f1"


def lora_study(path, squares_csv, tune=TUNE):
    return write_study(path, squares_csv, axes={"method": {"lora": {"method": {"r": 4, "alpha": 8}}}, "seed": [0, 1]},
                       tune=tune)


@pytest.mark.slow
def test_each_seed_trains_with_its_tasks_best_values_and_the_report_shows_them(tmp_path, squares_csv):
    study, out = lora_study(tmp_path / "study.yaml", squares_csv), tmp_path / "out"
    assert run_study(study, out, jobs=2, quiet=True) == {"done": 2}

    summary = json.loads((out / "tune" / TASK / "tune.json").read_text())
    assert [t["state"] for t in summary["trials"]] == ["complete", "complete"]
    assert summary["trials"][0]["params"] == {"train.lr": 0.003, "method.r": 4}
    searched = yaml.safe_load((out / "tune" / TASK / "trials" / "0000" / "config.yaml").read_text())
    assert searched["train"]["seed"] == 0  # the task's first seed
    for seed in (0, 1):
        config = yaml.safe_load((out / "configs" / f"{TASK}__s{seed}.yaml").read_text())
        assert config["train"]["seed"] == seed
        assert (config["train"]["lr"], config["method"]["r"]) == tuple(summary["best"]["params"].values())
        assert yaml.safe_load((out / "runs" / f"{TASK}__s{seed}" / "config.yaml").read_text()) == config
    log = (out / "logs" / f"{TASK}.tune.log").read_bytes()

    assert run_study(study, out, quiet=True) == {"done": 2}  # nothing to run: the search is not run again
    assert (out / "logs" / f"{TASK}.tune.log").read_bytes() == log

    write_report(out)
    tuning = pd.read_csv(out / "report" / "tuning.csv")
    assert tuning[["method", "complete", "pruned"]].values.tolist() == [["lora", 2, 0]]
    assert tuning["difference"][0] == pytest.approx(100 * summary["difference"])
    assert json.loads(tuning["tuned_values"][0]) == summary["best"]["params"]
    report = (out / "report" / "report.md").read_text()
    assert "Hyperparameter search" in report and "trials (pruned)" in report

    lora_study(study, squares_csv, tune={**TUNE, "trials": 3})
    with pytest.raises(ConfigError, match="changed since they were added"):
        run_study(study, out, quiet=True)


def test_a_failed_search_fails_its_tasks_cells_with_its_error(tmp_path, squares_csv):
    study, out = lora_study(tmp_path / "study.yaml", squares_csv), tmp_path / "out"
    (out / "tune" / TASK).mkdir(parents=True)
    (out / "tune" / TASK / "notes.txt").write_text("not a search")
    assert run_study(study, out, quiet=True) == {"failed": 2}
    errors = {row.key: row.error for row in Store(out / "study.sqlite").frame().itertuples()}
    assert set(errors.values()) == {f"search: error: {out.resolve() / 'tune' / TASK}: exists and is not a medpeft "
                                    f"tune directory (no tune.sqlite)"}
    assert not (out / "runs" / f"{TASK}__s0").exists()


@pytest.mark.parametrize("tune, message", [
    ({"space": {}}, r"study.yaml: tune.trials is required"),
    ({"trials": 0}, r"study.yaml: tune.trials must be > 0, got 0"),
    ({"trials": 2, "budget": 1}, r"study.yaml: config key 'tune.budget' does not exist"),
    ({"trials": 2, "space": {"method.r": ["categorical", [4, 8]]}},
     r"study.yaml: cell \(.*method=linear_probe.*\): tune space 'method.r': config key 'method.r' does not exist "
     r"for method.name 'linear_probe'"),
    ({"trials": 2, "space": {"train.lr": ["float", 1.0e-2, 1.0e-4]}},
     r"study.yaml: cell \(.*seed=0\): tune space 'train.lr': expected low < high"),
])
def test_bad_tune_sections_fail_when_the_study_is_read(tmp_path, squares_csv, tune, message):
    path = write_study(tmp_path / "study.yaml", squares_csv, tune=tune,
                       axes={"method": {"lora": {"method": {"r": 4, "alpha": 8}}, "linear_probe": {}}})
    with pytest.raises(ConfigError, match=message):
        load_study(path)


def test_a_study_without_tune_keeps_its_cells_hashes(tmp_path, squares_csv):
    cells = load_study(write_study(tmp_path / "study.yaml", squares_csv)).cells
    tuned = load_study(write_study(tmp_path / "tuned.yaml", squares_csv, tune=TUNE)).cells
    assert all(c.tune is None for c in cells) and all(t.tune == TUNE | {"trials": 2} for t in tuned)
    assert [c.config for c in cells] == [t.config for t in tuned]
    assert not {c.config_hash for c in cells} & {t.config_hash for t in tuned}
