"""Text-initialised heads (model.head_init: text): the classifier starts as the vision-language model's
own zero-shot classifier, equal to what its original library computes, and trains like any head."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from medpeft.engine.assemble import build_model
from medpeft.errors import ConfigError

from model_checks import catalogue_config, train_one_step

open_clip = pytest.importorskip("open_clip", reason="the models extra (open_clip_torch) is not installed")
transformers = pytest.importorskip("transformers", reason="the models extra (transformers) is not installed")

LABELS = ["bright", "dark"]  # the squares data of the run_config fixture
CLIP_TINY = {"img_size": 32, "drop_path_rate": 0.0,
             "kwargs": {"embed_dim": 64, "depth": 2, "num_heads": 1, "patch_size": 8}}


def tiny_openai_clip(path):
    """An OpenAI-layout CLIP (CheXzero's file: torch.save of the state_dict), with a text tower."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(layers=2, width=64, patch_size=8, image_size=32),
                 text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=2),
                 quick_gelu=True).eval()
    torch.save(model.state_dict(), path)
    return model


def logits(config, images):
    model = build_model(config).model.eval()
    with torch.no_grad():
        return model(images)


def test_chexzero_text_head_is_its_zero_shot_pair_softmax(run_config, tmp_path):
    source = tiny_openai_clip(tmp_path / "chexzero.pt")
    config = catalogue_config(run_config, "chexzero", tmp_path / "chexzero.pt", method="linear_probe",
                              head_init="text", prompt="chest x-ray showing {label}", **CLIP_TINY)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        image = F.normalize(source.encode_image(images), dim=-1)
        texts = [f"chest x-ray showing {label}" for label in LABELS] + [f"no {label}" for label in LABELS]
        text = F.normalize(source.encode_text(open_clip.tokenizer.tokenize(texts)), dim=-1)
        similarity = source.logit_scale.exp() * image @ text.T
    expected = similarity[:, :2] - similarity[:, 2:]  # log p(positive) - log p(negative) of the pair
    torch.testing.assert_close(logits(config, images), expected, atol=1e-4, rtol=0)


def test_a_multiclass_text_head_is_clips_zero_shot_classifier(run_config, tmp_path):
    source = tiny_openai_clip(tmp_path / "chexzero.pt")
    run_config = {**run_config, "data": {**run_config["data"], "task": "multiclass"}}
    config = catalogue_config(run_config, "chexzero", tmp_path / "chexzero.pt", method="linear_probe",
                              head_init="text", **CLIP_TINY)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        image = F.normalize(source.encode_image(images), dim=-1)
        text = F.normalize(source.encode_text(open_clip.tokenizer.tokenize(LABELS)), dim=-1)
        expected = source.logit_scale.exp() * image @ text.T
    torch.testing.assert_close(logits(config, images), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["lora", "linear_probe"])
def test_a_text_head_trains_like_any_head(run_config, tmp_path, method):
    tiny_openai_clip(tmp_path / "chexzero.pt")
    train_one_step(catalogue_config(run_config, "chexzero", tmp_path / "chexzero.pt", method=method,
                                    head_init="text", **CLIP_TINY))


def test_text_heads_are_refused_at_load_for_models_without_a_text_tower(run_config, tmp_path):
    with pytest.raises(ConfigError, match=r"model.head_init 'text' needs a vision-language catalogue model .* "
                                          r"not 'rad-dino'"):
        catalogue_config(run_config, "rad-dino", tmp_path, head_init="text")
    with pytest.raises(ConfigError, match=r"model.prompt 'a {lable}' must hold \{label\} and no other braces"):
        catalogue_config(run_config, "chexzero", tmp_path, head_init="text", prompt="a {lable}")


