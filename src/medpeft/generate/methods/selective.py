"""Methods that tune a chosen subset of a component's own parameters (Dutt et al. 2024's set for Stable
Diffusion): everything, the attention projections, the biases, the normalisation layers, or norms +
biases + attention. They add nothing: the tuned model is already a plain model (merging is the identity)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from medpeft.generate.methods.registry import GENERATIVE_METHODS, GenerativeMethodConfig

# The attention projections: diffusers' Attention (to_q, to_k, to_v, to_out.0) and CLIP's (q_proj, ...).
ATTENTION = re.compile(r"(^|\.)(to_q|to_k|to_v|to_out\.0|q_proj|k_proj|v_proj|out_proj)\.(weight|bias)$")
NORMS = (nn.GroupNorm, nn.LayerNorm)


def norm_parameters(component: nn.Module) -> list[nn.Parameter]:
    """The affine parameters of every GroupNorm and LayerNorm of `component`."""
    return [p for module in component.modules() if isinstance(module, NORMS) for p in module.parameters()]


def select(component: nn.Module, attention: bool = False, bias: bool = False, norm: bool = False) -> None:
    """Make the chosen kinds of `component`'s parameters trainable."""
    for name, param in component.named_parameters():
        if (attention and ATTENTION.search(name)) or (bias and name.endswith(".bias")):
            param.requires_grad_(True)
    if norm:
        for param in norm_parameters(component):
            param.requires_grad_(True)


@GENERATIVE_METHODS.register("full")
@dataclass
class FullConfig(GenerativeMethodConfig):
    description = "Full fine-tuning: every parameter of the adapted components."
    reference = "Ho et al. 2020; Rombach et al. 2022"

    def adapt(self, component: nn.Module) -> None:
        component.requires_grad_(True)


@GENERATIVE_METHODS.register("attention")
@dataclass
class AttentionConfig(GenerativeMethodConfig):
    description = "Attention tuning: the query, key, value and output projections of every attention layer."
    reference = "Dutt et al. 2024 (MIDL), after Touvron et al. 2022"

    def adapt(self, component: nn.Module) -> None:
        select(component, attention=True)


@GENERATIVE_METHODS.register("bias")
@dataclass
class BiasConfig(GenerativeMethodConfig):
    description = "Bias tuning (BitFit): every bias term."
    reference = "Ben Zaken et al. 2022; Dutt et al. 2024 (MIDL)"

    def adapt(self, component: nn.Module) -> None:
        select(component, bias=True)


@GENERATIVE_METHODS.register("norm")
@dataclass
class NormConfig(GenerativeMethodConfig):
    description = "Norm tuning: the affine parameters of every GroupNorm and LayerNorm."
    reference = "Basu et al. 2023; Dutt et al. 2024 (MIDL)"

    def adapt(self, component: nn.Module) -> None:
        select(component, norm=True)


@GENERATIVE_METHODS.register("norm_bias_attention")
@dataclass
class NormBiasAttentionConfig(GenerativeMethodConfig):
    description = "Norms, biases and attention projections together."
    reference = "Dutt et al. 2024 (MIDL)"

    def adapt(self, component: nn.Module) -> None:
        select(component, attention=True, bias=True, norm=True)
