"""Linear probe: the backbone stays frozen, only the classification head is trained.

With ``norm: true`` the head reads the pooled features through a BatchNorm without affine parameters
(He et al. 2022, MAE, appendix A.2: self-supervised features differ in scale by orders of magnitude, and
a probe on them needs them standardised). It has no trained parameters; its running mean and variance
are saved with the run, and merging folds it into the head: W' = W / sqrt(var + eps),
b' = b - W' mean, so the merged model is the plain timm model again.
"""

from dataclasses import dataclass

import torch
from torch import nn

from medpeft.config import MethodConfig, option
from medpeft.errors import ConfigError
from medpeft.methods.registry import MethodSpec, freeze_all_but_head, register_method


@dataclass
class LinearProbeConfig(MethodConfig):
    families = ("vit", "cnn")
    lr_range = (1e-4, 1e-1)
    norm: bool = option(False, "Standardise the pooled features with a BatchNorm without affine parameters "
                        "before the head (the MAE linear-probe protocol).")

    def check_model(self, model) -> None:
        super().check_model(model)
        if self.norm and model.head_init == "text":
            raise ConfigError("method.norm: true would rescale the features model.head_init 'text' was made "
                              "for: set method.norm: false")


def _classifier_name(model: nn.Module) -> str:
    """The dotted name of the timm model's classifier module (``head``, ``fc``, ``head.fc``, ...)."""
    classifier = model.get_classifier()
    return next(name for name, module in model.named_modules() if module is classifier)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


class NormedHead(nn.Sequential):
    """BatchNorm1d (no affine) then the linear classifier; ``weight`` and ``in_features`` as timm's helpers
    read them from a classifier."""

    def __init__(self, linear: nn.Linear):
        super().__init__(nn.BatchNorm1d(linear.in_features, affine=False), linear)
        self.in_features, self.out_features = linear.in_features, linear.out_features


def apply(model: nn.Module, config: LinearProbeConfig) -> nn.Module:
    if config.norm:
        name = _classifier_name(model)
        head = model.get_submodule(name)
        if not isinstance(head, nn.Linear):
            raise ConfigError(f"method.norm: true needs a linear classifier, {type(model).__name__}.{name} is a "
                              f"{type(head).__name__}")
        _set(model, name, NormedHead(head))
    return freeze_all_but_head(model)


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold the feature BatchNorm (if any) into the head: the plain timm model, same outputs in eval mode."""
    head = model.get_classifier()
    if isinstance(head, NormedHead):
        norm, linear = head
        scale = (norm.running_var + norm.eps).rsqrt()
        linear.weight.mul_(scale)
        linear.bias.sub_(linear.weight @ norm.running_mean)
        _set(model, _classifier_name(model), linear)
    return model


register_method(MethodSpec(
    name="linear_probe", config_cls=LinearProbeConfig, apply=apply, merge=merge,
    description="Linear probe: frozen backbone, trained classification head (optionally on standardised "
                "features)."))
