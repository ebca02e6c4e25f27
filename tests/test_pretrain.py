"""MAE pretraining: the model, the recipe (loss falls, resume, previews) and the checkpoint it hands to fine-tuning."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
import torch
from PIL import Image

from conftest import TINY_VIT, interrupted_at_call
from medpeft.backbones import create_backbone
from medpeft.backbones.checkpoint import load_checkpoint
from medpeft.config import MAEConfig, ModelConfig, config_from_dict, load_pretrain_config
from medpeft.data.readers import read_dataset
from medpeft.errors import ConfigError, DataError
from medpeft.pretrain import MAE_CHECKPOINT, MaskedAutoencoder, pretrain
from medpeft.pretrain import recipe as pretrain_recipe
from medpeft.engine import rundir
from medpeft.train.recipe import train

TINY_MAE = {"decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2, "preview_every": 2,
            "preview_images": 3}


@pytest.fixture
def pretrain_config(squares_csv, tmp_path):
    """A plain-dict pretraining config on the squares images (their labels unused)."""
    model = {k: v for k, v in TINY_VIT.items() if k not in ("weights", "drop_path_rate")}
    return {"model": model, "data": {"csv": str(squares_csv), "patient_column": "patient",
                                     "split": {"val_fraction": 0.25, "test_fraction": 0.25, "seed": 0}},
            "mae": dict(TINY_MAE), "train": {"epochs": 6, "batch_size": 8, "lr": 2e-3, "warmup_epochs": 1,
                                              "precision": "fp32"},
            "output_dir": str(tmp_path / "mae")}


def encoder(**kwargs) -> torch.nn.Module:
    model, _ = create_backbone(ModelConfig(**{**TINY_VIT, "drop_path_rate": 0.0, **kwargs}), num_classes=0)
    return model


def test_patchify_roundtrip_and_mask_hides_the_configured_share():
    mae = MaskedAutoencoder(encoder(global_pool=""), MAEConfig(mask_ratio=0.75, decoder_embed_dim=16,
                                                               decoder_depth=1, decoder_num_heads=2))
    images = torch.randn(3, 3, 32, 32)
    patches = mae.patchify(images)
    assert patches.shape == (3, 16, 8 * 8 * 3)
    assert torch.equal(patches[0, 1], images[0, :, 0:8, 8:16].permute(1, 2, 0).reshape(-1))  # row-major patches
    assert torch.equal(mae.unpatchify(patches), images)
    tokens, mask, _ = mae.encode(images, 0.75)
    assert tokens.shape == (3, 1 + 4, 32)  # class token + the 4 visible patches of 16
    assert mask.sum(1).tolist() == [12.0] * 3
    assert not torch.equal(mask[0], mask[1])  # each image has its own random mask
    loss, pred, _ = mae(images, 0.75)
    assert pred.shape == patches.shape and loss.ndim == 0


def test_loss_counts_only_hidden_patches():
    mae = MaskedAutoencoder(encoder(global_pool=""), MAEConfig(decoder_embed_dim=16, decoder_depth=1,
                                                               decoder_num_heads=2, norm_pix_loss=False))
    images = torch.randn(2, 3, 32, 32)
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    loss, pred, mask = mae(images, 0.5, generator())
    expected = (((pred - mae.patchify(images)) ** 2).mean(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, expected)


def test_only_vits_with_position_embeddings_are_accepted():
    resnet, _ = create_backbone(ModelConfig(name="resnet18", weights="random", img_size=32), num_classes=0)
    with pytest.raises(ConfigError, match="VisionTransformer"):
        MaskedAutoencoder(resnet, MAEConfig())


def test_pretraining_lowers_the_loss_and_writes_an_mae_checkpoint_that_fine_tuning_loads(pretrain_config, run_config,
                                                                                        tmp_path):
    metrics = pretrain(load_pretrain_config(base=pretrain_config), quiet=True)
    history = metrics["history"]
    assert len(history) == 6 and metrics["split_sizes"]["train"] > 0
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    out = tmp_path / "mae"
    assert rundir.is_complete(out) and not (out / rundir.CHECKPOINT).exists()
    # Previews every 2 epochs: 3 images of 32 px as rows, 4 panels side by side.
    assert sorted(p.name for p in (out / "previews").iterdir()) == ["epoch-0002.png", "epoch-0004.png",
                                                                   "epoch-0006.png"]
    assert Image.open(out / "previews" / "epoch-0006.png").size == (4 * 32, 3 * 32)
    # The test split is never read: pretraining's split has train and val rows only.
    assert set((out / rundir.SPLIT).read_text().split()[1:]) & {"test"} == set()

    # MAE layout: {'model': encoder keys at the top level + decoder keys}, as MAE / MRM / medical MAE save.
    saved = torch.load(out / MAE_CHECKPOINT, weights_only=True)
    reference = encoder(global_pool="").state_dict()  # no head, final norm, no fc_norm
    decoder = {k for k in saved["model"] if k not in reference}
    assert set(reference) <= set(saved["model"]) and saved["epoch"] == 6
    assert {k.split(".")[0] for k in decoder} == {"mask_token", "decoder_embed", "decoder_pos_embed",
                                                  "decoder_blocks", "decoder_norm", "decoder_pred"}
    for pool in ("token", "avg"):  # class-token head, or MAE fine-tuning's mean pool + fc_norm
        model = encoder(global_pool=pool)
        report = load_checkpoint(model, out / MAE_CHECKPOINT)
        assert sorted(report.ignored) == sorted(decoder) and report.unexpected == []
        assert report.fresh == []  # no head (num_classes=0); with avg pooling, norm goes to fc_norm
        torch.testing.assert_close(model.blocks[1].attn.qkv.weight, saved["model"]["blocks.1.attn.qkv.weight"],
                                   rtol=0, atol=0)

    # ...and `medpeft train` fine-tunes from it like from any MAE-layout file, on the same split: the one
    # pretraining drew without labels, so unstratified. Another split that holds its training images out is refused.
    run_config["model"]["weights"] = str(out / MAE_CHECKPOINT)
    run_config["method"] = {"name": "linear_probe"}
    run_config["train"]["epochs"] = 1
    run_config["output_dir"] = str(tmp_path / "probe")
    run_config["data"]["split"] = {**pretrain_config["data"]["split"], "seed": 1, "stratify": False}
    with pytest.raises(DataError, match=r"that run pretrained on \d+ of this run's \d+ val and test images"):
        train(config_from_dict(run_config), quiet=True)
    run_config["data"]["split"]["seed"] = 0
    finetuned = train(config_from_dict(run_config), quiet=True)
    assert finetuned["test"]["mean_auroc"] is not None


def test_interrupted_pretraining_resumes_to_the_same_checkpoint(pretrain_config, tmp_path):
    pretrain_config["train"]["epochs"] = 3
    pretrain_config["augment"] = {"hflip": 0.5}
    pretrain(load_pretrain_config(base=pretrain_config), quiet=True)

    pretrain_config["output_dir"] = str(tmp_path / "interrupted")
    with interrupted_at_call(pretrain_recipe, "validation_loss", 2):
        pretrain(load_pretrain_config(base=pretrain_config), quiet=True)
    out = tmp_path / "interrupted"
    assert (out / rundir.CHECKPOINT).is_file() and not (out / MAE_CHECKPOINT).exists()

    resumed = pretrain(load_pretrain_config(base=pretrain_config), quiet=True)
    assert [h["val_loss"] for h in resumed["history"]] == [
        h["val_loss"] for h in json.loads((tmp_path / "mae" / rundir.METRICS).read_text())["history"]]
    a = torch.load(out / MAE_CHECKPOINT, weights_only=True)["model"]
    b = torch.load(tmp_path / "mae" / MAE_CHECKPOINT, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_unlabelled_image_folder_reader(tmp_path):
    for rel in ("a/p1_x.png", "a/b/p2_y.png", "p1_z.jpg", "notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith("txt"):
            (tmp_path / rel).write_text("not an image")
        else:
            Image.new("L", (8, 8)).save(tmp_path / rel)
    config = load_pretrain_config(base={"model": {"name": "vit_tiny_patch16_224"}, "output_dir": "x",
                                        "data": {"format": "images", "csv": str(tmp_path), "patient_pattern": r"(p\d)_"}})
    table = read_dataset(config.data)
    assert table["image_id"].tolist() == ["a/b/p2_y.png", "a/p1_x.png", "p1_z.jpg"]
    assert table["patient_id"].tolist() == ["p2", "p1", "p1"]
    with pytest.raises(ConfigError, match="data.labels is required"):  # no labels: not for fine-tuning
        config_from_dict({"model": {"weights": "random"}, "method": {"name": "full"}, "output_dir": "x",
                          "data": {"format": "images", "csv": str(tmp_path)}})


@pytest.mark.parametrize("override, message", [
    ("data.split.label_fraction=0.1", "label_fraction does not apply"),
    ("train.layer_decay=0.75", "layer_decay does not apply"),
    ("train.eval_every=2", "eval_every does not apply"),
    ("mae.mask_ratio=1.0", r"mae.mask_ratio must be in \(0, 1\)"),
    ("mae.decoder_num_heads=5", "divisible"),
    ("mae.depth=3", "'mae.depth' does not exist"),
])
def test_bad_pretraining_config_is_refused(pretrain_config, override, message):
    with pytest.raises(ConfigError, match=message):
        load_pretrain_config(base=pretrain_config, overrides=[override])


def test_cli_pretrain_bad_input_is_one_line_exit_2_and_writes_nothing(pretrain_config, tmp_path):
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(pretrain_config))
    result = subprocess.run([sys.executable, "-m", "medpeft", "pretrain", str(path), "--set", "mae.mask_ratio=1"],
                            capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "mae.mask_ratio must be in (0, 1)" in result.stderr
    assert not (tmp_path / "mae").exists()
