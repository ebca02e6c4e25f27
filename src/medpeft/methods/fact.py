"""FacT-TT (Jie & Deng 2023): the weight updates of every attention projection (q, k, v, output) of
every block, as one tensor-train factorised tensor: delta W[l, p] = scale * V @ C[l, p] @ U with U
(r, D) and V (D, r) shared by all layers and a small core C[l, p] (r, r) per layer and projection.
V starts at zero, so training starts from the pretrained function; the update merges exactly."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from medpeft.config import MethodConfig, option
from medpeft.errors import ConfigError
from medpeft.methods.registry import MethodSpec, freeze_all_but_head, register_method

_PROJECTIONS = 4  # q, k, v (slices of the fused qkv) and the output projection


@dataclass
class FacTConfig(MethodConfig):
    search_space = {"method.r": ("categorical", [8, 16, 32]), "method.scale": ("float", 0.1, 10.0, True)}
    r: int = option(16, "Tensor-train rank.", gt=0)
    scale: float = option(1.0, "Multiplier of the update.")


def _update(model: nn.Module, layer: int, position: int, x: torch.Tensor) -> torch.Tensor:
    """scale * x @ (V C U)^T computed as three small matmuls: x (..., D) -> (..., D)."""
    core = model.fact_c[layer, position]
    return model.fact_scale * ((x @ model.fact_u.T) @ core.T) @ model.fact_v.T


def _qkv_hook(model, layer, module, args, output):
    x = args[0]
    return output + torch.cat([_update(model, layer, p, x) for p in range(3)], dim=-1)


def _proj_hook(model, layer, module, args, output):
    return output + _update(model, layer, 3, args[0])


def apply(model: nn.Module, config: FacTConfig) -> nn.Module:
    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(isinstance(b.attn.qkv, nn.Linear) for b in blocks):
        raise ConfigError("FacT-TT needs a timm ViT with fused attn.qkv linear layers")
    freeze_all_but_head(model)
    dim, device = model.embed_dim, model.patch_embed.proj.weight.device
    if blocks[0].attn.qkv.out_features != 3 * dim:
        raise ConfigError("FacT-TT needs attention width == embed_dim")
    model.fact_u = nn.Parameter(nn.init.xavier_uniform_(torch.empty(config.r, dim, device=device)))
    model.fact_v = nn.Parameter(torch.zeros(dim, config.r, device=device))
    model.fact_c = nn.Parameter(torch.randn(len(blocks), _PROJECTIONS, config.r, config.r, device=device) * 0.02)
    model.fact_scale = config.scale
    model._fact_hooks = []
    for layer, block in enumerate(blocks):
        model._fact_hooks.append(block.attn.qkv.register_forward_hook(partial(_qkv_hook, model, layer)))
        model._fact_hooks.append(block.attn.proj.register_forward_hook(partial(_proj_hook, model, layer)))
    return model


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    for layer, block in enumerate(model.blocks):
        deltas = [model.fact_scale * model.fact_v @ model.fact_c[layer, p] @ model.fact_u for p in range(4)]
        block.attn.qkv.weight.add_(torch.cat(deltas[:3]))
        block.attn.proj.weight.add_(deltas[3])
    for hook in model._fact_hooks:
        hook.remove()
    del model.fact_u, model.fact_v, model.fact_c, model.fact_scale, model._fact_hooks
    return model


register_method(MethodSpec(
    name="fact_tt", config_cls=FacTConfig, apply=apply, merge=merge,
    description="FacT-TT: attention weight updates of all layers as one tensor-train factorised tensor.",
    reference="Jie & Deng 2023, arXiv 2212.03145"))
