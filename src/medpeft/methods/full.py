"""Full fine-tuning: every parameter of the backbone and the head is trained."""

from dataclasses import dataclass

from torch import nn

from medpeft.config import MethodConfig
from medpeft.methods.registry import MethodSpec, own_weights, register_method


@dataclass
class FullConfig(MethodConfig):
    families = ("vit", "cnn")
    lr_range = (1e-5, 1e-3)
    search_space = {"train.layer_decay": ("categorical", [None, 0.9, 0.75, 0.65, 0.5])}  # None: off


def apply(model: nn.Module, config: FullConfig) -> nn.Module:
    return model.requires_grad_(True)


register_method(MethodSpec(
    name="full", config_cls=FullConfig, apply=apply, merge=own_weights,
    description="Full fine-tuning: all backbone and head parameters are trained."))
