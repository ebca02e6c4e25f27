"""Linear probe: the backbone stays frozen, only the classification head is trained."""

from dataclasses import dataclass

from torch import nn

from medpeft.config import MethodConfig
from medpeft.methods.registry import MethodSpec, freeze_all_but_head, own_weights, register_method


@dataclass
class LinearProbeConfig(MethodConfig):
    families = ("vit", "cnn")
    lr_range = (1e-4, 1e-1)


def apply(model: nn.Module, config: LinearProbeConfig) -> nn.Module:
    return freeze_all_but_head(model)


register_method(MethodSpec(
    name="linear_probe", config_cls=LinearProbeConfig, apply=apply, merge=own_weights,
    description="Linear probe: frozen backbone, trained classification head."))
