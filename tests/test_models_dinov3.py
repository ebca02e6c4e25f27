"""DINOv3 (timm's RoPE Eva, 4 register tokens, layer scale) in the layouts its authors publish: a tiny
transformers DINOv3ViTModel saved with save_pretrained and a Meta torch-hub file load by the catalogue name
and give the original model's features; LoRA and linear probe train on it; another model's checkpoint is
refused naming the key; the published ViT-B/16 config's keys and shapes are what timm's model expects."""

from __future__ import annotations

import re

import pytest
import timm
import torch
from safetensors.torch import save_file

from medpeft.backbones import create_backbone
from medpeft.backbones.layouts import LAYOUTS
from medpeft.config.catalogue import CATALOGUE
from medpeft.errors import CheckpointError

from model_checks import catalogue_config, pooled_features, train_one_step

transformers = pytest.importorskip("transformers", reason="the models extra (transformers) is not installed")

WIDTH = 32
TINY = {"img_size": 64, "drop_path_rate": 0.0, "kwargs": {"embed_dim": WIDTH, "depth": 2, "num_heads": 2}}


def noised(model: torch.nn.Module, zero: tuple[str, ...] = ()) -> torch.nn.Module:
    """`model` with noise on every weight (so no mapping error hides behind an init value), the
    parameters ending in `zero` set to 0; in eval mode."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.add_(torch.randn_like(param) * 0.1)
            if name.endswith(zero):
                param.zero_()
    return model.eval()


def hf_dinov3(folder, width: int = WIDTH, biases: bool = False):
    """A tiny transformers DINOv3ViTModel saved with save_pretrained as the hub repositories are
    (model.safetensors + config.json). Its query/value biases are 0, as in the published ViT-B, unless
    `biases`."""
    config = transformers.DINOv3ViTConfig(hidden_size=width, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=4 * width, image_size=64, patch_size=16,
                                          num_register_tokens=4)
    model = noised(transformers.DINOv3ViTModel(config), () if biases else ("q_proj.bias", "v_proj.bias"))
    model.save_pretrained(folder)
    return model


def meta_dinov3(path, source: torch.nn.Module) -> None:
    """`source` (timm's DINOv3 Eva) saved as Meta's torch-hub .pth. Meta's code is not installed: the
    names are timm's Eva filter read backwards (storage_tokens, blocks.N.ls1.gamma, the fused qkv.bias with
    its key part 0 and qkv.bias_mask, the rope_embed.periods buffer, mask_token)."""
    meta = {re.sub(r"gamma_([12])", r"ls\1.gamma", key.replace("reg_token", "storage_tokens")): value
            for key, value in source.state_dict().items()}
    zeros = torch.zeros(WIDTH)
    for block in range(2):
        query, value = (meta.pop(f"blocks.{block}.attn.{name}_bias", zeros) for name in "qv")
        meta[f"blocks.{block}.attn.qkv.bias"] = torch.cat([query, zeros, value])
        meta[f"blocks.{block}.attn.qkv.bias_mask"] = torch.cat([torch.ones(WIDTH), zeros, torch.ones(WIDTH)])
    meta["rope_embed.periods"] = torch.ones(WIDTH // 2 // 4)
    meta["mask_token"] = torch.zeros(1, WIDTH)
    torch.save(meta, path)


@pytest.mark.parametrize("size", [64, 96])
@pytest.mark.parametrize("biases", [False, True])
def test_hugging_face_dinov3_folder_gives_transformers_features(run_config, tmp_path, size, biases):
    source = hf_dinov3(tmp_path / "hf", biases=biases)
    tiny = {**TINY, "img_size": size, "kwargs": {**TINY["kwargs"], "qkv_bias": biases}}
    model, report = create_backbone(catalogue_config(run_config, "dinov3-vitb16", tmp_path / "hf", **tiny).model, 2)
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = source(pixel_values=images).pooler_output
    torch.testing.assert_close(pooled_features(model, images), expected, atol=1e-4, rtol=0)
    assert report.ignored == ["embeddings.mask_token"] and set(report.fresh) == {"head.weight", "head.bias"}
    # A model built without query/value biases takes zero ones only, named as left over.
    assert len(report.unexpected) == (0 if biases else 4)


@pytest.mark.parametrize("biases", [False, True])
def test_meta_dinov3_file_gives_the_source_models_features(run_config, tmp_path, biases):
    tiny = {**TINY, "kwargs": {**TINY["kwargs"], "qkv_bias": biases}}
    source = noised(timm.create_model("vit_base_patch16_dinov3", num_classes=0, global_pool="token",
                                      img_size=64, **tiny["kwargs"]))
    meta_dinov3(tmp_path / "dinov3_vitb16_pretrain_lvd1689m-tiny.pth", source)
    config = catalogue_config(run_config, "dinov3-vitb16", tmp_path / "dinov3_vitb16_pretrain_lvd1689m-tiny.pth",
                              **tiny)
    model, report = create_backbone(config.model, 2)
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(pooled_features(model, images), pooled_features(source, images), atol=1e-4, rtol=0)
    assert report.ignored == ["mask_token"] and not report.unexpected


@pytest.mark.parametrize("biases", [False, True])
def test_timm_hub_folder_loads_as_saved(run_config, tmp_path, biases):
    """timm/vit_base_patch16_dinov3[_qkvb].lvd1689m: without the biases, qkv_bias: false builds the same model."""
    kwargs = {**TINY["kwargs"], "qkv_bias": biases}
    source = noised(timm.create_model("vit_base_patch16_dinov3", num_classes=0, global_pool="token", img_size=64,
                                      **kwargs))
    (tmp_path / "timm").mkdir()
    save_file(source.state_dict(), tmp_path / "timm" / "model.safetensors")
    config = catalogue_config(run_config, "dinov3-vitb16", tmp_path / "timm", **{**TINY, "kwargs": kwargs})
    model, _ = create_backbone(config.model, 2)
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(pooled_features(model, images), pooled_features(source, images), atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["lora", "linear_probe"])
def test_lora_and_linear_probe_train_a_step_on_dinov3(run_config, tmp_path, method):
    hf_dinov3(tmp_path / "hf")
    train_one_step(catalogue_config(run_config, "dinov3-vitb16", tmp_path / "hf", method=method, **TINY))


def test_a_dinov2_folder_is_refused_naming_the_expected_layout_and_key(run_config, tmp_path):
    transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=2,
                                                       intermediate_size=4 * WIDTH, image_size=56)
                             ).save_pretrained(tmp_path / "dinov2")
    config = catalogue_config(run_config, "dinov3-vitb16", tmp_path / "dinov2", **TINY)
    with pytest.raises(CheckpointError, match=r"dinov2: not in the expected layout hf-dinov3 .* or meta-dinov3 .* or "
                                              r"timm .*no key 'embeddings.patch_embeddings.weight'"):
        create_backbone(config.model, num_classes=2)


def test_a_dinov3_of_another_width_is_refused_naming_the_key(run_config, tmp_path):
    hf_dinov3(tmp_path / "wide", width=64)
    config = catalogue_config(run_config, "dinov3-vitb16", tmp_path / "wide", **TINY)
    with pytest.raises(CheckpointError, match=r"wide: 'cls_token' has shape \(1, 1, 64\) in the checkpoint but "
                                              r"\(1, 1, 32\) in the model"):
        create_backbone(config.model, num_classes=2)


def test_the_published_vit_b16_keys_and_shapes_are_what_timms_model_expects():
    """facebook/dinov3-vitb16-pretrain-lvd1689m's config.json numbers, built on the meta device (no
    weights): every converted key is a timm key of the same shape, and every timm backbone key is there;
    the entry builds the variant with the published query/value biases."""
    config = transformers.DINOv3ViTConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12, patch_size=16, num_register_tokens=4,
                                          image_size=224, query_bias=True, key_bias=False, value_bias=True)
    with torch.device("meta"):
        published = transformers.DINOv3ViTModel(config).state_dict()
        with_biases = timm.create_model("vit_base_patch16_dinov3_qkvb", num_classes=0).state_dict()
        entry_model = timm.create_model(CATALOGUE["dinov3-vitb16"].architecture, num_classes=0).state_dict()
    converted, dropped = LAYOUTS["hf-dinov3"].convert(published)
    assert dropped == ["embeddings.mask_token"]
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in with_biases.items()}
    assert {k: v.shape for k, v in entry_model.items()} == {k: v.shape for k, v in with_biases.items()}
