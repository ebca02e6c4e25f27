"""SigLIP as Hugging Face ``transformers`` publishes it (``SiglipModel``, vision and text towers, or
``SiglipVisionModel``: ``model.safetensors``, possibly sharded, + ``config.json``), e.g. google/medsiglip-448
and google/siglip-*; onto timm's ``vit_*_siglip_*`` (no class token, ``attn_pool`` MAP head).

The hub files hold the vision tower under ``vision_model.`` (beside ``text_model.*``, ``logit_scale`` and
``logit_bias``, which are left out); transformers 5 saves a ``SiglipVisionModel`` without that prefix. The
MAP head's ``nn.MultiheadAttention`` packs the query, key and value projections in ``in_proj_*`` rows: the
first third projects the probe (timm's ``attn_pool.q``), the rest the tokens (``attn_pool.kv``).
"""

from __future__ import annotations

from medpeft.backbones.layouts.base import Layout, fused_qkv, register, renamed

_BLOCK = r"encoder\.layers\.(\d+)\."
_RULES = [
    (r"embeddings\.patch_embedding\.(weight|bias)", r"patch_embed.proj.\1"),
    (_BLOCK + r"layer_norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (_BLOCK + r"self_attn\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (_BLOCK + r"mlp\.(fc1|fc2)\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"post_layernorm\.(weight|bias)", r"norm.\1"),
    (r"head\.probe", "attn_pool.latent"),
    (r"head\.attention\.out_proj\.(weight|bias)", r"attn_pool.proj.\1"),
    (r"head\.layernorm\.(weight|bias)", r"attn_pool.norm.\1"),
    (r"head\.mlp\.(fc1|fc2)\.(weight|bias)", r"attn_pool.mlp.\1.\2"),
]


def convert(state_dict: dict) -> tuple[dict, list[str]]:
    state_dict = dict(state_dict)
    # nn.Embedding rows (N, D) -> timm's (1, N, D); there is no class token
    state_dict["pos_embed"] = state_dict.pop("embeddings.position_embedding.weight")[None]
    for param in ("weight", "bias"):
        if f"head.attention.in_proj_{param}" not in state_dict:
            continue  # loading then names the attn_pool weight it lacks
        packed = state_dict.pop(f"head.attention.in_proj_{param}")
        width = packed.shape[0] // 3
        state_dict[f"attn_pool.q.{param}"], state_dict[f"attn_pool.kv.{param}"] = packed[:width], packed[width:]
    state_dict = fused_qkv(state_dict, "encoder.layers.{block}.self_attn.{name}.{param}",
                           ("q_proj", "k_proj", "v_proj"), "blocks.{block}.attn.qkv.{param}")
    return renamed(state_dict, _RULES)


register(Layout(
    name="hf-siglip",
    description="transformers SiglipModel / SiglipVisionModel (model.safetensors, config.json)",
    signature=("embeddings.patch_embedding.weight", "embeddings.position_embedding.weight",
               "head.attention.in_proj_weight"),
    prefixes=("", "vision_model."),
    files=("model.safetensors", "pytorch_model.bin"),
    convert=convert,
))
