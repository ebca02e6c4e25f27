"""The foundation-model catalogue: every entry is buildable and documented, `medpeft models` prints it, a
run naming an entry gets its defaults, and what cannot apply is refused at config load."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from medpeft.backbones import create_backbone
from medpeft.backbones.layouts import LAYOUTS
from medpeft.cli import app
from medpeft.config import ModelConfig
from medpeft.config.catalogue import CATALOGUE
from medpeft.errors import CheckpointError, ConfigError

from model_checks import catalogue_config, pooled_features, train_one_step
from test_checkpoint import mae_layout

FIELDS = {"name", "architecture", "resolution", "normalisation", "layouts", "preprocessing", "hub", "licence", "paper"}


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_every_entry_names_a_timm_model_registered_layouts_and_its_sources(name):
    entry = CATALOGUE[name]
    assert timm.is_model(entry.architecture)
    assert entry.layouts and all(layout in LAYOUTS for layout in entry.layouts)
    assert entry.licence and entry.paper and entry.preprocessing
    assert ModelConfig(name=name, weights="random").family in ("vit", "cnn")


def test_medpeft_models_lists_every_entry_with_its_fields():
    result = CliRunner().invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [row["name"] for row in rows] == list(CATALOGUE)
    assert all(set(row) == FIELDS for row in rows)
    assert next(r for r in rows if r["name"] == "xrv-densenet121-all")["normalisation"] == "[-1024, 1024]"
    table = CliRunner().invoke(app, ["models"], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and all(name in table.output for name in CATALOGUE)


def test_timm_weights_for_a_catalogue_name_and_hub_without_a_hub_id_are_refused_at_load():
    with pytest.raises(ConfigError, match=r"model.weights 'timm' is for timm model names; 'rad-dino' is a catalogue"):
        ModelConfig(name="rad-dino", weights="timm")
    with pytest.raises(ConfigError, match=r"model.weights 'hub': 'chexzero' has no hub id"):
        ModelConfig(name="chexzero", weights="hub")
    with pytest.raises(ConfigError, match=r"model.weights 'hub': 'vit_tiny_patch16_224' is not a catalogue model"):
        ModelConfig(name="vit_tiny_patch16_224", weights="hub")


def test_hub_weights_without_a_network_are_one_error_pointing_to_a_local_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    config = ModelConfig(name="rad-dino", weights="hub", img_size=28, drop_path_rate=0.0,
                         kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2})
    with pytest.raises(CheckpointError, match=r"could not get microsoft/rad-dino from the Hugging Face hub .*give "
                                              r"model.weights its folder") as error:
        create_backbone(config, num_classes=2)
    assert "\n" not in str(error.value)


def test_a_method_that_cannot_apply_to_the_entrys_family_is_refused_at_config_load(run_config, tmp_path):
    with pytest.raises(ConfigError, match=r"method.name 'vpt_deep' applies to vit backbones, not to model.name "
                                          r"'xrv-densenet121-all' \(cnn\)"):
        catalogue_config(run_config, "xrv-densenet121-all", tmp_path / "x.pt", method="vpt_deep")


TINY_VIT_B = {"img_size": 32, "drop_path_rate": 0.0, "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}}


@pytest.mark.parametrize("name", ["mrm", "cxr-mae", "medical-mae-vits16", "medical-mae-vitb16"])
def test_mae_family_checkpoints_load_with_average_pooling_and_train(run_config, tmp_path, name):
    source = create_backbone(ModelConfig(name=CATALOGUE[name].architecture, weights="random", **TINY_VIT_B),
                             num_classes=0)[0]
    torch.save(mae_layout(source.state_dict()), tmp_path / "mae.pth")
    config = catalogue_config(run_config, name, tmp_path / "mae.pth", **TINY_VIT_B)
    assert config.model.global_pool == "avg"
    model, report = create_backbone(config.model, num_classes=2)
    assert "decoder_embed.weight" in report.ignored and set(report.fresh) == {"head.weight", "head.bias"}
    for key, value in source.state_dict().items():
        target = "fc_norm." + key[5:] if key.startswith("norm.") else key  # MAE's final norm starts fc_norm
        assert torch.equal(model.state_dict()[target], value), key
    for method in ("lora", "linear_probe"):
        train_one_step(catalogue_config(run_config, name, tmp_path / "mae.pth", method=method, **TINY_VIT_B))


def test_rad_dino_folder_with_only_the_meta_layout_file_loads(run_config, tmp_path):
    """microsoft/rad-dino publishes backbone_compatible.safetensors (Meta's DINOv2 layout) beside the
    transformers file; a folder holding only it loads through timm's DINOv2 filter."""
    tiny = {"img_size": 28, "drop_path_rate": 0.0, "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}}
    source = create_backbone(ModelConfig(name="vit_base_patch14_dinov2", weights="random", **tiny), 0)[0]
    meta = {**source.state_dict(), "mask_token": torch.zeros(1, 32)}
    (tmp_path / "rad-dino").mkdir()
    save_file(meta, tmp_path / "rad-dino" / "backbone_compatible.safetensors")
    model, report = create_backbone(catalogue_config(run_config, "rad-dino", tmp_path / "rad-dino", **tiny).model, 2)
    assert report.path.endswith("rad-dino") and report.ignored == ["mask_token"] and report.layout == "meta-dinov2"
    images = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(pooled_features(model, images), pooled_features(source, images), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_every_entry_refuses_another_models_checkpoint_in_one_line_naming_a_key(tmp_path, name):
    """A checkpoint of another family (a ResNet's for the ViTs, a ViT's for the CNNs) is never loaded."""
    other = "vit_tiny_patch16_224" if CATALOGUE[name].architecture.startswith(("densenet", "resnet")) else "resnet18"
    torch.save(timm.create_model(other, num_classes=2).state_dict(), tmp_path / "other.pth")
    size = 28 if "patch14" in CATALOGUE[name].architecture else 32
    config = ModelConfig(name=name, weights=str(tmp_path / "other.pth"), img_size=size, drop_path_rate=0.0,
                         kwargs={} if other.startswith("vit") else {"embed_dim": 32, "depth": 1, "num_heads": 2})
    with pytest.raises(CheckpointError, match=r"other.pth: .*'[\w.]+'") as error:
        create_backbone(config, num_classes=2)
    assert "\n" not in str(error.value)
