"""DINOv2-family catalogue models (RAD-DINO, DINOv2, DINOv2 with registers) in the layouts their authors
publish: a tiny model built with transformers (or timm for Meta's layout), saved as published, loaded by
medpeft, gives the original library's features; LoRA and linear probe train on it; a file of another
layout is refused naming the key."""

from __future__ import annotations

import pytest
import torch

from medpeft.backbones import create_backbone
from medpeft.errors import CheckpointError

from model_checks import catalogue_config, pooled_features, train_one_step

transformers = pytest.importorskip("transformers", reason="the models extra (transformers) is not installed")

TINY = {"img_size": 56, "drop_path_rate": 0.0, "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}}


def hf_dinov2(folder, registers: int = 0):
    """A tiny transformers Dinov2Model (Dinov2WithRegistersModel with `registers`), saved with
    save_pretrained as the hub repositories are (model.safetensors + config.json)."""
    torch.manual_seed(0)
    kwargs = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                  image_size=56, patch_size=14, layerscale_value=0.5)
    if registers:
        model = transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **kwargs))
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**kwargs))
    model.save_pretrained(folder)
    return model.eval()


@pytest.mark.parametrize("name, registers", [("rad-dino", 0), ("dinov2-vitb14", 0), ("dinov2-vitb14-reg", 4)])
def test_hugging_face_dinov2_folder_gives_transformers_features(run_config, tmp_path, name, registers):
    source = hf_dinov2(tmp_path / "hf", registers)
    config = catalogue_config(run_config, name, tmp_path / "hf", **TINY)
    model, report = create_backbone(config.model, num_classes=2)
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        expected = source(pixel_values=images).pooler_output
    torch.testing.assert_close(pooled_features(model, images), expected, atol=1e-4, rtol=0)
    assert report.ignored == ["embeddings.mask_token"] and set(report.fresh) == {"head.weight", "head.bias"}
    assert report.layout == "hf-dinov2" and "(hf-dinov2 layout)" in report.summary()


@pytest.mark.parametrize("method", ["lora", "linear_probe"])
@pytest.mark.parametrize("name, registers", [("rad-dino", 0), ("dinov2-vitb14", 0), ("dinov2-vitb14-reg", 4)])
def test_lora_and_linear_probe_train_a_step_on_each_entry(run_config, tmp_path, method, name, registers):
    hf_dinov2(tmp_path / "hf", registers)
    train_one_step(catalogue_config(run_config, name, tmp_path / "hf", method=method, **TINY))


def test_the_entry_supplies_the_preprocessing_and_a_user_value_wins(run_config, tmp_path):
    config = catalogue_config(run_config, "rad-dino", tmp_path / "hf", **TINY)
    assert (config.model.architecture, config.data.mean, config.data.std) == (
        "vit_base_patch14_dinov2", [0.5307] * 3, [0.2583] * 3)
    run_config = {**run_config, "data": {**run_config["data"], "mean": [0.4, 0.4, 0.4]}}
    config = catalogue_config(run_config, "rad-dino", tmp_path / "hf", kwargs={"depth": 2})
    assert (config.model.img_size, config.data.mean, config.model.kwargs) == (518, [0.4] * 3, {"depth": 2})


def test_a_checkpoint_of_another_layout_is_refused_naming_the_expected_layout_and_key(run_config, tmp_path):
    from safetensors.torch import save_file

    save_file({"conv1.weight": torch.zeros(4, 3, 7, 7)}, tmp_path / "resnet.safetensors")
    config = catalogue_config(run_config, "rad-dino", tmp_path / "resnet.safetensors", **TINY)
    with pytest.raises(CheckpointError, match=r"resnet.safetensors: not in the expected layout hf-dinov2 .* no key "
                                              r"'embeddings.patch_embeddings.projection.weight' .*'conv1.weight'"):
        create_backbone(config.model, num_classes=2)


def test_a_folder_without_weights_names_the_files_it_looked_for(run_config, tmp_path):
    (tmp_path / "empty").mkdir()
    config = catalogue_config(run_config, "rad-dino", tmp_path / "empty", **TINY)
    with pytest.raises(CheckpointError, match=r"empty: a folder without a weights file; expected one of "
                                              r"\['model.safetensors'"):
        create_backbone(config.model, num_classes=2)


FULL_SIZE = [  # (timm architecture, transformers config of the published model)
    ("vit_base_patch14_dinov2", dict(image_size=518)),  # RAD-DINO, facebook/dinov2-base
    ("vit_large_patch14_dinov2", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                      image_size=518)),
    ("vit_giant_patch14_dinov2", dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24,
                                      mlp_ratio=4, use_swiglu_ffn=True, image_size=518)),
    ("vit_base_patch14_reg4_dinov2", dict(image_size=518, patch_size=14, num_register_tokens=4)),
]


@pytest.mark.parametrize("architecture, hf_config", FULL_SIZE, ids=[a for a, _ in FULL_SIZE])
def test_full_size_published_configs_convert_to_exactly_the_timm_models_keys_and_shapes(architecture, hf_config):
    import timm

    from medpeft.backbones.layouts import LAYOUTS

    registers = hf_config.get("num_register_tokens", 0)
    config_cls = transformers.Dinov2WithRegistersConfig if registers else transformers.Dinov2Config
    model_cls = transformers.Dinov2WithRegistersModel if registers else transformers.Dinov2Model
    with torch.device("meta"):
        published = model_cls(config_cls(**hf_config)).state_dict()
        timm_model = timm.create_model(architecture, img_size=518, num_classes=0)
    converted, dropped = LAYOUTS["hf-dinov2"].convert(published)
    expected = {k: tuple(v.shape) for k, v in timm_model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    assert dropped == ["embeddings.mask_token"]


def test_a_swiglu_dinov2_folder_loads_into_timms_giant_layout_by_its_keys_alone(tmp_path):
    """ViT-g's SwiGLU feed-forward (weights_in = gate and up rows) as timm packs it; a timm name with the
    published folder: the layout is recognised from the keys."""
    from medpeft.config import ModelConfig

    torch.manual_seed(0)
    source = transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14,
        use_swiglu_ffn=True, layerscale_value=0.5)).eval()
    source.save_pretrained(tmp_path / "giant")
    config = ModelConfig(name="vit_giant_patch14_dinov2", weights=str(tmp_path / "giant"), img_size=28,
                         drop_path_rate=0.0, kwargs={"embed_dim": 48, "depth": 2, "num_heads": 2})
    model, _ = create_backbone(config, num_classes=2)
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        expected = source(pixel_values=images).pooler_output
    torch.testing.assert_close(pooled_features(model, images), expected, atol=1e-4, rtol=0)
