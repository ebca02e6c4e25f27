"""CLIP-family catalogue models in the layouts their authors publish: BiomedCLIP (an open_clip model with
a timm trunk, the hub folder's open_clip_pytorch_model.bin + open_clip_config.json) and CheXzero (a
torch.save of an OpenAI clip.model.CLIP ViT-B/32 state_dict). Tiny models built with open_clip and saved
as published load by name and give open_clip's image features before the projection; the text tower is
reported as ignored; LoRA and linear probe train on them; a file of another layout is refused naming the
key; the full-size configs convert onto exactly timm's keys and shapes."""

from __future__ import annotations

import functools
import json
import types

import pytest
import timm
import torch
from timm.models.vision_transformer import checkpoint_filter_fn

from medpeft.backbones import create_backbone
from medpeft.backbones.checkpoint import load_checkpoint
from medpeft.backbones.layouts import LAYOUTS
from medpeft.config.catalogue import CATALOGUE
from medpeft.errors import CheckpointError

from model_checks import catalogue_config, pooled_features, train_one_step

open_clip = pytest.importorskip("open_clip", reason="the models extra (open_clip_torch) is not installed")
transformers = pytest.importorskip("transformers", reason="the models extra (transformers) is not installed")

# BiomedCLIP's open_clip_config.json as published on the hub (its model_cfg and preprocess_cfg).
BIOMEDCLIP_CONFIG = {
    "model_cfg": {
        "embed_dim": 512,
        "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
                       "timm_pool": "", "timm_proj": "linear", "image_size": 224},
        "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                     "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                     "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                     "context_length": 256},
    },
    "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
}
TINY_TRUNK = {"embed_dim": 32, "depth": 2, "num_heads": 2}
TINY = {"biomedclip": {"img_size": 32, "drop_path_rate": 0.0, "kwargs": TINY_TRUNK},
        "chexzero": {"img_size": 64, "drop_path_rate": 0.0, "kwargs": {"embed_dim": 64, "depth": 2, "num_heads": 2}}}
# The keys of one residual block of OpenAI's clip.model.CLIP (its Transformer's ResidualAttentionBlock).
OPENAI_BLOCK = ("attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
                "ln_1.weight", "ln_1.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
                "mlp.c_proj.bias", "ln_2.weight", "ln_2.bias")


def openai_clip_keys(vision_layers: int, text_layers: int) -> set[str]:
    """The state_dict keys of OpenAI's clip.model.CLIP with a ViT image tower (what its build_model loads
    strictly, so what CheXzero's torch.save(model.state_dict()) holds)."""
    top = {"visual.class_embedding", "visual.positional_embedding", "visual.proj", "visual.conv1.weight",
           "visual.ln_pre.weight", "visual.ln_pre.bias", "visual.ln_post.weight", "visual.ln_post.bias",
           "positional_embedding", "text_projection", "logit_scale", "token_embedding.weight", "ln_final.weight",
           "ln_final.bias"}
    blocks = {f"{tower}transformer.resblocks.{i}.{key}" for tower, layers in (("visual.", vision_layers),
                                                                             ("", text_layers))
              for i in range(layers) for key in OPENAI_BLOCK}
    return top | blocks


def biomedclip(folder):
    """A tiny BiomedCLIP as open_clip builds it from BIOMEDCLIP_CONFIG (CustomTextCLIP; its TimmModel trunk
    timm's vit_base_patch16_224 at TINY_TRUNK sizes; a BERT text tower under text.* as open_clip's
    HFTextEncoder makes it), saved as the hub folder is. Returns the model, in eval mode."""
    torch.manual_seed(0)
    tiny_timm = types.SimpleNamespace(create_model=functools.partial(timm.create_model, img_size=32, **TINY_TRUNK))
    model_cfg = BIOMEDCLIP_CONFIG["model_cfg"]
    text_cfg = {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(open_clip.timm_model, "timm", tiny_timm)
        model = open_clip.CustomTextCLIP(embed_dim=24, vision_cfg=model_cfg["vision_cfg"], text_cfg=text_cfg)
    bert = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=16)
    model.text = open_clip.hf_model.HFTextEncoder(
        model_cfg["text_cfg"]["hf_model_name"], output_dim=24, config=bert,
        pooler_type=model_cfg["text_cfg"]["hf_pooler_type"], proj_type=model_cfg["text_cfg"]["hf_proj_type"])
    model.text.transformer.pooler = None  # open_clip loads BERT without its pooler for this pooler type
    folder.mkdir()
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    (folder / "open_clip_config.json").write_text(json.dumps(BIOMEDCLIP_CONFIG))
    return model.eval()


