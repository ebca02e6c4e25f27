import subprocess
import sys

import pytest
import yaml

from medpeft.cli import _one_line, _size
from medpeft.config import load_config, parse_overrides
from medpeft.errors import ConfigError, DataError


def medpeft(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "medpeft", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.slow
def test_cli_trains_then_evaluates_and_bad_input_is_one_line_exit_2(run_config, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_config))
    done = medpeft("train", str(config), "--set", "train.epochs=1", "--out", str(tmp_path / "cli-run"))
    assert done.returncode == 0, done.stderr
    assert "mean AUROC" in done.stdout and (tmp_path / "cli-run" / "metrics.json").is_file()
    assert yaml.safe_load((tmp_path / "cli-run" / "config.yaml").read_text())["train"]["epochs"] == 1
    evaluated = medpeft("evaluate", str(tmp_path / "cli-run"), "--split", "val")
    assert evaluated.returncode == 0 and "val: mean AUROC" in evaluated.stdout

    failed = medpeft("train", str(config), "--set", "train.lrate=1")
    assert failed.returncode == 2
    assert failed.stderr.strip() == ("error: config key 'train.lrate' does not exist (expected one of: "
                                     "epochs, batch_size, eval_batch_size, optimizer, lr, min_lr, warmup_epochs, "
                                     "weight_decay, momentum, layer_decay, grad_accum_steps, grad_clip, precision, "
                                     "device, attention, recompute, frozen_prefix_cache, accel, compile, "
                                     "eval_every, early_stopping_patience, seed, log_every_steps)")
    missing = medpeft("train", str(config), "--set", f"model.weights={tmp_path}/none.pth")
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert "none.pth: checkpoint file not found" in missing.stderr
    assert not (tmp_path / "run").exists()


def test_overrides_are_parsed_as_yaml_values():
    assert parse_overrides(["train.lr=0.001", "method.targets=[q, v]", "train.layer_decay=null"]) == {
        "train": {"lr": 0.001, "layer_decay": None}, "method": {"targets": ["q", "v"]}}
    with pytest.raises(ConfigError, match="must look like key=value"):
        parse_overrides(["train.lr"])


def test_config_types_and_required_keys_are_checked(run_config, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(run_config))
    assert load_config(path, ["train.lr=1"]).train.lr == 1.0  # an int is a valid float
    assert load_config(path, ["train.lr=1e-3"]).train.lr == 1e-3  # YAML reads 1e-3 as a string
    with pytest.raises(ConfigError, match="train.lr must be float"):
        load_config(path, ["train.lr=fast"])
    with pytest.raises(ConfigError, match="train.epochs must be int, got 'ten'"):
        load_config(path, ["train.epochs=ten"])
    with pytest.raises(ConfigError, match="train.precision must be one of"):
        load_config(path, ["train.precision=fp8"])
    with pytest.raises(ConfigError, match="c.yaml: not valid YAML"):
        path.write_text("model: [unclosed")
        load_config(path)
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_errors_raised_in_loader_workers_still_print_as_one_line():
    wrapped = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                        "last):\n  File ...\nmedpeft.errors.DataError: x.png: unreadable image (broken)\n")
    assert _one_line(wrapped) == "x.png: unreadable image (broken)"


def test_the_command_line_and_the_package_import_without_torch():
    """`medpeft --help` answers without torch: the package root's API and the registries load on first use."""
    code = ("import sys, medpeft, medpeft.cli, medpeft.config; "
            "assert not {'torch', 'timm', 'peft'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_api_function_train_survives_importing_the_train_package():
    code = ("import medpeft, medpeft.train.tune; from medpeft.train.recipe import train; "
            "assert medpeft.train is train, medpeft.train; from medpeft import train as t; assert t is train; "
            "from medpeft.config import METHODS; assert 'lora' in METHODS.classes")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_file_sizes_print_in_kb_below_a_megabyte():
    assert [_size(n) for n in (700, 2**20 - 60, 3 * 2**20)] == ["0.7 kB", "1023.9 kB", "3.0 MB"]


def test_help_shows_what_each_option_takes():
    """A flag takes no value (no `<bool>`), a repeatable key override reads KEY=VALUE (not `<list[str]>`)."""
    shown = medpeft("evaluate", "--help").stdout
    assert "--calibrated" in shown and "--help" in shown and "KEY=VALUE" not in shown
    assert "<bool>" not in shown and "list[str]" not in shown and "RUN_LABEL=DATA_LABEL" in shown
    assert "<path>" in shown  # options that take a value still name its type
    shown = medpeft("train", "--help").stdout
    assert "KEY=VALUE" in shown and "list[" not in shown and "<bool>" not in shown
