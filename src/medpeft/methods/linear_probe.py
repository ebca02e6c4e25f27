"""Linear probe: the backbone stays frozen, only the classification head is trained."""

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from medpeft.methods.registry import MethodSpec, freeze, own_weights, register_method


@dataclass
class LinearProbeConfig:
    name: ClassVar[str] = "linear_probe"


def apply(model: nn.Module, config: LinearProbeConfig) -> nn.Module:
    freeze(model)
    model.get_classifier().requires_grad_(True)
    return model


register_method(MethodSpec(
    name="linear_probe", config_cls=LinearProbeConfig, apply=apply, merge=own_weights,
    description="Linear probe: frozen backbone, trained classification head.", families=("vit", "cnn"),
))
