"""CLIP image towers in the vision-language checkpoints their authors publish: OpenAI CLIP
(``clip.model.CLIP`` state_dicts, e.g. CheXzero's ``.pt``) and open_clip models with a timm trunk (e.g.
BiomedCLIP's hub folder). timm's own filter converts the image tower; `vision_tower` only sets it apart
from the text tower, so that the load report lists what is left out."""

from __future__ import annotations

from medpeft.backbones.layouts.base import Layout, register


def vision_tower(state_dict: dict) -> tuple[dict, list[str]]:
    """The ``visual.*`` keys as published (timm's filter tells the layout by them), and the rest (text
    tower, logit scale) left out."""
    return ({k: v for k, v in state_dict.items() if k.startswith("visual.")},
            [k for k in state_dict if not k.startswith("visual.")])


register(Layout(
    name="openai-clip",
    description="OpenAI CLIP state_dict (clip.model.CLIP ViT: visual.class_embedding, "
                "visual.transformer.resblocks.N; a torch.save of model.state_dict())",
    signature=("visual.class_embedding", "visual.conv1.weight"),
    prefixes=("", "module."),
    convert=vision_tower,
))
register(Layout(
    name="open-clip-timm",
    description="open_clip model with a timm image trunk (open_clip_pytorch_model.bin + open_clip_config.json: "
                "visual.trunk.*, visual.head.proj)",
    signature=("visual.trunk.patch_embed.proj.weight",),
    prefixes=("", "module."),
    files=("open_clip_pytorch_model.bin", "open_clip_model.safetensors"),
    convert=vision_tower,
))
