"""Bad values a user can write are refused before anything is written: at config load with the key path in
one line, or (values only the built model can judge: the patch size, timm's own argument checks) when the
model is built, still before the run directory exists; a fixed rerun then starts afresh."""

import subprocess
import sys

import pytest
import torch
import yaml
from test_config import with_changes

from medpeft.backbones import create_backbone
from medpeft.config import config_from_dict, load_config
from medpeft.errors import ConfigError

REFUSED_AT_LOAD = [  # (overrides, the message)
    (["data.mean=[a,b,c]"], r"data.mean\[0\] must be float, got 'a'"),
    (["data.mean=[nan,0.5,0.5]"], r"data.mean\[0\] must be a finite number, got 'nan'"),
    (["data.mean=[2,0.5,0.5]"], r"data.mean must be in \[0, 1\], got 2.0"),
    (["data.std=[.inf,1,1]"], r"data.std\[0\] must be a finite number, got inf"),
    (["data.std=[0.2,0,0.2]"], r"data.std must be > 0, got 0.0"),
    (["data.num_workers=-1"], r"data.num_workers must be >= 0, got -1"),
    (["augment.scale=[2,1]"], r"augment.scale must be in \(0, 1\], got 2.0"),
    (["augment.scale=[0.9,0.5]"], r"augment.scale must be \[low, high\] with low <= high"),
    (["augment.scale=[nan,1]"], r"augment.scale\[0\] must be a finite number"),
    (["train.min_lr=-5"], r"train.min_lr must be >= 0, got -5.0"),
    (["train.min_lr=0.01"], r"train.min_lr \(0.01\) must be <= train.lr \(0.003\)"),
    (["train.lr=nan"], r"train.lr must be a finite number, got 'nan'"),
    (["train.lr=.inf"], r"train.lr must be a finite number, got inf"),
    (["train.seed=-1"], r"train.seed must be in \[0, 1000000\), got -1"),
    (["train.seed=10000000"], r"train.seed must be in \[0, 1000000\), got 10000000"),
    (["data.split.seed=-1"], r"data.split.seed must be >= 0, got -1"),
    (["method.dropout=1e400"], r"method.dropout must be a finite number, got '1e400'"),
]


@pytest.fixture
def config_file(run_config, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_config))
    return path


@pytest.mark.parametrize("overrides, message", REFUSED_AT_LOAD, ids=[o[0] for o, _ in REFUSED_AT_LOAD])
def test_a_bad_value_is_refused_at_load_naming_its_key(config_file, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(config_file, overrides)


@pytest.mark.parametrize("changes, message", [
    ({"model.img_size": 30}, r"model.img_size 30 must be a multiple of vit_tiny_patch16_224's patch size 8"),
    ({"model.global_pool": "foo"}, r"model 'vit_tiny_patch16_224' could not be built: Only avg, avgmax"),
    ({"model.kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 3, "patch_size": 8}},
     r"could not be built: dim should be divisible by num_heads"),
])
def test_a_value_only_the_model_can_judge_is_refused_when_it_is_built(run_config, changes, message):
    config = config_from_dict(with_changes(run_config, changes))
    with torch.device("meta"), pytest.raises(ConfigError, match=message):
        create_backbone(config.model, 2)


@pytest.mark.slow
def test_the_cli_refuses_a_bad_value_in_one_line_before_the_run_directory_and_the_fixed_rerun_trains(
        config_file, tmp_path):
    def medpeft(*args) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "medpeft", *args], check=False, capture_output=True, text=True,
                              timeout=300)

    bad = medpeft("train", str(config_file), "--set", "data.mean=[nan,0.5,0.5]", "--set", "train.epochs=1")
    assert (bad.returncode, bad.stderr.strip()) == (2, "error: data.mean[0] must be a finite number, got 'nan'")
    assert not (tmp_path / "run").exists()
    fixed = medpeft("train", str(config_file), "--set", "train.epochs=1")
    assert fixed.returncode == 0, fixed.stderr
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_training_refuses_an_image_size_that_is_not_whole_patches_before_the_run_directory(run_config, tmp_path):
    from medpeft import train

    with pytest.raises(ConfigError, match=r"^model.img_size 30 must be a multiple of vit_tiny_patch16_224's patch "
                                          r"size 8 \(the rest of the image would be cut off\)$"):
        train(config_from_dict(with_changes(run_config, {"model.img_size": 30})), quiet=True)
    assert not (tmp_path / "run").exists()
