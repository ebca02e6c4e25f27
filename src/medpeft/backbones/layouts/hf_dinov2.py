"""DINOv2 as Hugging Face ``transformers`` publishes it (``Dinov2Model`` / ``Dinov2WithRegistersModel``:
``model.safetensors`` + ``config.json``), e.g. RAD-DINO (microsoft/rad-dino) and facebook/dinov2-*; onto
timm's ``vit_*_patch14_dinov2`` / ``vit_*_patch14_reg4_dinov2``."""

from __future__ import annotations

from medpeft.backbones.layouts.base import Layout, fused_qkv, register, renamed

_BLOCK = r"encoder\.layer\.(\d+)\."
_RULES = [
    (r"embeddings\.mask_token", ""),  # masked-image pretraining only
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.register_tokens", "reg_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (_BLOCK + r"(norm1|norm2)\.(weight|bias)", r"blocks.\1.\2.\3"),
    (_BLOCK + r"attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (_BLOCK + r"attention\.o_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),  # transformers 5 in memory
    (_BLOCK + r"layer_scale([12])\.lambda1", r"blocks.\1.ls\2.gamma"),
    (_BLOCK + r"mlp\.(fc1|fc2)\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (_BLOCK + r"mlp\.weights_in\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),  # SwiGLU (ViT-g)
    (_BLOCK + r"mlp\.weights_out\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (_BLOCK + r"mlp\.down_proj\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),  # SwiGLU, transformers 5 in memory
    (r"layernorm\.(weight|bias)", r"norm.\1"),
]


def convert(state_dict: dict) -> tuple[dict, list[str]]:
    if "embeddings.register_tokens" in state_dict:
        # timm's register models keep the class token's position in the token itself (as timm's DINOv2 filter)
        state_dict = dict(state_dict)
        position = state_dict.pop("embeddings.position_embeddings")
        state_dict["embeddings.cls_token"] = state_dict["embeddings.cls_token"] + position[:, :1]
        state_dict["embeddings.position_embeddings"] = position[:, 1:]
    state_dict = fused_qkv(state_dict, "encoder.layer.{block}.attention.attention.{name}.{param}",
                           ("query", "key", "value"), "blocks.{block}.attn.qkv.{param}")
    state_dict = fused_qkv(state_dict, "encoder.layer.{block}.attention.{name}.{param}",
                           ("q_proj", "k_proj", "v_proj"), "blocks.{block}.attn.qkv.{param}")
    state_dict = fused_qkv(state_dict, "encoder.layer.{block}.mlp.{name}.{param}", ("gate_proj", "up_proj"),
                           "blocks.{block}.mlp.fc1.{param}")  # SwiGLU as timm packs it: silu(gate) * up
    return renamed(state_dict, _RULES)


register(Layout(
    name="hf-dinov2",
    description="transformers Dinov2Model / Dinov2WithRegistersModel (model.safetensors, config.json)",
    signature=("embeddings.patch_embeddings.projection.weight", "encoder.layer.0.norm1.weight"),
    prefixes=("", "dinov2.", "model."),
    files=("model.safetensors", "pytorch_model.bin"),
    convert=convert,
))
