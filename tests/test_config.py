"""The config is the boundary: every key a user can write is checked when the config is loaded, with the
key path in a one-line error; a study fails before its first cell trains."""

import copy
import subprocess
import sys

import pytest
import yaml

from medpeft.config import DataConfig, RunConfig, build, config_from_dict, load_config, upgrade_saved
from medpeft.errors import ConfigError

from test_study import write_study


def with_changes(run_config: dict, changes: dict) -> dict:
    config = copy.deepcopy(run_config)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return config


INVALID = [  # (changes to a valid run config, the message)
    ({"method": {"name": "loha", "targets": ["qq"]}}, r"method.targets \['qq'\] must be a non-empty list of: qkv"),
    ({"method": {"name": "loha", "r": -3}}, r"method.r must be > 0, got -3"),
    ({"method": {"name": "adalora", "interval": 0}}, r"method.interval must be > 0, got 0"),
    ({"data": {"format": "chexpert", "csv": "train.csv", "uncertainty": "onez"}},
     r"data.uncertainty preset 'onez' is unknown"),
    ({"data.labels": [1, 2]}, r"data.labels\[0\] must be str, got 1"),
    ({"method": {"name": "lora", "targets": ["convs"]}}, r"method.targets \['convs'\] do not exist in vit_tiny"),
    ({"method": {"name": "loha"}, "model.name": "resnet10t"}, r"method.name 'loha' applies to vit backbones"),
    ({"method": {"name": "ia3", "feedforward": ["fc1"]}}, r"method.feedforward \['fc1'\]: 'fc1' is not one of"),
    ({"method": {"name": "adapter", "placement": "middle"}}, r"method.placement must be one of \['houlsby'"),
    ({"data.split.label_fraction": 0}, r"data.split.label_fraction must be in \(0, 1\], got 0"),
    ({"data": {"format": "nih", "csv": "Data_Entry_2017.csv", "labels": ["Effusion", "Fracture"]}},
     r"data.labels: the 'nih' format has no label 'Fracture'"),
    ({"data": {"format": "folder", "csv": "root", "labels": ["a", "b"], "patient_pattern": "(unclosed"}},
     r"data.patient_pattern '\(unclosed' is not a regular expression"),
    ({"data.label_column": "f", "data.label_delimiter": ""}, r"data.label_delimiter must not be empty"),
    ({"data.mean": [0.5, 0.5]}, r"data.mean must have 3 values"),
    ({"train.precision": "fp16", "train.device": "cpu"}, r"train.precision 'fp16' needs a CUDA device"),
    ({"train.frozen_prefix_cache": True}, r"train.frozen_prefix_cache needs augment.enabled: false"),
    ({"train.recompute": "selective", "model.name": "resnet10t", "method": {"name": "full"}},
     r"train.recompute 'selective' needs a ViT"),
    ({"train.device": "gpu"}, r"train.device must be 'auto', 'cpu' or 'cuda\[:N\]'"),
    ({"model.name": "vit_nonexistent"}, r"model.name 'vit_nonexistent' is neither a catalogue model"),
    ({"augment.scale": [0.9, 0.5]}, r"augment.scale must be \[low, high\]"),
]
TYPOS = ["model.nmae", "data.patient_colum", "data.split.seeds", "method.rank", "train.lerning_rate",
         "augment.hflp", "output"]


@pytest.mark.parametrize("changes, message", INVALID, ids=[m.split(" ")[0].replace("\\", "") for _, m in INVALID])
def test_an_invalid_value_is_refused_at_load_naming_its_key(run_config, changes, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(with_changes(run_config, changes))


@pytest.mark.parametrize("key", TYPOS)
def test_a_typo_in_any_key_is_refused_at_load_naming_it(run_config, key):
    with pytest.raises(ConfigError, match=f"config key '{key}' does not exist"):
        config_from_dict(with_changes(run_config, {key: 1}))


def test_a_key_of_another_format_is_refused_for_this_one(run_config):
    with pytest.raises(ConfigError, match="config key 'data.frontal_only' does not exist for data.format 'csv' "
                                          r"\(expected one of: csv, labels,"):
        config_from_dict(with_changes(run_config, {"data.frontal_only": True}))


def test_each_format_has_its_own_keys_and_defaults(run_config):
    nih = build(DataConfig, {"format": "nih", "csv": "Data_Entry_2017.csv", "views": ["PA"]})
    assert nih.format == "nih" and nih.views == ["PA"] and len(nih.labels) == 14 and not hasattr(nih, "path_column")
    rsna = build(DataConfig, {"format": "rsna", "csv": "x.csv", "class_info": "info.csv"})
    assert rsna.labels == ["Normal", "No Lung Opacity / Not Normal", "Lung Opacity"]
    config = config_from_dict(run_config)
    assert config.to_dict()["data"]["format"] == "csv" and config.to_dict()["method"]["name"] == "lora"
    assert isinstance(config, RunConfig) and config_from_dict(config.to_dict()) == config


def test_a_0_1_run_config_with_every_readers_keys_still_loads(run_config):
    """medpeft 0.1 wrote one data section with every reader's keys; a run directory keeps it."""
    saved = with_changes(run_config, {"data.views": None, "data.frontal_only": False, "data.uncertainty": "med-peft",
                                      "data.class_info": None, "data.patient_pattern": None})
    with pytest.raises(ConfigError, match="data.frontal_only"):
        config_from_dict(saved)
    # A config saved before data.split.stratify existed drew its split unstratified.
    assert config_from_dict(upgrade_saved(saved)) == config_from_dict(with_changes(run_config,
                                                                                   {"data.split.stratify": False}))


def test_the_cli_refuses_a_bad_config_in_one_line_and_writes_nothing(run_config, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(with_changes(run_config, {"method": {"name": "adalora", "interval": 0}})))
    done = subprocess.run([sys.executable, "-m", "medpeft", "train", str(path), "--set", "data.labels=[1, 2]"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: data.labels[0] must be str, got 1"
    assert not (tmp_path / "run").exists()


def test_a_study_with_one_bad_cell_fails_before_any_cell_trains(tmp_path, squares_csv, monkeypatch):
    """Partial fine-tuning of 3 blocks of a 2-block ViT: only building the model tells, which study run
    does for every cell, on the meta device, before it starts one."""
    from medpeft.study import runner

    started = []
    monkeypatch.setattr(runner, "_execute", lambda *args: started.append(args))
    study = write_study(tmp_path / "study.yaml", squares_csv, axes={
        "method": {"lora": {"method": {"r": 2}}, "partial": {"method": {"name": "partial", "blocks": 3}}}})
    with pytest.raises(ConfigError, match=r"study.yaml: cell default__default__partial__f1__s0: method.blocks 3: "
                                          r"the model has 2 blocks"):
        runner.run_study(study, tmp_path / "out", quiet=True)
    assert not started and not (tmp_path / "out").exists()


def test_load_config_applies_overrides_then_validates(run_config, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_config))
    config = load_config(path, ["method.r=2", "train.lr=1e-3", "data.split.seed=3"])
    assert (config.method.r, config.train.lr, config.data.split.seed) == (2, 0.001, 3)
    with pytest.raises(ConfigError, match="method.r must be > 0, got 0"):
        load_config(path, ["method.r=0"])