def tiny_siglip(folder):
    """A SiglipModel folder as published: model.safetensors, config.json and its tokenizer files (here a
    word-level tokenizer made offline with `tokenizers`; SigLIP's own is SentencePiece)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]", "chest", "x-ray", "showing", "no", "bright", "dark"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                         model_max_length=16).save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.SiglipConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           image_size=32, patch_size=8),
        text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         vocab_size=len(words), max_position_embeddings=16))
    model = transformers.SiglipModel(config).eval()
    model.save_pretrained(folder)
    return model


def test_siglip_text_head_is_its_sigmoid_zero_shot_difference(run_config, tmp_path):
    source = tiny_siglip(tmp_path / "siglip")
    tiny = {"img_size": 32, "drop_path_rate": 0.0,
            "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "mlp_ratio": 2}}
    config = catalogue_config(run_config, "medsiglip-448", tmp_path / "siglip", method="linear_probe",
                              head_init="text", prompt="chest x-ray showing {label}", **tiny)
    images = torch.randn(3, 3, 32, 32)
    texts = [f"chest x-ray showing {label}" for label in LABELS] + [f"no {label}" for label in LABELS]
    tokens = transformers.AutoTokenizer.from_pretrained(tmp_path / "siglip")(texts, padding="max_length",
                                                                              return_tensors="pt")
    with torch.no_grad():
        similarity = source(input_ids=tokens["input_ids"], pixel_values=images).logits_per_image
    torch.testing.assert_close(logits(config, images), similarity[:, :2] - similarity[:, 2:], atol=1e-4, rtol=0)


def tiny_biomedclip(folder, monkeypatch):
    """An open_clip model with a timm trunk saved as BiomedCLIP's hub folder (open_clip_config.json +
    open_clip_pytorch_model.bin); its text tower is open_clip's own here (BiomedCLIP's is PubMedBERT). The
    trunk is timm's vit_base_patch16_224 made tiny, for open_clip's every build in the test."""
    import functools
    import types

    import timm

    tiny = functools.partial(timm.create_model, img_size=32, embed_dim=32, depth=2, num_heads=2)
    monkeypatch.setattr(open_clip.timm_model, "timm", types.SimpleNamespace(create_model=tiny))
    model_cfg = {"embed_dim": 24, "vision_cfg": {"timm_model_name": "vit_base_patch16_224",
                                                 "timm_model_pretrained": False, "timm_pool": "",
                                                 "timm_proj": "linear", "image_size": 32},
                 "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}}
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{folder}").eval()
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return model


def test_biomedclip_text_head_from_its_published_folder(run_config, tmp_path, monkeypatch):
    source = tiny_biomedclip(tmp_path / "biomedclip", monkeypatch)
    config = catalogue_config(run_config, "biomedclip", tmp_path / "biomedclip", method="linear_probe",
                              head_init="text", img_size=32, drop_path_rate=0.0,
                              kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2})
    images = torch.randn(2, 3, 32, 32)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'biomedclip'}")
    with torch.no_grad():
        image = F.normalize(source.encode_image(images), dim=-1)
        text = F.normalize(source.encode_text(tokenizer(LABELS + [f"no {label}" for label in LABELS])), dim=-1)
        similarity = source.logit_scale.exp() * image @ text.T
    torch.testing.assert_close(logits(config, images), similarity[:, :2] - similarity[:, 2:], atol=1e-4, rtol=0)


def test_zero_shot_evaluation_scores_the_untrained_text_head_on_the_test_split(run_config, tmp_path):
    import yaml
    from sklearn.metrics import roc_auc_score
    from typer.testing import CliRunner

    from medpeft.cli import app
    from medpeft.config import load_config
    from medpeft.data import read_split_dataset
    from medpeft.inference import zero_shot

    tiny_openai_clip(tmp_path / "chexzero.pt")
    config = {**run_config, "model": {"name": "chexzero", "weights": str(tmp_path / "chexzero.pt"), **CLIP_TINY},
              "train": {**run_config["train"], "precision": "fp32"}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["evaluate", "--zero-shot", str(tmp_path / "run.yaml")], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    loaded = load_config(tmp_path / "run.yaml", ["model.head_init=text"])
    metrics = zero_shot(loaded, "test")
    assert f"mean AUROC {metrics['mean_auroc']:.4f} over {metrics['n']} images" in result.output
    # The same AUROC from the head's logits on the test images, computed here.
    from medpeft.data.dataset import build_transform
    from PIL import Image

    table = read_split_dataset(loaded.data)
    test = table[table["split"] == "test"]
    transform = build_transform(32, loaded.data.mean, loaded.data.std, None)
    images = torch.stack([transform(Image.open(path).convert("RGB")) for path in test["path"]])
    head = logits(loaded, images)
    expected = roc_auc_score(test["bright"], head[:, 0])
    assert metrics["n"] == len(test) and abs(metrics["per_label"]["bright"]["auroc"] - expected) < 1e-6


def test_a_trained_text_head_run_reloads_and_exports_without_a_timm_file(run_config, tmp_path):
    import medpeft
    from medpeft.config import config_from_dict

    tiny_openai_clip(tmp_path / "chexzero.pt")
    run_config["train"]["epochs"] = 1
    config = catalogue_config(run_config, "chexzero", tmp_path / "chexzero.pt", head_init="text", **CLIP_TINY)
    medpeft.train(config_from_dict(config.to_dict()), quiet=True)
    run = medpeft.load_run(config.output_dir)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        trained = run.model(images)
    assert not torch.allclose(trained, logits(config, images))  # the head trained away from its start
    manifest = run.export(tmp_path / "export")
    assert manifest["merged"] is True and "text-initialised head" in manifest["merge_note"]
    assert set(manifest["max_abs_diff"]) == {"torchscript", "onnx"}  # the LoRA merged; no timm file


def test_a_study_cell_with_a_text_head_passes_the_check_before_the_grid_runs(run_config, tmp_path):
    """medpeft study run builds every cell on the meta device first, without reading the weights."""
    from medpeft.engine.assemble import check_buildable

    tiny_openai_clip(tmp_path / "chexzero.pt")
    check_buildable(catalogue_config(run_config, "chexzero", tmp_path / "chexzero.pt", head_init="text", **CLIP_TINY))
