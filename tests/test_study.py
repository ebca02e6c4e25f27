"""Studies: the study file expands into validated cells; the runner runs each as an ordinary run,
records it in the store exactly once, survives SIGKILL, and records failures without stopping."""

import json
import re
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

import medpeft
from medpeft.config import config_from_dict
from medpeft.errors import ConfigError
from medpeft.study.report import write_report
from medpeft.study.runner import run_study
from medpeft.study.spec import config_hash, load_study
from medpeft.study.store import Store

from conftest import TINY_VIT, assert_metrics_close


def write_study(path: Path, squares_csv, **changes) -> Path:
    study = {
        "name": "squares",
        "base": {
            "model": {**TINY_VIT, "drop_path_rate": 0.0},
            "data": {"csv": str(squares_csv), "patient_column": "patient", "labels": ["bright", "dark"],
                     "split": {"val_fraction": 0.25, "test_fraction": 0.25, "seed": 0}},
            "train": {"epochs": 4, "batch_size": 8, "lr": 0.003, "warmup_epochs": 0.5},
        },
        "axes": {"method": {"full": {"train": {"lr": 0.001}}, "lora": {"method": {"r": 4, "alpha": 8}}},
                 "fraction": [0.5, 1.0], "seed": [0]},
        **changes,
    }
    path.write_text(yaml.safe_dump(study))
    return path


def test_study_expands_every_combination_with_levels_and_overrides(tmp_path, squares_csv):
    path = write_study(tmp_path / "study.yaml", squares_csv, overrides=[
        {"where": {"method": "lora", "fraction": 0.5}, "set": {"method.r": 2, "train.epochs": 7}}])
    study = load_study(path)
    assert [c.key for c in study.cells] == [f"default__default__{m}__f{f}__s0" for m in ("full", "lora") for f in (0.5, 1)]
    by_key = {c.key: c.config for c in study.cells}
    full = by_key["default__default__full__f0.5__s0"]
    assert full["method"] == {"name": "full"} and full["train"]["lr"] == 0.001
    assert full["data"]["split"]["label_fraction"] == 0.5 and full["train"]["seed"] == 0
    small_lora = by_key["default__default__lora__f0.5__s0"]
    assert small_lora["method"]["r"] == 2 and small_lora["method"]["alpha"] == 8 and small_lora["train"]["epochs"] == 7
    assert by_key["default__default__lora__f1__s0"]["method"]["r"] == 4
    assert by_key["default__default__lora__f1__s0"]["train"]["epochs"] == 4
    assert len({c.config_hash for c in study.cells}) == 4


@pytest.mark.parametrize("changes, message", [
    ({"axes": {"model": {}}}, "axes must be a mapping with keys among"),
    ({"axes": {"fraction": [0, 0.5], "method": {"lora": {}}}},
     r"cell \(.*fraction=0.*\): data.split.label_fraction must be in \(0, 1\], got 0"),
    ({"axes": {"fraction": [0.5]}}, r"cell \(.*method=default.*\): config section 'method' is required"),
    ({"overrides": [{"where": {"method": "dora"}, "set": {"method.r": 2}}]}, r"overrides\[0\].where.method: 'dora'"),
    ({"axes": {"method": {"lora": {"method": {"rank": 4}}}}}, r"cell \(backbone=default.*method=lora.*'method.rank'"),
    ({"epochs": 3}, "study key 'epochs' does not exist"),
    ({"report": {"correction": "bonferroni"}}, r"study.yaml: report.correction must be one of \['holm', 'bh'\]"),
    ({"report": {"alpha": 0}}, r"study.yaml: report.alpha must be in \(0, 0.5\), got 0"),
    ({"external": {"nih": {"data": {"csv": "x.csv"}}}}, r"study.yaml: external.nih: not a level of axes.dataset"),
    ({"external": {"default": {"csv": "x.csv"}}}, r"study.yaml: external.default must be \{data: <a data section>"),
    ({"external": {"default": {"data": {"csv": "x.csv"}, "split": "holdout"}}},
     r"study.yaml: external.default.split must be one of all, train, val, test, got 'holdout'"),
    ({"external": {"default": {"data": {"csv": "x.csv", "colour": 1}}}},
     r"study.yaml: external.default: config key 'data.colour' does not exist"),
    ({"external": {"default": {"data": {"format": "dicom-tree", "csv": "x"}}}},
     r"study.yaml: external.default: data.format 'dicom-tree' is not a known"),
])
def test_bad_study_files_fail_with_one_line_naming_the_problem(tmp_path, squares_csv, changes, message):
    with pytest.raises(ConfigError, match=message):
        load_study(write_study(tmp_path / "study.yaml", squares_csv, **changes))


