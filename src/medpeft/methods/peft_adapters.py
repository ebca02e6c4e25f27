"""Thin wrappers over HF peft's other adapter types, on the same targets as LoRA (medpeft.methods._peft):
LoHa, LoKr, IA3, VeRA, OFT, BOFT and FourierFT. Each is a typed config and the peft config it builds;
injection, the head, saving in peft's format and merging are shared."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import peft
from torch import nn

from medpeft.methods import _peft
from medpeft.methods.registry import MethodSpec, register_method


def _qkv():
    return field(default_factory=lambda: ["qkv"])


@dataclass
class LoHaConfig:
    name: ClassVar[str] = "loha"
    r: int = 8
    alpha: int = 16
    targets: list = _qkv()


@dataclass
class LoKrConfig:
    name: ClassVar[str] = "lokr"
    r: int = 8
    alpha: int = 16
    targets: list = _qkv()


@dataclass
class IA3Config:
    name: ClassVar[str] = "ia3"
    targets: list = field(default_factory=lambda: ["qkv", "fc2"])
    feedforward: list = field(default_factory=lambda: ["fc2"])
    """Targets whose input (not output) is scaled, as IA3 does for the MLP's second layer."""


@dataclass
class VeraConfig:
    name: ClassVar[str] = "vera"
    r: int = 256
    """Rank of the shared frozen random projections; only the scaling vectors train."""
    targets: list = _qkv()


@dataclass
class OFTConfig:
    name: ClassVar[str] = "oft"
    block_size: int = 32
    """Size of the orthogonal blocks; must divide the targets' input width."""
    targets: list = _qkv()


@dataclass
class BOFTConfig:
    name: ClassVar[str] = "boft"
    block_size: int = 4
    butterfly_factor: int = 1
    targets: list = _qkv()


@dataclass
class FourierFTConfig:
    name: ClassVar[str] = "fourierft"
    n_frequency: int = 1000
    """Trained spectral coefficients per layer."""
    scaling: float = 150.0
    targets: list = _qkv()


def _peft_config(config) -> peft.PeftConfig:
    if config.name == "loha":
        return peft.LoHaConfig(r=config.r, alpha=config.alpha)
    if config.name == "lokr":
        return peft.LoKrConfig(r=config.r, alpha=config.alpha)
    if config.name == "ia3":
        return peft.IA3Config(feedforward_modules=_peft.target_regex(config.feedforward))
    if config.name == "vera":
        return peft.VeraConfig(r=config.r)
    if config.name == "oft":
        return peft.OFTConfig(r=0, oft_block_size=config.block_size)
    if config.name == "boft":
        return peft.BOFTConfig(boft_block_size=config.block_size, boft_n_butterfly_factor=config.butterfly_factor)
    return peft.FourierFTConfig(n_frequency=config.n_frequency, scaling=config.scaling)


def apply(model: nn.Module, config) -> nn.Module:
    _peft.check_targets(config.targets)
    return _peft.inject(model, config.targets, _peft_config(config))


_SHARED = dict(apply=apply, save=_peft.save, load=_peft.load, merge=_peft.merge)
for config_cls, description, reference in (
    (LoHaConfig, "LoHa: low-rank Hadamard-product updates (HF peft).", "Hyeon-Woo et al. 2022, arXiv 2108.06098"),
    (LoKrConfig, "LoKr: low-rank Kronecker-product updates (HF peft).", "Yeh et al. 2024, arXiv 2309.14859"),
    (IA3Config, "IA3: learned rescaling of attention projections and MLP activations (HF peft).",
     "Liu et al. 2022, arXiv 2205.05638"),
    (VeraConfig, "VeRA: shared frozen random low-rank projections with trained scaling vectors (HF peft).",
     "Kopiczko et al. 2024, arXiv 2310.11454"),
    (OFTConfig, "OFT: block-diagonal orthogonal rotation of the weights (HF peft).", "Qiu et al. 2023, arXiv 2306.07280"),
    (BOFTConfig, "BOFT: butterfly-factorised orthogonal fine-tuning (HF peft).", "Liu et al. 2024, arXiv 2311.06243"),
    (FourierFTConfig, "FourierFT: sparse trained spectral coefficients of the weight update (HF peft).",
     "Gao et al. 2024, arXiv 2405.03003"),
):
    register_method(MethodSpec(name=config_cls.name, config_cls=config_cls, description=description,
                               reference=reference, **_SHARED))
