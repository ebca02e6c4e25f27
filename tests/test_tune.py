"""medpeft tune: trial 0 is the config as given, median pruning, a killed search resumes without running
finished trials again, best.yaml trains, the space is checked in one-line errors naming the key, the same
seed samples the same params."""

import json
import subprocess
import sys

import pytest
import yaml

from medpeft.config import config_from_dict, load_config
from medpeft.errors import ConfigError, RunDirError
from medpeft.train import recipe, train
from medpeft.train import tune as tuning

SMALL = {"train.epochs": None, "method.alpha": None, "method.dropout": None}
"""The LoRA space without epochs, alpha and dropout: train.lr, train.weight_decay, method.r."""


def fake_training(scores: dict, calls: list):
    """A stand-in for recipe.train: the run named NNNN reports scores[NNNN] after every epoch (each report that
    returns is appended to `calls` as (NNNN, epoch)) and ends with it as its val mean AUROC."""
    def fake(config, quiet=False, on_epoch=None):
        name = config.output_dir.rsplit("/", 1)[-1]
        for epoch in range(config.train.epochs):
            on_epoch(epoch, scores.get(name, 0.6))
            calls.append((name, epoch))
        return {"val": {"mean_auroc": scores.get(name, 0.6)}}
    return fake


def test_trial_0_is_the_config_as_given_and_best_yaml_trains(run_config, tmp_path):
    config = config_from_dict(run_config)
    summary = tuning.tune(config, tmp_path / "tune", 2, SMALL, quiet=True)

    saved = json.loads((tmp_path / "tune" / "tune.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    first = saved["trials"][0]
    assert first["params"] == {"train.lr": 0.003, "train.weight_decay": 0.05, "method.r": 4} and first["default"]
    assert saved["default"]["number"] == 0 and [t["state"] for t in saved["trials"]] == ["complete", "complete"]
    trial_0 = yaml.safe_load((tmp_path / "tune" / "trials" / "0000" / "config.yaml").read_text())
    assert {**trial_0, "output_dir": None} == {**config.to_dict(), "output_dir": None}
    values = [t["value"] for t in saved["trials"]]
    metrics = [json.loads((tmp_path / "tune" / t["run_dir"] / "metrics.json").read_text()) for t in saved["trials"]]
    assert values == [m["val"]["mean_auroc"] for m in metrics]
    assert saved["best"]["value"] == max(values) and saved["difference"] == max(values) - values[0]
    assert list(saved["space"]) == ["train.lr", "train.weight_decay", "method.r"]

    best = load_config(tmp_path / "tune" / "best.yaml")
    assert best.output_dir == str(tmp_path / "tune" / "best")
    assert best.train.lr == saved["best"]["params"]["train.lr"] and best.method.r == saved["best"]["params"]["method.r"]
    assert train(best, quiet=True)["val"]["mean_auroc"] == saved["best"]["value"]  # the best trial, trained again


def test_a_trial_below_the_median_is_pruned_after_its_warmup(run_config, tmp_path, monkeypatch):
    run_config["train"]["epochs"] = 3
    calls = []
    monkeypatch.setattr(tuning, "train", fake_training({"0000": 0.8, "0001": 0.7, "0002": 0.5, "0003": 0.9}, calls))
    summary = tuning.tune(config_from_dict(run_config), tmp_path / "tune", 4, SMALL, quiet=True)

    assert [t["state"] for t in summary["trials"]] == ["complete", "complete", "pruned", "complete"]
    assert [epoch for name, epoch in calls if name == "0002"] == [0]  # pruned at its 2nd epoch's report
    assert summary["trials"][2]["value"] == 0.5 and summary["best"]["number"] == 3  # a pruned trial: its last report
    assert summary["difference"] == pytest.approx(0.9 - 0.8)


def test_a_diverging_trial_is_pruned_with_its_error(run_config, tmp_path, monkeypatch):
    from medpeft.errors import TrainingError

    def diverging(config, quiet=False, on_epoch=None):
        if config.output_dir.endswith("0001"):
            raise TrainingError("the model gives non-finite outputs")
        return {"val": {"mean_auroc": 0.7}}

    monkeypatch.setattr(tuning, "train", diverging)
    summary = tuning.tune(config_from_dict(run_config), tmp_path / "tune", 2, SMALL, quiet=True)
    assert [t["state"] for t in summary["trials"]] == ["complete", "pruned"]
    assert summary["trials"][1]["error"] == "the model gives non-finite outputs"


def test_a_killed_search_resumes_without_running_finished_trials_again(run_config, tmp_path, monkeypatch):
    config, out = config_from_dict(run_config), tmp_path / "tune"
    original = tuning.train
    starts = []

    def killed_in_trial_2(config, quiet=False, on_epoch=None):
        starts.append(config.output_dir)

        def report(epoch, score):
            on_epoch(epoch, score)
            if len(starts) == 3:
                raise KeyboardInterrupt  # after trial 2's first epoch and its checkpoint
        return original(config, quiet, report)

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(tuning, "train", killed_in_trial_2)
        tuning.tune(config, out, 3, SMALL, quiet=True)
    assert not (out / "tune.json").exists() and not (out / "best.yaml").exists()
    logs = {name: (out / "trials" / name / "log.jsonl").read_bytes() for name in ("0000", "0001")}

    def spy(config, quiet=False, on_epoch=None):
        starts.append(config.output_dir)
        return original(config, quiet, on_epoch)

    monkeypatch.setattr(tuning, "train", spy)
    summary = tuning.tune(config, out, 3, SMALL, quiet=True)
    assert starts[3:] == [str(out / "trials" / "0002")]  # only the interrupted trial runs, in its own folder
    assert {name: (out / "trials" / name / "log.jsonl").read_bytes() for name in logs} == logs
    events = [json.loads(line)["event"] for line in (out / "trials" / "0002" / "log.jsonl").read_text().splitlines()]
    assert "resume" in events  # from its epoch checkpoint
    trials = summary["trials"]
    assert [t["state"] for t in trials] == ["complete", "complete", "failed", "complete"]
    assert trials[3]["retry_of"] == 2 and trials[3]["params"] == trials[2]["params"]
    assert trials[3]["run_dir"] == "trials/0002"

    uninterrupted = tuning.tune(config, tmp_path / "again", 3, SMALL, quiet=True)  # the same values, finished
    assert [(t["params"], t["value"]) for t in uninterrupted["trials"]] == [
        (t["params"], t["value"]) for t in trials if t["state"] != "failed"]
    assert load_config(out / "best.yaml").to_dict() == {
        **load_config(tmp_path / "again" / "best.yaml").to_dict(), "output_dir": str(out / "best")}


def test_the_same_seed_samples_the_same_params(run_config, tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "train", fake_training({}, []))

    def params(seed: int, folder: str) -> list:
        run_config["train"]["seed"] = seed
        summary = tuning.tune(config_from_dict(run_config), tmp_path / folder, 4, quiet=True)
        return [t["params"] for t in summary["trials"]]

    first = params(0, "a")
    assert params(0, "b") == first
    assert params(1, "c")[1:] != first[1:]
    assert set(first[1]) == {"train.lr", "train.weight_decay", "train.epochs", "method.r", "method.alpha",
                             "method.dropout"}


@pytest.mark.parametrize("changes, message", [
    ({"train.lrate": ["float", 1e-4, 1e-2, True]}, "tune space 'train.lrate': config key 'train.lrate' does not exist"),
    ({"method.blocks": ["int", 1, 2]}, "tune space 'method.blocks': config key 'method.blocks' does not exist for "
                                       "method.name 'lora'"),
    ({"train.lr": ["float", 1e-2, 1e-4]}, "tune space 'train.lr': expected low < high, got 0.01, 0.0001"),
    ({"train.lr": ["float", 0, 1e-2, True]}, "tune space 'train.lr': expected low < high and low > 0 (log scale)"),
    ({"train.epochs": ["int", 1.5, 4]}, "tune space 'train.epochs' low must be int, got 1.5"),
    ({"train.lr": ["float", -1, 1e-2]}, "tune space 'train.lr': train.lr must be > 0, got -1.0"),
    ({"method.r": ["categorical", [8, 16]]}, "tune space 'method.r': the config's value 4 is not in [8, 16]"),
    ({"method.r": ["categorical", []]}, "tune space 'method.r': the choices must be a non-empty list"),
    ({"train.lr": "fast"}, "tune space 'train.lr' must be [float|int, low, high(, log)] or [categorical, [choices]]"),
    ({**SMALL, "train.lr": None, "train.weight_decay": None, "method.r": None}, "the tune space is empty"),
])
def test_a_bad_space_is_one_line_naming_the_key(run_config, tmp_path, changes, message):
    with pytest.raises(ConfigError) as error:
        tuning.tune(config_from_dict(run_config), tmp_path / "tune", 1, changes, quiet=True)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert not (tmp_path / "tune").exists()


def test_another_config_or_folder_is_refused(run_config, tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "train", fake_training({}, []))
    config = config_from_dict(run_config)
    tuning.tune(config, tmp_path / "tune", 1, SMALL, quiet=True)
    with pytest.raises(ConfigError, match="tune: holds a search of another config or space"):
        tuning.tune(config, tmp_path / "tune", 1, {**SMALL, "method.r": None}, quiet=True)
    run_config["train"]["batch_size"] = 4
    with pytest.raises(ConfigError, match="tune: holds a search of another config or space"):
        tuning.tune(config_from_dict(run_config), tmp_path / "tune", 1, SMALL, quiet=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="other: exists and is not a medpeft tune directory"):
        tuning.tune(config, tmp_path / "other", 1, SMALL, quiet=True)
    (tmp_path / "tune" / "tune.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(RunDirError, match="tune.sqlite: not a usable Optuna storage"):
        tuning.tune(config, tmp_path / "tune", 1, SMALL, quiet=True)


def test_on_epoch_gets_each_epochs_val_auroc_as_logged(run_config, tmp_path):
    reported = []
    metrics = recipe.train(config_from_dict(run_config), quiet=True, on_epoch=lambda *args: reported.append(args))
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert reported == [(r["epoch"], r["val_mean_auroc"]) for r in logged if r["event"] == "epoch"]
    assert [epoch for epoch, _ in reported] == [0, 1] and max(s for _, s in reported) == metrics["val"]["mean_auroc"]


@pytest.mark.slow
def test_cli_tunes_from_the_config_files_tune_section_and_errors_are_one_line(run_config, tmp_path):
    del run_config["output_dir"]
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump({**run_config, "tune": {"trials": 2, "space": SMALL}}))

    def medpeft(*args):
        return subprocess.run([sys.executable, "-m", "medpeft", "tune", str(config), *args], capture_output=True,
                              text=True, cwd=tmp_path)

    done = medpeft("--space", "method.r=[categorical, [4, 8]]")
    assert done.returncode == 0, done.stderr
    assert "0 (default)" in done.stdout and "best config: tune-runs/search/best.yaml" in done.stdout
    saved = json.loads((tmp_path / "tune-runs" / "search" / "tune.json").read_text())
    assert len(saved["trials"]) == 2 and saved["space"]["method.r"] == ["categorical", [4, 8]]
    failed = medpeft("--space", "method.r=[categorical, [8]]", "--out", str(tmp_path / "bad"))
    assert failed.returncode == 2 and len(failed.stderr.strip().splitlines()) == 1
    assert failed.stderr.startswith("error: tune space 'method.r': the config's value 4 is not in [8]")


def test_the_command_lines_space_and_the_files_tune_section_are_checked(run_config, tmp_path):
    assert tuning.parse_space(["method.r=[categorical, [4, 8]]", "train.epochs=null"]) == {
        "method.r": ["categorical", [4, 8]], "train.epochs": None}
    with pytest.raises(ConfigError, match=r"^--space 'method.r' must be KEY=\[float\|int, low, high"):
        tuning.parse_space(["method.r"])
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump({**run_config, "tune": {"trials": 0}}))
    with pytest.raises(ConfigError, match=r"^.*search.yaml: tune.trials must be > 0, got 0$"):
        tuning.load_tune_config(config)
    config.write_text(yaml.safe_dump({**run_config, "tune": {"trails": 2}}))
    with pytest.raises(ConfigError, match=r"search.yaml: config key 'tune.trails' does not exist"):
        tuning.load_tune_config(config)


def test_a_training_run_refuses_a_tune_section_by_name(run_config, tmp_path):
    path = tmp_path / "with-tune.yaml"
    path.write_text(yaml.safe_dump({**run_config, "tune": {"trials": 4}}))
    with pytest.raises(ConfigError, match="config section 'tune' is read by medpeft tune, not by a training run"):
        load_config(path)
    assert tuning.load_tune_config(path)[1].trials == 4
