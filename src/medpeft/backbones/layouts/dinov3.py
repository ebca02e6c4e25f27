"""DINOv3 ViTs as Meta publishes them (torch hub ``dinov3_vit*16_pretrain_*.pth``) and as Hugging Face
``transformers`` does (``DINOv3ViTModel``: ``model.safetensors`` + ``config.json``, e.g.
facebook/dinov3-vitb16-pretrain-lvd1689m); onto timm's ``vit_*_patch16_dinov3`` (an ``Eva`` with RoPE,
register tokens and layer scale).

Meta's keys are converted by timm's own Eva filter (``storage_tokens`` -> ``reg_token``, ``ls1.gamma``
-> ``gamma_1``, the fused ``qkv.bias`` split into ``q_bias`` / ``v_bias`` when the model has them, else
left out; the RoPE ``periods`` buffer, ``qkv.bias_mask`` and ``mask_token`` dropped: timm computes the
RoPE frequencies). Hugging Face's keys are mapped here: separate q/k/v projections fused into
``attn.qkv``, the query and value biases onto Eva's ``q_bias`` / ``v_bias`` (DINOv3 has no key bias;
Eva's is a fixed zero); a model built without them takes them only where they are zero.
"""

from __future__ import annotations

from medpeft.backbones.layouts.base import Layout, fused_qkv, register, renamed

_BLOCK = r"layer\.(\d+)\."
_RULES = [
    (r"embeddings\.mask_token", ""),  # masked-image pretraining only
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.register_tokens", "reg_token"),
    (r"embeddings\.patch_embeddings\.(weight|bias)", r"patch_embed.proj.\1"),
    (_BLOCK + r"(norm1|norm2)\.(weight|bias)", r"blocks.\1.\2.\3"),
    (_BLOCK + r"attention\.([qv])_proj\.bias", r"blocks.\1.attn.\2_bias"),
    (_BLOCK + r"attention\.o_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (_BLOCK + r"layer_scale([12])\.lambda1", r"blocks.\1.gamma_\2"),
    (_BLOCK + r"mlp\.up_proj\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (_BLOCK + r"mlp\.down_proj\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
]


def convert(state_dict: dict) -> tuple[dict, list[str]]:
    # transformers 5 keeps the blocks under 'model.' in memory; save_pretrained writes the published 'layer.N.'.
    state_dict = {key.removeprefix("model."): value for key, value in state_dict.items()}
    state_dict = fused_qkv(state_dict, "layer.{block}.attention.{name}.{param}", ("q_proj", "k_proj", "v_proj"),
                           "blocks.{block}.attn.qkv.{param}")
    return renamed(state_dict, _RULES)


register(Layout(
    name="hf-dinov3",
    description="transformers DINOv3ViTModel (model.safetensors, config.json)",
    signature=("embeddings.patch_embeddings.weight", "embeddings.register_tokens"),
    files=("model.safetensors", "pytorch_model.bin"),
    convert=convert,
))
register(Layout(
    name="meta-dinov3",
    description="Meta's DINOv3 / torch hub (dinov3_vit*16_pretrain_*.pth: storage_tokens, blocks.N.ls1.gamma)",
    signature=("patch_embed.proj.weight", "storage_tokens"),
))
