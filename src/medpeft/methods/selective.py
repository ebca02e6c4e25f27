"""Methods that train a chosen subset of the backbone's own parameters (plus the head): partial
fine-tuning of the last blocks, BitFit (biases), norm tuning. They add nothing, so the trained model
is already a plain backbone: merging is the identity."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from medpeft.config import MethodConfig, option
from medpeft.errors import ConfigError
from medpeft.methods.registry import MethodSpec, freeze_all_but_head, own_weights, register_method

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass
class PartialConfig(MethodConfig):
    lr_range = (1e-5, 1e-3)  # whole blocks train, as in full fine-tuning
    blocks: int = option(2, "Train the last `blocks` transformer blocks, the final norm and the head.", gt=0)


def apply_partial(model: nn.Module, config: PartialConfig) -> nn.Module:
    blocks = getattr(model, "blocks", None)
    if blocks is None or config.blocks > len(blocks):
        raise ConfigError(f"method.blocks {config.blocks}: the model has {len(blocks or [])} blocks")
    freeze_all_but_head(model)
    for block in list(blocks)[-config.blocks:]:
        block.requires_grad_(True)
    for name in ("norm", "fc_norm"):
        getattr(model, name).requires_grad_(True)
    return model


@dataclass
class BitFitConfig(MethodConfig):
    families = ("vit", "cnn")


def apply_bitfit(model: nn.Module, config: BitFitConfig) -> nn.Module:
    freeze_all_but_head(model)
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            param.requires_grad_(True)
    return model


@dataclass
class NormTuningConfig(MethodConfig):
    families = ("vit", "cnn")


def apply_norm(model: nn.Module, config: NormTuningConfig) -> nn.Module:
    """LayerNorm / BatchNorm / GroupNorm affine parameters (for a CNN this is BatchNorm tuning)."""
    freeze_all_but_head(model)
    for module in model.modules():
        if isinstance(module, _NORMS):
            module.requires_grad_(True)
    return model


register_method(MethodSpec(
    name="partial", config_cls=PartialConfig, apply=apply_partial, merge=own_weights,
    description="Partial fine-tuning: the last k blocks, the final norm and the head.",
    reference="Yosinski et al. 2014; He et al. 2022 (MAE partial fine-tuning)"))
register_method(MethodSpec(
    name="bitfit", config_cls=BitFitConfig, apply=apply_bitfit, merge=own_weights,
    description="BitFit: every bias term and the head.", reference="Ben Zaken et al. 2022, arXiv 2106.10199"))
register_method(MethodSpec(
    name="norm", config_cls=NormTuningConfig, apply=apply_norm, merge=own_weights,
    description="Norm tuning: the affine parameters of every normalisation layer and the head.",
    reference="Basu et al. 2023, arXiv 2302.02681 (LayerNorm tuning); Frankle et al. 2021 (BatchNorm)"))