def chexzero(path, half: bool = False):
    """A tiny OpenAI-layout CLIP ViT with quick GELU (open_clip's CLIP: OpenAI's key names), saved as
    CheXzero's training saves it: torch.save(model.state_dict()) to a .pt; `half` as clip.load leaves it on a
    GPU (OpenAI's convert_weights: linear, conv and attention weights and the projections in float16).
    Returns the model (in float32 with the saved values), in eval mode."""
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=48, quick_gelu=True, vision_cfg={"image_size": 64, "layers": 2, "width": 64, "patch_size": 32,
                                                   "head_width": 32},
        text_cfg={"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1})
    if half:
        open_clip.model.convert_weights_to_lp(model, torch.float16)
    torch.save(model.state_dict(), path)
    return model.float().eval()


def pre_projection(visual, images):
    """open_clip's image features before the CLIP projection (the pooled, normalised class token)."""
    with torch.no_grad():
        if isinstance(visual, open_clip.timm_model.TimmModel):
            return visual.trunk(images)
        proj, visual.proj = visual.proj, None
        try:
            return visual(images)
        finally:
            visual.proj = proj


def test_biomedclip_folder_gives_open_clip_trunk_features(run_config, tmp_path):
    source = biomedclip(tmp_path / "biomedclip")
    model, report = create_backbone(catalogue_config(run_config, "biomedclip", tmp_path / "biomedclip",
                                                     **TINY["biomedclip"]).model, num_classes=2)
    images = torch.randn(2, 3, 32, 32)
    features = pooled_features(model, images)
    torch.testing.assert_close(features, pre_projection(source.visual, images), atol=1e-4, rtol=0)
    with torch.no_grad():  # encode_image is the projection of these features
        torch.testing.assert_close(source.visual.head(features), source.encode_image(images), atol=1e-4, rtol=0)
    saved = torch.load(tmp_path / "biomedclip" / "open_clip_pytorch_model.bin", weights_only=True)
    assert set(report.ignored) == {k for k in saved if not k.startswith("visual.")}
    assert any(k.startswith("text.transformer.") for k in report.ignored)
    assert set(report.head_skipped) == set(report.fresh) == {"head.weight", "head.bias"}
    assert not report.unexpected


@pytest.mark.parametrize("half", [False, True], ids=["float32", "float16"])
def test_chexzero_file_gives_open_clip_features_with_quick_gelu(run_config, tmp_path, half):
    source = chexzero(tmp_path / "chexzero.pt", half)
    saved = torch.load(tmp_path / "chexzero.pt", weights_only=True)
    assert set(saved) == openai_clip_keys(vision_layers=2, text_layers=1)
    model, report = create_backbone(catalogue_config(run_config, "chexzero", tmp_path / "chexzero.pt",
                                                     **TINY["chexzero"]).model, num_classes=2)
    images = torch.randn(2, 3, 64, 64)
    features = pooled_features(model, images)
    expected = pre_projection(source.visual, images)
    torch.testing.assert_close(features, expected, atol=1e-4, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(features @ source.visual.proj, source.encode_image(images), atol=1e-4, rtol=0)
    assert set(report.ignored) == {k for k in saved if not k.startswith("visual.")}
    assert set(report.head_skipped) == set(report.fresh) == {"head.weight", "head.bias"}
    assert not report.unexpected


def test_the_1e4_bar_tells_quick_gelu_from_gelu(tmp_path):
    """The same file in timm's GELU CLIP tower misses open_clip's features: the check above sees the activation."""
    source = chexzero(tmp_path / "chexzero.pt")
    gelu = timm.create_model("vit_base_patch32_clip_224", num_classes=2, img_size=64, **TINY["chexzero"]["kwargs"])
    load_checkpoint(gelu, tmp_path / "chexzero.pt", ["openai-clip"])
    images = torch.randn(2, 3, 64, 64)
    difference = (pooled_features(gelu, images) - pre_projection(source.visual, images)).abs().max()
    assert difference > 1e-3, difference


@pytest.mark.parametrize("method", ["lora", "linear_probe"])
def test_lora_and_linear_probe_train_a_step_on_biomedclip_and_chexzero(run_config, tmp_path, method):
    biomedclip(tmp_path / "biomedclip")
    chexzero(tmp_path / "chexzero.pt")
    for name, weights in (("biomedclip", tmp_path / "biomedclip"), ("chexzero", tmp_path / "chexzero.pt")):
        train_one_step(catalogue_config(run_config, name, weights, method=method, **TINY[name]))


def test_the_entries_supply_their_authors_normalisation(run_config, tmp_path):
    biomed = catalogue_config(run_config, "biomedclip", tmp_path / "biomedclip")
    assert (biomed.data.mean, biomed.data.std) == (BIOMEDCLIP_CONFIG["preprocess_cfg"]["mean"],
                                                   BIOMEDCLIP_CONFIG["preprocess_cfg"]["std"])
    chex = catalogue_config(run_config, "chexzero", tmp_path / "chexzero.pt")
    # CheXzero normalises 0-255 pixels with mean 101.48761 and std 83.43944.
    assert chex.data.mean == pytest.approx([101.48761 / 255] * 3, abs=1e-4)
    assert chex.data.std == pytest.approx([83.43944 / 255] * 3, abs=1e-4)


@pytest.mark.parametrize("name, weights, lacking", [
    ("chexzero", "dinov2.pt", "visual.class_embedding"),
    ("biomedclip", "chexzero.pt", "visual.trunk.patch_embed.proj.weight"),
])
def test_a_checkpoint_of_another_layout_is_refused_naming_the_key(run_config, tmp_path, name, weights, lacking):
    torch.save(timm.create_model("vit_small_patch14_dinov2", depth=1, img_size=28).state_dict(), tmp_path / "dinov2.pt")
    chexzero(tmp_path / "chexzero.pt")
    layout = CATALOGUE[name].layouts[0]
    config = catalogue_config(run_config, name, tmp_path / weights, **TINY[name])
    with pytest.raises(CheckpointError, match=rf"{weights}: not in the expected layout {layout} .* no key '{lacking}'"):
        create_backbone(config.model, num_classes=2)


def converted_shapes(name: str, published: dict) -> tuple[dict, dict]:
    """(the published state_dict after medpeft's layout and timm's filter, the entry's timm model), as
    {key: shape} without the classifier; everything on the meta device."""
    entry = CATALOGUE[name]
    layout = LAYOUTS[entry.layouts[0]]
    assert layout.prefix_in(published) == ""
    vision, dropped = layout.convert(published)
    assert dropped and not any(k.startswith("visual.") for k in dropped)
    with torch.device("meta"):
        model = timm.create_model(entry.architecture, num_classes=2, **entry.kwargs)
        converted = checkpoint_filter_fn(vision, model)
    shapes = [{k: tuple(v.shape) for k, v in sd.items() if not k.startswith("head.")}
              for sd in (converted, model.state_dict())]
    return shapes[0], shapes[1]


def test_full_size_chexzero_converts_onto_exactly_timms_keys_and_shapes():
    """OpenAI's ViT-B/32 (open_clip's ViT-B-32-quickgelu config, OpenAI's key names and shapes) on meta."""
    config = open_clip.get_model_config("ViT-B-32-quickgelu")
    with torch.device("meta"):
        published = open_clip.CLIP(**config).state_dict()
    assert set(published) == openai_clip_keys(vision_layers=12, text_layers=12)
    assert {k: tuple(published[k].shape) for k in ("visual.conv1.weight", "visual.positional_embedding",
                                                   "visual.proj", "text_projection")} == {
        "visual.conv1.weight": (768, 3, 32, 32), "visual.positional_embedding": (50, 768),
        "visual.proj": (768, 512), "text_projection": (512, 512)}
    converted, expected = converted_shapes("chexzero", published)
    assert converted == expected


def test_full_size_biomedclip_converts_onto_exactly_timms_keys_and_shapes():
    """BiomedCLIP's image tower as open_clip builds it from the published vision_cfg, on meta (the text
    tower, PubMedBERT, would need its config from the hub: a stand-in key keeps its place)."""
    model_cfg = BIOMEDCLIP_CONFIG["model_cfg"]
    vision_cfg = model_cfg["vision_cfg"]
    with torch.device("meta"):
        visual = open_clip.timm_model.TimmModel(vision_cfg["timm_model_name"], model_cfg["embed_dim"],
                                                pool=vision_cfg["timm_pool"], proj=vision_cfg["timm_proj"])
        published = {f"visual.{k}": v for k, v in visual.state_dict().items()}
        published["text.transformer.embeddings.word_embeddings.weight"] = torch.empty(30522, 768)
    assert tuple(published["visual.trunk.pos_embed"].shape) == (1, 197, 768)
    assert tuple(published["visual.head.proj.weight"].shape) == (512, 768)
    converted, expected = converted_shapes("biomedclip", published)
    assert converted == expected
