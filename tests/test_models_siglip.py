"""SigLIP-family catalogue models (MedSigLIP, SigLIP) in the layout their authors publish: a tiny
transformers SiglipModel saved as the hub repositories are, loaded by medpeft, gives transformers' pooled
(MAP head) features; sharded folders load; LoRA and linear probe train on it; a checkpoint of another
layout or size is refused naming the key; the full-size configs convert onto timm's keys and shapes."""

from __future__ import annotations

import pytest
import timm
import torch

from medpeft.backbones import create_backbone
from medpeft.backbones.layouts import LAYOUTS
from medpeft.errors import CheckpointError

from model_checks import catalogue_config, pooled_features, train_one_step

transformers = pytest.importorskip("transformers", reason="the models extra (transformers) is not installed")

# Each entry's patch size (its timm architecture's) and a tiny image of a few patches a side.
ENTRIES = {"siglip-vitb16": (16, 48), "medsiglip-448": (14, 56)}


def tiny(name: str, embed_dim: int = 32) -> dict:
    """Model keys for a tiny `name`: the tiny_vision config's sizes (timm's MLP hidden = embed_dim * 4)."""
    return {"img_size": ENTRIES[name][1], "drop_path_rate": 0.0,
            "kwargs": {"embed_dim": embed_dim, "depth": 2, "num_heads": 2, "mlp_ratio": 4}}


def tiny_vision(name: str, hidden: int = 32) -> dict:
    patch, size = ENTRIES[name]
    return dict(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=hidden * 4,
                image_size=size, patch_size=patch)


def hf_siglip(folder, name: str, hidden: int = 32, vision_only: bool = False, **save):
    """A tiny transformers SiglipModel (vision and text towers, as google/siglip-* and google/medsiglip-448
    publish it) or SiglipVisionModel, saved with save_pretrained (model.safetensors + config.json; `save`
    e.g. max_shard_size). Returns the vision model, in eval mode."""
    torch.manual_seed(0)
    vision = tiny_vision(name, hidden)
    if vision_only:
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**vision))
    else:
        text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                    vocab_size=64, bos_token_id=None, eos_token_id=None, pad_token_id=None)
        model = transformers.SiglipModel(transformers.SiglipConfig(vision_config=vision, text_config=text))
    model.save_pretrained(folder, **save)
    return (model if vision_only else model.vision_model).eval()


def assert_transformers_features(source, model, name: str) -> None:
    size = ENTRIES[name][1]
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = source(pixel_values=images).pooler_output
    torch.testing.assert_close(pooled_features(model, images), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ENTRIES)
def test_hugging_face_siglip_folder_gives_transformers_features(run_config, tmp_path, name):
    source = hf_siglip(tmp_path / "hf", name)
    model, report = create_backbone(catalogue_config(run_config, name, tmp_path / "hf", **tiny(name)).model, 2)
    assert_transformers_features(source, model, name)
    assert set(report.fresh) == {"head.weight", "head.bias"} and not report.unexpected
    assert report.ignored and all(k.startswith(("text_model.", "logit_")) for k in report.ignored)


def test_a_siglip_vision_model_saved_by_transformers_5_loads(run_config, tmp_path):
    # transformers 5 saves SiglipVisionModel without the 'vision_model.' prefix the hub files have
    source = hf_siglip(tmp_path / "hf", "siglip-vitb16", vision_only=True)
    config = catalogue_config(run_config, "siglip-vitb16", tmp_path / "hf", **tiny("siglip-vitb16"))
    model, report = create_backbone(config.model, 2)
    assert_transformers_features(source, model, "siglip-vitb16")
    assert not report.ignored and not report.unexpected


def test_a_sharded_hub_folder_loads(run_config, tmp_path):
    source = hf_siglip(tmp_path / "hf", "medsiglip-448", max_shard_size="40KB")
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    config = catalogue_config(run_config, "medsiglip-448", tmp_path / "hf", **tiny("medsiglip-448"))
    assert_transformers_features(source, create_backbone(config.model, 2)[0], "medsiglip-448")


@pytest.mark.parametrize("method", ["lora", "linear_probe"])
@pytest.mark.parametrize("name", list(ENTRIES))
def test_lora_and_linear_probe_train_a_step_on_each_entry(run_config, tmp_path, method, name):
    hf_siglip(tmp_path / "hf", name)
    train_one_step(catalogue_config(run_config, name, tmp_path / "hf", method=method, **tiny(name)))


def test_the_entry_supplies_siglip_preprocessing_and_activation(run_config, tmp_path):
    config = catalogue_config(run_config, "medsiglip-448", tmp_path / "hf", kwargs={"depth": 2})
    assert (config.model.architecture, config.model.img_size, config.data.mean, config.data.std) == (
        "vit_so400m_patch14_siglip_384", 448, [0.5] * 3, [0.5] * 3)
    assert config.model.kwargs == {"act_layer": "gelu_tanh", "depth": 2}


def test_a_checkpoint_of_another_layout_is_refused_naming_the_expected_layout_and_key(run_config, tmp_path):
    transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=48,
        patch_size=16)).save_pretrained(tmp_path / "dinov2")
    config = catalogue_config(run_config, "siglip-vitb16", tmp_path / "dinov2", **tiny("siglip-vitb16"))
    with pytest.raises(CheckpointError, match=r"dinov2: not in the expected layout hf-siglip .* no key "
                                              r"'embeddings.patch_embedding.weight' .*'embeddings.cls_token'"):
        create_backbone(config.model, 2)


def test_a_siglip_of_another_size_is_refused_naming_the_key(run_config, tmp_path):
    hf_siglip(tmp_path / "hf", "medsiglip-448", hidden=64)
    config = catalogue_config(run_config, "medsiglip-448", tmp_path / "hf", **tiny("medsiglip-448"))
    with pytest.raises(CheckpointError, match=r"hf: 'patch_embed.proj.bias' has shape \(64,\) in the checkpoint "
                                              r"but \(32,\) in the model"):
        create_backbone(config.model, 2)


# The published vision configs (google/medsiglip-448: SigLIP so400m at 448 px; google/siglip-base-patch16-224:
# SiglipVisionConfig's defaults) and the timm model each catalogue entry builds.
FULL_SIZE = {
    "medsiglip-448": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                          patch_size=14, image_size=448),
    "siglip-vitb16": {},
}


@pytest.mark.parametrize("name", FULL_SIZE)
def test_the_published_full_size_config_converts_onto_the_timm_models_keys_and_shapes(name):
    from medpeft.config.catalogue import CATALOGUE

    entry = CATALOGUE[name]
    with torch.device("meta"):
        vision = transformers.SiglipVisionConfig(**FULL_SIZE[name])
        published = transformers.SiglipModel(transformers.SiglipConfig(vision_config=vision.to_dict())).state_dict()
        timm_model = timm.create_model(entry.architecture, img_size=entry.img_size, **entry.kwargs)
    layout = LAYOUTS["hf-siglip"]
    prefix = layout.prefix_in(published)
    assert prefix == "vision_model."
    converted, dropped = layout.convert({k[len(prefix):]: v for k, v in published.items() if k.startswith(prefix)})
    expected = {k: tuple(v.shape) for k, v in timm_model.state_dict().items() if not k.startswith("head.")}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected and not dropped
