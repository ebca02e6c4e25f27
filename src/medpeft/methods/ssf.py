"""SSF (Lian et al. 2022): a trained per-channel scale and shift after every linear layer and
LayerNorm of the transformer blocks and the final norm. Initialised to the identity (scale 1,
shift 0), so training starts from the pretrained function; merges exactly into those layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from medpeft.methods.registry import MethodSpec, freeze, register_method


@dataclass
class SSFConfig:
    name: ClassVar[str] = "ssf"


def _ssf(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return output * module.ssf_scale + module.ssf_shift


def _targets(model: nn.Module):
    for name, module in model.named_modules():
        inside = name.startswith("blocks.") or name in ("norm", "fc_norm")
        if inside and isinstance(module, (nn.Linear, nn.LayerNorm)):
            yield module


def apply(model: nn.Module, config: SSFConfig) -> nn.Module:
    freeze(model)
    for module in _targets(model):
        channels = module.out_features if isinstance(module, nn.Linear) else module.normalized_shape[0]
        weight = module.weight
        module.ssf_scale = nn.Parameter(torch.ones(channels, device=weight.device, dtype=weight.dtype))
        module.ssf_shift = nn.Parameter(torch.zeros(channels, device=weight.device, dtype=weight.dtype))
        module._ssf_hook = module.register_forward_hook(_ssf)
    model.get_classifier().requires_grad_(True)
    return model


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold scale and shift into the layer: W' = diag(s) W, b' = s * b + t (LayerNorm: w' = s * w)."""
    for module in list(model.modules()):
        if not hasattr(module, "_ssf_hook"):
            continue
        scale, shift = module.ssf_scale, module.ssf_shift
        if isinstance(module, nn.Linear):
            module.weight.mul_(scale[:, None])
        else:
            module.weight.mul_(scale)
        if module.bias is None:  # a bias-free layer needs one to hold the shift
            module.bias = nn.Parameter(torch.zeros_like(shift))
        module.bias.mul_(scale).add_(shift)
        module._ssf_hook.remove()
        del module.ssf_scale, module.ssf_shift, module._ssf_hook
    return model


register_method(MethodSpec(
    name="ssf", config_cls=SSFConfig, apply=apply, merge=merge,
    description="SSF: per-channel scale and shift after each linear layer and LayerNorm; merges exactly.",
    reference="Lian et al. 2022, arXiv 2210.08823"))
