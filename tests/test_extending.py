"""A new dataset format and a new method are one file each: the file registers its options (the config
loader validates them) and its reader or its apply; nothing else in medpeft changes."""

import importlib
import sys
import textwrap

import pytest

import medpeft
from medpeft.config import DATA_FORMATS, METHODS, config_from_dict
from medpeft.errors import ConfigError
from medpeft.methods import get_method, list_methods, registry

READER = '''
"""A tab-separated labels file: image, then one 0/1 column per label."""
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from medpeft.config import DATA_FORMATS, DataConfig, option


@DATA_FORMATS.register("tsv")
@dataclass
class TSVData(DataConfig):
    image_column: str = option("image", "Column of image file names.", required=True)

    def read(self, path: str) -> pd.DataFrame:
        frame = pd.read_csv(path, sep="\\t", dtype=str)
        table = pd.DataFrame({"image_id": frame[self.image_column],
                              "path": [str(Path(path).parent / p) for p in frame[self.image_column]],
                              "patient_id": frame["patient"], "view": ""})
        for label in self.labels:
            table[label] = frame[label].astype(float)
        return table
'''
METHOD = '''
"""Tune the head and the final norm only."""
from dataclasses import dataclass

from medpeft.config import MethodConfig, option
from medpeft.methods import MethodSpec, register_method
from medpeft.methods.registry import freeze_all_but_head, own_weights


@dataclass
class HeadNormConfig(MethodConfig):
    families = ("vit",)
    norm_lr_scale: float = option(1.0, "Unused knob, validated like any other.", gt=0)


def apply(model, config):
    freeze_all_but_head(model)
    model.norm.requires_grad_(True)
    return model


register_method(MethodSpec(name="head_norm", config_cls=HeadNormConfig, apply=apply, merge=own_weights,
                           description="Head and final norm."))
'''


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """The two files as importable modules; the registries are restored afterwards."""
    monkeypatch.setattr(DATA_FORMATS, "_classes", dict(DATA_FORMATS.classes))
    monkeypatch.setattr(METHODS, "_classes", dict(METHODS.classes))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    (tmp_path / "plugin_tsv.py").write_text(textwrap.dedent(READER))
    (tmp_path / "plugin_head_norm.py").write_text(textwrap.dedent(METHOD))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("plugin_tsv", "plugin_head_norm"):
        sys.modules.pop(name, None)
        importlib.import_module(name)
    yield
    for name in ("plugin_tsv", "plugin_head_norm"):
        sys.modules.pop(name, None)


def test_a_reader_and_a_method_in_one_file_each_train_and_reload(plugins, run_config, squares_csv, tmp_path):
    frame = __import__("pandas").read_csv(squares_csv)
    tsv = squares_csv.parent / "labels.tsv"
    frame.rename(columns={"path": "image"}).to_csv(tsv, sep="\t", index=False)
    config = {**run_config, "data": {**run_config["data"], "format": "tsv", "csv": str(tsv)},
              "method": {"name": "head_norm"}}
    del config["data"]["patient_column"]
    metrics = medpeft.train(config_from_dict(config), quiet=True)
    assert metrics["method"] == "head_norm" and metrics["test"]["n"] > 0
    run = medpeft.load_run(run_config["output_dir"])
    assert run.config.data.format == "tsv" and run.spec is get_method("head_norm")
    assert {n for n, p in run.model.named_parameters() if p.requires_grad} == {
        "norm.weight", "norm.bias", "head.weight", "head.bias"}
    assert "head_norm" in [m.name for m in list_methods()]


def test_a_new_formats_and_methods_keys_are_validated_like_the_built_in_ones(plugins, run_config):
    with pytest.raises(ConfigError, match=r"method.norm_lr_scale must be > 0, got -1"):
        config_from_dict({**run_config, "method": {"name": "head_norm", "norm_lr_scale": -1}})
    with pytest.raises(ConfigError, match=r"config key 'data.patient_column' does not exist for data.format 'tsv'"):
        config_from_dict({**run_config, "data": {**run_config["data"], "format": "tsv"}})
    with pytest.raises(ConfigError, match=r"method.name 'head_norm' applies to vit backbones"):
        config_from_dict({**run_config, "model": {"name": "resnet10t", "weights": "random"},
                          "method": {"name": "head_norm"}})
