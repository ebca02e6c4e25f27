"""Bottleneck adapters in timm ViT blocks: Houlsby (after attention and after the MLP), Pfeiffer
(after the MLP only) and AdaptFormer (parallel to the MLP, scaled). The up-projection starts at zero,
so training starts from the pretrained function. They are non-linear: they do not merge."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from medpeft.config import MethodConfig, option
from medpeft.errors import ConfigError
from medpeft.methods.registry import MethodSpec, freeze_all_but_head, register_method


class Bottleneck(nn.Module):
    """x (..., dim) -> up(GELU(down(x))) (..., dim), up initialised to zero."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


@dataclass
class AdapterConfig(MethodConfig):
    search_space = {"method.hidden": ("categorical", [16, 32, 64, 128])}
    hidden: int = option(64, "Bottleneck width.", gt=0)
    placement: Literal["houlsby", "pfeiffer"] = option("houlsby", "'houlsby' (after attention and after the MLP) "
                                                       "or 'pfeiffer' (after the MLP only).")


@dataclass
class AdaptFormerConfig(MethodConfig):
    search_space = {"method.hidden": ("categorical", [16, 32, 64, 128]), "method.scale": ("float", 0.01, 1.0, True)}
    hidden: int = option(64, "Bottleneck width.", gt=0)
    scale: float = option(0.1, "Multiplier of the parallel branch.")


def _sequential(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return output + module.adapter(output)


def _parallel(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return output + module.adapter_scale * module.adapter(args[0])


def _blocks(model: nn.Module):
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ConfigError("adapters need a transformer backbone with .blocks (a timm ViT)")
    return blocks


def apply_adapter(model: nn.Module, config: AdapterConfig) -> nn.Module:
    freeze_all_but_head(model)
    for block in _blocks(model):
        sites = [block.attn, block.mlp] if config.placement == "houlsby" else [block.mlp]
        for site in sites:
            site.adapter = Bottleneck(model.embed_dim, config.hidden).to(model.patch_embed.proj.weight.device)
            site.register_forward_hook(_sequential)
    return model


def apply_adaptformer(model: nn.Module, config: AdaptFormerConfig) -> nn.Module:
    freeze_all_but_head(model)
    for block in _blocks(model):
        block.mlp.adapter = Bottleneck(model.embed_dim, config.hidden).to(model.patch_embed.proj.weight.device)
        block.mlp.adapter_scale = config.scale
        block.mlp.register_forward_hook(_parallel)
    return model


register_method(MethodSpec(
    name="adapter", config_cls=AdapterConfig, apply=apply_adapter,
    description="Bottleneck adapters after attention and MLP (Houlsby) or after the MLP (Pfeiffer).",
    reference="Houlsby et al. 2019, arXiv 1902.00751; Pfeiffer et al. 2021, arXiv 2005.00247"))
register_method(MethodSpec(
    name="adaptformer", config_cls=AdaptFormerConfig, apply=apply_adaptformer,
    description="AdaptFormer: a scaled bottleneck branch parallel to each MLP.",
    reference="Chen et al. 2022, arXiv 2205.13535"))
