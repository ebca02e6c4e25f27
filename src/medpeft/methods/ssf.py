"""SSF (Lian et al. 2022): a trained per-channel scale and shift after every linear layer and
LayerNorm of the transformer blocks and the final norm (CNNs: after every norm, and every convolution
or linear layer with a bias, but the classifier). Initialised to the identity (scale 1,
shift 0), so training starts from the pretrained function; merges exactly into those layers."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from medpeft.backbones import classifier_name
from medpeft.config import MethodConfig
from medpeft.methods.registry import MethodSpec, freeze_all_but_head, register_method


@dataclass
class SSFConfig(MethodConfig):
    families = ("vit", "cnn")


def _ssf(module: nn.Module, site: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    if module.ssf_channels_first:  # (B, C, H, W)
        return output * module.ssf_scale[:, None, None] + module.ssf_shift[:, None, None]
    return output * module.ssf_scale + module.ssf_shift


_CHANNELS_FIRST = (nn.Conv2d, nn.BatchNorm2d)


def _targets(model: nn.Module):
    """ViT: linear layers and LayerNorms of the blocks and the final norm. CNN: every normalisation
    layer, and every convolution and linear layer that has a bias, except the classifier (a bias-free
    convolution feeds a norm, whose SSF covers it; merging then never adds a parameter)."""
    vit = hasattr(model, "blocks") and hasattr(model, "patch_embed")
    head = classifier_name(model)
    for name, module in model.named_modules():
        if vit:
            inside = name.startswith("blocks.") or name in ("norm", "fc_norm")
            if inside and isinstance(module, (nn.Linear, nn.LayerNorm)):
                yield module
        elif name.startswith(head):
            continue
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)) and module.weight is not None:
            yield module
        elif isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
            yield module


def _channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.BatchNorm2d):
        return module.num_features
    return module.normalized_shape[0]


def apply(model: nn.Module, config: SSFConfig) -> nn.Module:
    freeze_all_but_head(model)
    for module in list(_targets(model)):
        channels = _channels(module)
        # timm's LayerNorm2d normalises (B, C, H, W) over C
        module.ssf_channels_first = isinstance(module, _CHANNELS_FIRST) or type(module).__name__ == "LayerNorm2d"
        weight = module.weight
        module.ssf_scale = nn.Parameter(torch.ones(channels, device=weight.device, dtype=weight.dtype))
        module.ssf_shift = nn.Parameter(torch.zeros(channels, device=weight.device, dtype=weight.dtype))
        # timm's norm+activation layers (BatchNormAct2d): scale the norm's output, before the activation
        site = module.drop if hasattr(module, "act") and hasattr(module, "drop") else module
        module._ssf_hook = site.register_forward_hook(partial(_ssf, module))
    return model


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold scale and shift into the layer: W' = diag(s) W, b' = s * b + t (LayerNorm: w' = s * w)."""
    for module in list(model.modules()):
        if not hasattr(module, "_ssf_hook"):
            continue
        scale, shift = module.ssf_scale, module.ssf_shift
        if isinstance(module, (nn.Linear, nn.Conv2d)):  # output channels are the weight's first axis
            module.weight.mul_(scale.view(-1, *[1] * (module.weight.dim() - 1)))
        else:
            module.weight.mul_(scale)
        if module.bias is None:  # a bias-free layer needs one to hold the shift
            module.bias = nn.Parameter(torch.zeros_like(shift))
        module.bias.mul_(scale).add_(shift)
        module._ssf_hook.remove()
        del module.ssf_scale, module.ssf_shift, module._ssf_hook, module.ssf_channels_first
    return model


register_method(MethodSpec(
    name="ssf", config_cls=SSFConfig, apply=apply, merge=merge,
    description="SSF: per-channel scale and shift after each linear layer and LayerNorm; merges exactly.",
    reference="Lian et al. 2022, arXiv 2210.08823"))
