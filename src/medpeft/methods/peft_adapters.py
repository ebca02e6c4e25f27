"""Thin wrappers over HF peft's other adapter types, on the same targets as LoRA (medpeft.methods._peft):
LoHa, LoKr, IA3, VeRA, OFT, BOFT and FourierFT. Each is a typed config and the peft config it makes;
injection, the head, saving in peft's format and merging are shared."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import peft
from torch import nn

from medpeft.config import option
from medpeft.errors import ConfigError
from medpeft.methods import _peft
from medpeft.methods.registry import MethodSpec, register_method


@dataclass
class LoHaConfig(_peft.PeftConfig):
    search_space = {"method.r": ("categorical", [4, 8, 16]), "method.alpha": ("int", 4, 64, True)}
    r: int = option(8, "Rank of each Hadamard factor.", gt=0)
    alpha: int = option(16, "Scaling numerator (alpha / r).", gt=0)
    targets: list[str] = _peft.targets_option(["qkv"])

    def peft_config(self) -> peft.LoHaConfig:
        return peft.LoHaConfig(r=self.r, alpha=self.alpha)


@dataclass
class LoKrConfig(_peft.PeftConfig):
    search_space = {"method.r": ("categorical", [4, 8, 16]), "method.alpha": ("int", 4, 64, True)}
    r: int = option(8, "Rank of the Kronecker factor.", gt=0)
    alpha: int = option(16, "Scaling numerator (alpha / r).", gt=0)
    targets: list[str] = _peft.targets_option(["qkv"])

    def peft_config(self) -> peft.LoKrConfig:
        return peft.LoKrConfig(r=self.r, alpha=self.alpha)


@dataclass
class IA3Config(_peft.PeftConfig):
    targets: list[str] = _peft.targets_option(["qkv", "fc2"])
    feedforward: list[str] = option(["fc2"], "Targets whose input (not output) is scaled, as IA3 does for the "
                                    "MLP's second layer; a subset of targets.")

    def validate(self) -> None:
        super().validate()
        outside = [t for t in self.feedforward if t not in self.targets]
        if outside:
            raise ConfigError(f"method.feedforward {self.feedforward}: {outside[0]!r} is not one of method.targets "
                              f"{self.targets}")

    def peft_config(self) -> peft.IA3Config:
        return peft.IA3Config(feedforward_modules=_peft.target_regex(self.feedforward))


@dataclass
class VeraConfig(_peft.PeftConfig):
    r: int = option(256, "Rank of the shared frozen random projections; only the scaling vectors train.", gt=0)
    targets: list[str] = _peft.targets_option(["qkv"])

    def peft_config(self) -> peft.VeraConfig:
        return peft.VeraConfig(r=self.r)


@dataclass
class OFTConfig(_peft.PeftConfig):
    block_size: int = option(32, "Size of the orthogonal blocks; must divide the targets' input width.", gt=0)
    targets: list[str] = _peft.targets_option(["qkv"])

    def peft_config(self) -> peft.OFTConfig:
        return peft.OFTConfig(r=0, oft_block_size=self.block_size)


@dataclass
class BOFTConfig(_peft.PeftConfig):
    block_size: int = option(4, "Size of the butterfly blocks.", gt=0)
    butterfly_factor: int = option(1, "Butterfly factors (1: block-diagonal, as OFT; more need peft's CUDA extension).", gt=0)
    targets: list[str] = _peft.targets_option(["qkv"])

    def peft_config(self) -> peft.BOFTConfig:
        return peft.BOFTConfig(boft_block_size=self.block_size, boft_n_butterfly_factor=self.butterfly_factor)


def _apply_boft(model: nn.Module, config: BOFTConfig) -> peft.PeftModel:
    """peft's BOFT tries to build its CUDA extension for every layer and, where it cannot (no CUDA, no
    ninja), warns and trains with one butterfly factor whatever was asked: with ``butterfly_factor: 1`` the
    extension is not needed and its warnings are dropped; a larger factor without it is refused."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)  # "No CUDA runtime is found" while peft tries to build the extension
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Failed to load the CUDA extension")
            warnings.filterwarnings("ignore", "Setting boft_n_butterfly_factor to 1")
            wrapped = _peft.apply(model, config)
    finally:
        log.setLevel(level)
    built = all(m.fbd_cuda_available for m in wrapped.modules() if hasattr(m, "fbd_cuda_available"))
    if config.butterfly_factor > 1 and not built:
        raise ConfigError(f"method.butterfly_factor {config.butterfly_factor}: peft's BOFT trains more than one "
                          f"butterfly factor only with its CUDA extension, which could not be built here (it needs "
                          f"CUDA and ninja); use butterfly_factor: 1")
    return wrapped


@dataclass
class FourierFTConfig(_peft.PeftConfig):
    n_frequency: int = option(1000, "Trained spectral coefficients per layer.", gt=0)
    scaling: float = option(150.0, "Scale of the spectral update.", gt=0)
    targets: list[str] = _peft.targets_option(["qkv"])

    def peft_config(self) -> peft.FourierFTConfig:
        return peft.FourierFTConfig(n_frequency=self.n_frequency, scaling=self.scaling)


for name, config_cls, description, reference in (
    ("loha", LoHaConfig, "LoHa: low-rank Hadamard-product updates (HF peft).", "Hyeon-Woo et al. 2022, arXiv 2108.06098"),
    ("lokr", LoKrConfig, "LoKr: low-rank Kronecker-product updates (HF peft).", "Yeh et al. 2024, arXiv 2309.14859"),
    ("ia3", IA3Config, "IA3: learned rescaling of attention projections and MLP activations (HF peft).",
     "Liu et al. 2022, arXiv 2205.05638"),
    ("vera", VeraConfig, "VeRA: shared frozen random low-rank projections with trained scaling vectors (HF peft).",
     "Kopiczko et al. 2024, arXiv 2310.11454"),
    ("oft", OFTConfig, "OFT: block-diagonal orthogonal rotation of the weights (HF peft).",
     "Qiu et al. 2023, arXiv 2306.07280"),
    ("boft", BOFTConfig, "BOFT: butterfly-factorised orthogonal fine-tuning (HF peft).",
     "Liu et al. 2024, arXiv 2311.06243"),
    ("fourierft", FourierFTConfig, "FourierFT: sparse trained spectral coefficients of the weight update (HF peft).",
     "Gao et al. 2024, arXiv 2405.03003"),
):
    register_method(MethodSpec(name=name, config_cls=config_cls, description=description, reference=reference,
                               **{**_peft.SHARED, **({"apply": _apply_boft} if name == "boft" else {})}))
