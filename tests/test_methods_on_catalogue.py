"""Every registered method on every family of the catalogue (DINOv2 with and without registers, DINOv3's
RoPE Eva blocks, OpenAI CLIP, open_clip timm trunks, SigLIP's MAP-pooled ViT, torchxrayvision's CNNs), at
tiny sizes: it applies, one step trains exactly the parameters it made trainable, or it is refused by
name when the config is loaded."""

from __future__ import annotations

import pytest

from medpeft.config import config_from_dict
from medpeft.errors import ConfigError
from medpeft.methods import list_methods

from model_checks import train_one_step
from test_method_contract import SETTINGS

TINY_VIT = {"drop_path_rate": 0.0, "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}}
FAMILIES = {
    "rad-dino": {"img_size": 28, **TINY_VIT},
    "dinov2-vitb14-reg": {"img_size": 28, **TINY_VIT},
    "dinov3-vitb16": {"img_size": 32, **TINY_VIT},
    "vit_small_patch16_dinov3_qkvb": {"img_size": 32, **TINY_VIT},  # Eva with q/v biases (EVA-02 too)
    "chexzero": {"img_size": 32, "drop_path_rate": 0.0, "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2,
                                                                   "patch_size": 16}},
    "biomedclip": {"img_size": 32, **TINY_VIT},
    "medsiglip-448": {"img_size": 28, **TINY_VIT},
    "xrv-densenet121-all": {"img_size": 32, "kwargs": {"growth_rate": 8, "block_config": [2, 2]}},
    # zero_init_last off: with random weights a zero last norm would leave its branch nothing to learn
    "xrv-resnet50-all": {"img_size": 32, "kwargs": {"layers": [1, 1, 1, 1], "base_width": 16, "zero_init_last": False}},
}
CNN_SETTINGS = {"lora": {"targets": ["convs"]}, "rslora": {"targets": ["convs"]}, "dora": {"targets": ["convs"]}}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_method_applies_and_trains_or_is_refused_at_load(run_config, name):
    family = None
    for spec in list_methods():
        config = {**run_config, "model": {"name": name, "weights": "random", **FAMILIES[name]}}
        settings = {**SETTINGS.get(spec.name, {})}
        if name.startswith("xrv"):
            settings.update(CNN_SETTINGS.get(spec.name, {}))
        config["method"] = {"name": spec.name, **settings}
        try:
            loaded = config_from_dict(config)
        except ConfigError as e:
            assert f"method.name {spec.name!r} applies to" in str(e), str(e)
            continue
        family = loaded.model.family
        try:
            train_one_step(loaded)
        except Exception as e:  # name the method in the failure
            raise AssertionError(f"{spec.name} on {name}: {type(e).__name__}: {e}") from e
    assert family is not None


@pytest.mark.parametrize("targets", [["q", "v"], ["qkv"]])
def test_lora_reaches_the_attention_of_eva_blocks_with_query_and_value_biases(run_config, targets):
    """Eva adds its q/v biases around the qkv Linear (F.linear on its weight) unless told to call it:
    medpeft tells it to, so LoRA on qkv (or split q, v) is in the forward pass and trains."""
    config = {**run_config, "model": {"name": "vit_small_patch16_dinov3_qkvb", "weights": "random",
                                      **FAMILIES["dinov3-vitb16"]},
              "method": {"name": "lora", "r": 4, "alpha": 8, "targets": targets}}
    train_one_step(config_from_dict(config))
