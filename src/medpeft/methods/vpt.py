"""Visual Prompt Tuning (Jia et al. 2022): learned prompt tokens inserted after the class token,
at the first block only (shallow) or replaced at every block (deep), and removed before the final
norm so pooling sees the usual tokens. Prompts change the sequence: they do not merge."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from medpeft.config import MethodConfig, option
from medpeft.errors import ConfigError
from medpeft.methods.registry import MethodSpec, freeze_all_but_head, register_method


@dataclass
class VPTShallowConfig(MethodConfig):
    search_space = {"method.tokens": ("categorical", [5, 10, 20, 50])}
    deep: ClassVar[bool] = False
    """Fresh prompts at every block (VPT-deep) instead of the first only."""
    tokens: int = option(50, "Prompt tokens (per block for VPT-deep).", gt=0)


@dataclass
class VPTDeepConfig(VPTShallowConfig):
    deep = True
    tokens: int = option(10, "Prompt tokens (per block for VPT-deep).", gt=0)


def apply(model: nn.Module, config: VPTShallowConfig) -> nn.Module:
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ConfigError("VPT needs a transformer backbone with .blocks (a timm ViT)")
    freeze_all_but_head(model)
    layers = len(blocks) if config.deep else 1
    prompts = torch.empty(layers, config.tokens, model.embed_dim, device=model.patch_embed.proj.weight.device)
    bound = math.sqrt(6.0 / (config.tokens + model.embed_dim))  # Xavier uniform, as in VPT
    model.vpt_prompts = nn.Parameter(nn.init.uniform_(prompts, -bound, bound))
    prefix, count = model.num_prefix_tokens, config.tokens
    for block in blocks:  # rotary attention (Eva: DINOv3, EVA-02) rotates the tokens after its prefix only
        if hasattr(getattr(block, "attn", None), "num_prefix_tokens"):
            block.attn.num_prefix_tokens = prefix + count  # the prompts sit in the prefix, unrotated

    def insert(block_index):
        def hook(block, args):
            x = args[0]
            prompt = model.vpt_prompts[block_index].expand(x.shape[0], -1, -1).to(x.dtype)
            rest = x[:, prefix:] if block_index == 0 else x[:, prefix + count:]
            return (torch.cat([x[:, :prefix], prompt, rest], dim=1), *args[1:])
        return hook

    for i in range(layers):
        blocks[i].register_forward_pre_hook(insert(i))
    blocks[-1].register_forward_hook(
        lambda block, args, out: torch.cat([out[:, :prefix], out[:, prefix + count:]], dim=1))
    return model


register_method(MethodSpec(
    name="vpt_shallow", config_cls=VPTShallowConfig, apply=apply,
    description="VPT-shallow: learned prompt tokens prepended at the first block.",
    reference="Jia et al. 2022, arXiv 2203.12119"))
register_method(MethodSpec(
    name="vpt_deep", config_cls=VPTDeepConfig, apply=apply,
    description="VPT-deep: fresh learned prompt tokens at every block.",
    reference="Jia et al. 2022, arXiv 2203.12119"))
