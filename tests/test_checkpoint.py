import argparse
import os

import pytest
import timm
import torch
from safetensors.torch import save_file

from medpeft.backbones import create_backbone, load_checkpoint
from medpeft.config import ModelConfig
from medpeft.errors import CheckpointError

from conftest import TINY_VIT


def tiny(**changes):
    return create_backbone(ModelConfig(**{**TINY_VIT, **changes}), num_classes=3)[0]


def mae_layout(encoder: dict) -> dict:
    """A checkpoint as MAE / MRM / medical MAE save it: encoder + decoder keys under 'model'."""
    decoder = {
        "mask_token": torch.zeros(1, 1, 16),
        "decoder_embed.weight": torch.randn(16, 32),
        "decoder_pos_embed": torch.zeros(1, 17, 16),
        "decoder_blocks.0.attn.qkv.weight": torch.randn(48, 16),
        "decoder_norm.weight": torch.ones(16),
        "decoder_pred.weight": torch.randn(192, 16),
    }
    encoder = {k: v for k, v in encoder.items() if not k.startswith("head.")}
    return {"model": {**encoder, **decoder}, "epoch": 799, "args": argparse.Namespace(mask_ratio=0.75)}


def test_mae_layout_checkpoint_loads_with_decoder_keys_reported_and_ignored(tmp_path):
    source = tiny()
    path = tmp_path / "mae.pth"
    torch.save(mae_layout(source.state_dict()), path)
    target = tiny()
    report = load_checkpoint(target, path)
    assert sorted(report.ignored) == sorted(["mask_token", "decoder_embed.weight", "decoder_pos_embed",
                                             "decoder_blocks.0.attn.qkv.weight", "decoder_norm.weight",
                                             "decoder_pred.weight"])
    assert set(report.fresh) == {"head.weight", "head.bias"}
    assert report.unexpected == []
    for key, value in source.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(target.state_dict()[key], value), key


def test_checkpoint_missing_block_weights_is_refused(tmp_path):
    state = {k: v for k, v in tiny().state_dict().items() if not k.startswith("blocks.1.")}
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"partial.pth: lacks .* backbone weights .*blocks\.1\."):
        load_checkpoint(tiny(), path)


def test_pickle_that_would_run_code_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    torch.save({"model": tiny().state_dict(), "payload": Exploit()}, path)
    with pytest.raises(CheckpointError, match=r"evil.pth: refused to unpickle: .* could run code \(posix.system\)"):
        load_checkpoint(tiny(), path)
    assert not marker.exists()


def test_position_embeddings_are_resampled_to_a_new_image_size(tmp_path):
    source = tiny(img_size=32)  # 4x4 patch grid
    path = tmp_path / "small.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    target = tiny(img_size=48)  # 6x6 grid
    load_checkpoint(target, path)
    assert target.pos_embed.shape == (1, 37, 32)
    assert torch.equal(target.pos_embed[:, 0], source.pos_embed[:, 0])  # class token is kept as is
    assert target(torch.randn(1, 3, 48, 48)).shape == (1, 3)


def test_timm_safetensors_file_with_another_head_loads_and_skips_the_head(tmp_path):
    source = create_backbone(ModelConfig(**TINY_VIT), num_classes=1000)[0]
    path = tmp_path / "model.safetensors"
    save_file(source.state_dict(), str(path))
    target = tiny()
    report = load_checkpoint(target, path)
    assert sorted(report.head_skipped) == ["head.bias", "head.weight"]
    assert torch.equal(target.blocks[0].mlp.fc1.weight, source.blocks[0].mlp.fc1.weight)


def test_checkpoint_of_another_width_names_the_key_and_shapes(tmp_path):
    path = tmp_path / "wide.pth"
    torch.save(tiny(kwargs={**TINY_VIT["kwargs"], "embed_dim": 64}).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"has shape \(1, 1, 64\) in the checkpoint but \(1, 1, 32\)"):
        load_checkpoint(tiny(), path)


def test_mae_final_norm_starts_the_fc_norm_of_average_pooling(tmp_path):
    source = tiny()
    path = tmp_path / "mae.pth"
    torch.save(mae_layout(source.state_dict()), path)
    target = tiny(global_pool="avg")
    load_checkpoint(target, path)
    assert torch.equal(target.fc_norm.weight, source.norm.weight)


def test_missing_file_and_garbage_file_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pth: checkpoint file not found"):
        load_checkpoint(tiny(), tmp_path / "nope.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        load_checkpoint(tiny(), garbage)


def test_random_weights_only_when_asked_for(tmp_path):
    from medpeft.errors import ConfigError

    with pytest.raises(ConfigError, match="model.weights is required"):
        ModelConfig(name="vit_tiny_patch16_224")
    model, report = create_backbone(ModelConfig(**TINY_VIT), num_classes=2)
    assert report is None and isinstance(model, timm.models.VisionTransformer)


def test_dinov2_with_registers_in_metas_layout_loads_and_gives_the_same_features(tmp_path):
    """Meta's DINOv2-with-registers files (dinov2_vits14_reg4_pretrain.pth): register_tokens, mask_token and a
    position embedding with the class token's position first; timm keeps reg_token and no class position."""
    config = ModelConfig(name="vit_small_patch14_reg4_dinov2", weights="random", img_size=28, drop_path_rate=0.0,
                         kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2})
    source = create_backbone(config, num_classes=0)[0].eval()
    state = {k: v.clone() for k, v in source.state_dict().items()}
    class_position = torch.randn(1, 1, 32)
    meta = {**state, "register_tokens": state.pop("reg_token"), "mask_token": torch.zeros(1, 32),
            "cls_token": state["cls_token"] - class_position,
            "pos_embed": torch.cat([class_position, state["pos_embed"]], dim=1)}
    torch.save(meta, tmp_path / "dinov2_reg4.pth")
    target = create_backbone(config, num_classes=0)[0].eval()
    report = load_checkpoint(target, tmp_path / "dinov2_reg4.pth")
    assert report.ignored == ["mask_token"] and report.unexpected == []
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(target.forward_features(x), source.forward_features(x), rtol=0, atol=1e-4)


def test_weights_the_model_has_no_place_for_are_refused_unless_zero(tmp_path):
    """A variant with attention biases loaded into one without: non-zero biases would be lost silently."""
    state = tiny().state_dict()
    torch.save({**state, "blocks.0.attn.q_bias": torch.zeros(32)}, tmp_path / "zero.pth")
    assert load_checkpoint(tiny(), tmp_path / "zero.pth").unexpected == ["blocks.0.attn.q_bias"]
    torch.save({**state, "blocks.0.attn.q_bias": torch.ones(32)}, tmp_path / "biased.pth")
    with pytest.raises(CheckpointError, match=r"biased.pth: 'blocks.0.attn.q_bias' holds weights the model has no "
                                              r"place for"):
        load_checkpoint(tiny(), tmp_path / "biased.pth")