def test_environment_variables_expand_in_study_files(tmp_path, squares_csv, monkeypatch):
    monkeypatch.setenv("SQUARES_CSV", str(squares_csv))
    path = tmp_path / "study.yaml"
    write_study(path, squares_csv)
    path.write_text(path.read_text().replace(str(squares_csv), "${SQUARES_CSV}"))
    assert all(c.config["data"]["csv"] == str(squares_csv) for c in load_study(path).cells)


def rows(out: Path) -> dict:
    frame = Store(out / "study.sqlite").frame()
    return {row.key: row for row in frame.itertuples()}


def cell_processes(out: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(out) in (proc / "cmdline").read_text():
                found.append(int(proc.name))
        except OSError:
            pass
    return found


@pytest.mark.slow
def test_study_killed_mid_cell_resumes_and_equals_an_uninterrupted_study(tmp_path, squares_csv):
    study = write_study(tmp_path / "study.yaml", squares_csv, axes={
        "method": {"full": {"train": {"lr": 0.001}}, "lora": {"method": {"r": 4, "alpha": 8}}}})
    reference = {}  # each cell as an ordinary run, uninterrupted
    for cell in load_study(study).cells:
        config = config_from_dict({**cell.config, "output_dir": str(tmp_path / "a" / cell.key)})
        reference[cell.key] = medpeft.train(config, quiet=True)

    out = tmp_path / "b"
    runner = subprocess.Popen([sys.executable, "-m", "medpeft", "study", "run", str(study), "--out", str(out)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(out.glob("runs/*/checkpoint.pt")) and time.time() < deadline:
        time.sleep(0.02)
    os.kill(runner.pid, signal.SIGKILL)
    runner.wait()
    interrupted = [p.parent for p in out.glob("runs/*/checkpoint.pt") if not (p.parent / "metrics.json").exists()]
    assert interrupted, "the runner was not killed mid-cell"
    deadline = time.time() + 10
    while cell_processes(out) and time.time() < deadline:  # the cell process dies with its runner
        time.sleep(0.05)
    assert cell_processes(out) == []
    assert rows(out)[interrupted[0].name].status == "running"

    run_study(study, out, quiet=True)
    resumed = rows(out)
    assert resumed.keys() == reference.keys()
    with sqlite3.connect(out / "study.sqlite") as db:
        assert db.execute("SELECT COUNT(*), COUNT(DISTINCT key) FROM cells").fetchone() == (2, 2)
    for key, row in resumed.items():
        assert row.status == "done"
        # the rank-based metrics exactly; calibration sums up to the last bits of the logits (a resumed run's
        # kernels may differ from an uninterrupted one's in rounding)
        assert_metrics_close(row.metrics["val"], reference[key]["val"])
        assert_metrics_close(row.metrics["test"], reference[key]["test"])
        assert row.metrics["test"]["per_label"] == reference[key]["test"]["per_label"]
        assert row.test_mean_auroc == reference[key]["test"]["mean_auroc"]
    assert resumed[interrupted[0].name].attempts == 2
    assert '"event": "resume"' in (interrupted[0] / "log.jsonl").read_text()
    assert sum(r.attempts for r in resumed.values()) <= 2 + 1

    assert run_study(study, out, quiet=True) == {"done": 2}  # nothing left: nothing runs again
    assert sum(r.attempts for r in rows(out).values()) == sum(r.attempts for r in resumed.values())


@pytest.mark.slow
def test_a_failing_cell_is_recorded_and_the_others_finish(tmp_path, squares_csv):
    study = write_study(tmp_path / "study.yaml", squares_csv, axes={
        "dataset": {"squares": {}, "broken": {"data": {"csv": str(tmp_path / "missing.csv")}}},
        "method": {"linear_probe": {}}})
    counts = run_study(study, tmp_path / "out", quiet=True)
    assert counts == {"done": 1, "failed": 1}
    failed = rows(tmp_path / "out")["default__broken__linear_probe__f1__s0"]
    assert "missing.csv" in failed.error and failed.metrics is None
    assert run_study(study, tmp_path / "out", quiet=True) == {"done": 1, "failed": 1}  # not retried by default
    assert rows(tmp_path / "out")["default__broken__linear_probe__f1__s0"].attempts == 1


@pytest.mark.slow
def test_cells_are_evaluated_on_their_dataset_level_s_external_test_set(tmp_path, squares_csv):
    """Level 'good' names the squares' own test split as its external set (the same images: the same
    metrics); level 'bad' a missing file: its cell fails in one line, and once fixed a rerun evaluates the
    complete run without training it again."""
    data = {"csv": str(squares_csv), "patient_column": "patient", "labels": ["bright", "dark"],
            "split": {"val_fraction": 0.25, "test_fraction": 0.25, "seed": 0}}
    external = {"good": {"data": data, "split": "test"},
                "bad": {"data": {**data, "csv": str(tmp_path / "missing.csv")}}}
    one_epoch = [{"where": {}, "set": {"train.epochs": 1}}]
    study = write_study(tmp_path / "study.yaml", squares_csv, external=external, overrides=one_epoch, axes={
        "dataset": {"good": {}, "bad": {}}, "method": {"linear_probe": {}}})
    out = tmp_path / "out"
    assert run_study(study, out, quiet=True) == {"done": 1, "failed": 1}
    good, bad = (rows(out)[f"default__{level}__linear_probe__f1__s0"] for level in ("good", "bad"))
    evaluation = json.loads((Path(good.run_dir) / "evaluations/external/metrics.json").read_text())
    assert evaluation["evaluation"]["split"] == "test" and evaluation["evaluation"]["absent"] == []
    assert evaluation["mean_auroc"] == pytest.approx(good.metrics["test"]["mean_auroc"], abs=1e-6)
    assert bad.error.startswith("external evaluation: ") and "missing.csv" in bad.error and "\n" not in bad.error
    trained = (Path(bad.run_dir) / "metrics.json").stat().st_mtime_ns

    external["bad"] = {"data": data, "split": "all"}
    write_study(study, squares_csv, external=external, overrides=one_epoch, axes={
        "dataset": {"good": {}, "bad": {}}, "method": {"linear_probe": {}}})
    assert run_study(study, out, retry_failed=True, quiet=True) == {"done": 2}
    bad = rows(out)["default__bad__linear_probe__f1__s0"]
    assert (Path(bad.run_dir) / "metrics.json").stat().st_mtime_ns == trained  # evaluated, not trained again
    evaluation = json.loads((Path(bad.run_dir) / "evaluations/external/metrics.json").read_text())
    assert evaluation["evaluation"]["split"] == "all" and evaluation["n"] > bad.metrics["test"]["n"]

    write_report(out)  # the real runs' metrics in the report's evidence sections
    external_table = pd.read_csv(out / "report" / "external.csv")
    assert list(external_table["dataset"]) == ["bad", "good"] and (external_table["seeds"] == 1).all()  # file order
    assert pd.read_csv(out / "report" / "calibration.csv")[["ece_raw", "ece_calibrated"]].notna().all().all()


def test_changing_a_cell_after_it_ran_is_refused(tmp_path, squares_csv):
    study = write_study(tmp_path / "study.yaml", squares_csv, axes={"method": {"linear_probe": {}}})
    run_study(study, tmp_path / "out", quiet=True)
    write_study(study, squares_csv, axes={"method": {"linear_probe": {"train": {"lr": 0.1}}}})
    with pytest.raises(ConfigError, match="changed since they were added"):
        run_study(study, tmp_path / "out", quiet=True)


def test_a_study_begun_before_an_option_existed_resumes_unless_the_option_is_set(tmp_path, squares_csv):
    """A store of medpeft 0.1 (the hash of the whole resolved config) written before train.eval_every
    existed: the unchanged study resumes; set away from its default, the option is a change."""
    out = tmp_path / "out"
    study = write_study(tmp_path / "study.yaml", squares_csv, axes={"method": {"linear_probe": {}}})
    assert run_study(study, out, quiet=True) == {"done": 1}
    (cell,) = load_study(study).cells
    config = yaml.safe_load((out / "configs" / f"{cell.key}.yaml").read_text())
    del config["train"]["eval_every"]  # the run's config as the older medpeft recorded it
    (out / "configs" / f"{cell.key}.yaml").write_text(yaml.safe_dump(config))
    old = {**cell.config, "train": {k: v for k, v in cell.config["train"].items() if k != "eval_every"}}
    with sqlite3.connect(out / "study.sqlite") as db:
        db.execute("UPDATE cells SET config_hash = ?", (config_hash(old, None),))

    write_study(study, squares_csv, axes={"method": {"linear_probe": {"train": {"eval_every": 2}}}})
    with pytest.raises(ConfigError, match="changed since they were added"):
        run_study(study, out, quiet=True)
    write_study(study, squares_csv, axes={"method": {"linear_probe": {}}})
    assert run_study(study, out, quiet=True) == {"done": 1}  # nothing run again
    assert set(Store(out / "study.sqlite").frame()["config_hash"]) == {cell.config_hash}


def test_the_config_hash_ignores_options_written_at_their_default(tmp_path, squares_csv):
    plain = load_study(write_study(tmp_path / "a.yaml", squares_csv)).cells
    spelled = load_study(write_study(tmp_path / "b.yaml", squares_csv, overrides=[
        {"where": {"method": "lora"}, "set": {"train.eval_every": 1, "method.dropout": 0.0}}])).cells
    assert [c.config_hash for c in plain] == [c.config_hash for c in spelled]


def test_parallel_jobs_run_every_cell(tmp_path, squares_csv):
    study = write_study(tmp_path / "study.yaml", squares_csv, axes={"method": {"linear_probe": {}, "bitfit": {}}})
    assert run_study(study, tmp_path / "out", jobs=2, quiet=True) == {"done": 2}
    assert all(json.loads((Path(r.run_dir) / "metrics.json").read_text())["method"] == r.method
               for r in rows(tmp_path / "out").values())


@pytest.mark.slow
def test_cells_with_the_most_labels_start_first(tmp_path, squares_csv, capsys):
    """The grid's order is method, then fraction; the runner starts the 100% cells first (the longest)."""
    study = write_study(tmp_path / "study.yaml", squares_csv, axes={
        "method": {"linear_probe": {}}, "fraction": [0.5, 1.0], "seed": [0]})
    assert [c.fraction for c in load_study(study).cells] == [0.5, 1.0]
    assert run_study(study, tmp_path / "out", jobs=1) == {"done": 2}
    finished = re.findall(r"\[\d/2\] (\S+):", capsys.readouterr().out)
    assert finished == [f"default__default__linear_probe__f{f}__s0" for f in ("1", "0.5")]


SHARED = Path(__file__).resolve().parents[1] / "../shared/data/cxr-metadata"
MED_PEFT_STUDY = Path(__file__).resolve().parents[1] / "studies/med-peft-18.yaml"


@pytest.fixture
def med_peft_env(monkeypatch, tmp_path):
    for name, value in {"MRM_CHECKPOINT": tmp_path / "MRM.pth", "CXR_MAE_CHECKPOINT": tmp_path / "CXR_MAE.pth",
                        "MED_PEFT_SPLITS": SHARED / "splits/MED-PEFT", "NIH_ROOT": SHARED / "nih-chestxray14",
                        "CHEXPERT_ROOT": SHARED / "chexpert", "CHEXPERT_TEST_CSV": tmp_path / "test.csv",
                        "RSNA_ROOT": SHARED / "rsna-pneumonia"}.items():
        monkeypatch.setenv(name, str(value))


def test_med_peft_study_is_36_runs_per_seed_with_the_published_settings(med_peft_env):
    cells = load_study(MED_PEFT_STUDY).cells
    assert len(cells) == 36 and len({c.key for c in cells}) == 36
    assert {(c.backbone, c.dataset, c.fraction) for c in cells} == {
        (b, d, f) for b in ("mrm", "cxr-mae") for d in ("nih", "chexpert", "rsna") for f in (0.01, 0.1, 1.0)}
    lora = {(c.backbone, c.dataset, c.fraction): c.config for c in cells if c.method == "lora"}
    assert lora[("mrm", "chexpert", 0.1)]["method"] == {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.1,
                                                         "targets": ["q", "v"]}
    assert lora[("mrm", "nih", 1.0)]["train"]["lr"] == 0.2 and lora[("mrm", "nih", 1.0)]["train"]["optimizer"] == "sgd"
    assert lora[("cxr-mae", "nih", 0.01)]["train"]["epochs"] == 400
    assert all(c.config["data"]["split"]["label_fraction"] == 1.0 for c in cells)  # the lists are the fractions
    assert lora[("mrm", "rsna", 0.01)]["data"]["split"]["files"]["train"].endswith("RSNA_Pneumonia/train_1.txt")


def test_med_peft_study_with_three_seeds_is_108_runs(med_peft_env, tmp_path):
    study = yaml.safe_load(MED_PEFT_STUDY.read_text())
    study["axes"]["seed"] = [0, 1, 2]
    (tmp_path / "three.yaml").write_text(yaml.safe_dump(study))
    assert len(load_study(tmp_path / "three.yaml").cells) == 108


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason=f"real CXR metadata not found at {SHARED}")
def test_med_peft_study_splits_read_with_the_dataset_readers(med_peft_env):
    """Each dataset's cells read through its reader and the published lists present here (the CheXpert
    100% list and the CheXpert / RSNA test labels are not in the shared metadata: left out)."""
    from dataclasses import replace

    from medpeft.data.readers import read_split_dataset

    expected = {("nih", 0.01): (785, 11_219, 22_433), ("nih", 0.1): (7_847, 11_219, 22_433),
                ("nih", 1.0): (78_468, 11_219, 22_433), ("chexpert", 0.01): (2_234, 234, 0),
                ("chexpert", 0.1): (22_341, 234, 0), ("rsna", 0.01): (251, 1_500, 0), ("rsna", 0.1): (2_518, 1_500, 0),
                ("rsna", 1.0): (25_184, 1_500, 0)}
    cells = {(c.dataset, c.fraction): c for c in load_study(MED_PEFT_STUDY).cells
             if c.backbone == "mrm" and c.method == "lora"}
    for (dataset, fraction), sizes in expected.items():
        data = config_from_dict({**cells[dataset, fraction].config, "output_dir": "-"}).data
        if dataset != "nih":
            files = {k: v for k, v in data.split.files.items() if k != "test"}
            data = replace(data, split=replace(data.split, files=files),
                           csv=data.csv[:2] if dataset == "chexpert" else data.csv)
        split = read_split_dataset(data)["split"].value_counts()
        assert tuple(int(split.get(s, 0)) for s in ("train", "val", "test")) == sizes, (dataset, fraction)


@pytest.mark.slow
def test_ray_executor_runs_every_cell_on_a_local_ray_instance(tmp_path, squares_csv):
    ray = pytest.importorskip("ray")
    study = write_study(tmp_path / "study.yaml", squares_csv, axes={"method": {"linear_probe": {}}})
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert run_study(study, tmp_path / "out", executor="ray", quiet=True) == {"done": 1}
    finally:
        ray.shutdown()
    for row in rows(tmp_path / "out").values():
        metrics = json.loads((Path(row.run_dir) / "metrics.json").read_text())
        assert row.metrics == metrics and metrics["method"] == row.method and row.peak_memory_mb > 0
