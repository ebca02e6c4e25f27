"""Layouts that timm's own checkpoint filter converts: medpeft only has to recognise them."""

from __future__ import annotations

from medpeft.backbones.layouts.base import Layout, register

register(Layout(
    name="timm",
    description="a timm model's state_dict (timm / Hugging Face hub 'timm/' repos, medpeft exports)",
    signature=("patch_embed.proj.weight",),
    prefixes=("", "module.", "model."),
    files=("model.safetensors", "pytorch_model.bin"),
))
register(Layout(
    name="mae",
    description="MAE / MRM / medical MAE pretraining checkpoint (a .pth with the encoder and decoder under 'model')",
    signature=("patch_embed.proj.weight", "decoder_embed.weight"),
    prefixes=("", "model."),
))
register(Layout(
    name="meta-dinov2",
    description="Meta's DINOv2 / torch hub (dinov2_vit*14[_reg4]_pretrain.pth: mask_token, register_tokens)",
    signature=("patch_embed.proj.weight", "mask_token"),
    files=("backbone_compatible.safetensors",),
))
