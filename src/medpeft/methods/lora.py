"""The LoRA family through HF peft, on chosen linear layers of a timm ViT: LoRA (Hu et al. 2021),
DoRA and rsLoRA. Weights are saved in peft's adapter format (``peft.PeftModel.from_pretrained``
loads them) with the classification head."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import peft
from torch import nn

from medpeft.errors import ConfigError
from medpeft.methods import _peft
from medpeft.methods.lean_lora import make_lean
from medpeft.methods.registry import MethodSpec, register_method

PEFT_WEIGHTS = _peft.PEFT_WEIGHTS


@dataclass
class LoraConfig:
    name: ClassVar[str] = "lora"
    r: int = 8
    """Rank of the update B @ A."""
    alpha: int = 16
    """Scaling numerator: the update is multiplied by alpha / r (rsLoRA: alpha / sqrt(r))."""
    dropout: float = 0.0
    targets: list = field(default_factory=lambda: ["qkv"])
    """ViT: any of qkv (fused, default), q, k, v (e.g. [q, v] as MED-PEFT), proj, fc1, fc2, mlp,
    all_linear. CNN: [convs] (every ungrouped convolution after the stem)."""
    def __post_init__(self):
        _peft.check_targets(self.targets)
        if self.r <= 0:
            raise ConfigError(f"method.r must be > 0, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"method.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class DoraConfig(LoraConfig):
    name: ClassVar[str] = "dora"


@dataclass
class RsLoraConfig(LoraConfig):
    name: ClassVar[str] = "rslora"


def apply(model: nn.Module, config: LoraConfig) -> nn.Module:
    model = _peft.inject(model, config.targets, peft.LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, bias="none",
        use_dora=config.name == "dora", use_rslora=config.name == "rslora"))
    if config.name != "dora":
        # One autograd function per adapted Linear (medpeft.methods.lean_lora): less memory than peft's
        # op-by-op forward, the same results and saved weights; peft's forward where dropout is active.
        make_lean(model)
    return model


_SHARED = dict(apply=apply, save=_peft.save, load=_peft.load, merge=_peft.merge)
register_method(MethodSpec(
    name="lora", config_cls=LoraConfig, **_SHARED, families=("vit", "cnn"),
    description="LoRA: trainable low-rank updates of chosen linear layers (HF peft).",
    reference="Hu et al. 2021, arXiv 2106.09685; Lian et al. 2024, arXiv 2401.12215"))
register_method(MethodSpec(
    name="dora", config_cls=DoraConfig, **_SHARED,
    description="DoRA: LoRA on the direction of each weight plus a trained magnitude vector (HF peft).",
    reference="Liu et al. 2024, arXiv 2402.09353"))
register_method(MethodSpec(
    name="rslora", config_cls=RsLoraConfig, **_SHARED,
    description="rsLoRA: LoRA scaled by alpha / sqrt(r), stable at high rank (HF peft).",
    reference="Kalajdzievski 2023, arXiv 2312.03732"))
