"""SV-Diff (Han et al. 2023, arXiv 2303.11305): spectral shifts. Each weight matrix W = U diag(s) Vᵀ (a
convolution kernel (out, in, kh, kw) read as (out, in·kh·kw)) is replaced by U diag(ReLU(s + δ)) Vᵀ with
a trained shift δ per singular value. Written as W + U diag(ReLU(s + δ) - s) Vᵀ, so δ = 0 (its
initialisation) gives W exactly. The factors are recomputed from the base weights when an adapter is
loaded (not saved); merging writes the shifted weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from medpeft.generate.methods.registry import GENERATIVE_METHODS, GenerativeMethodConfig


class SpectralShift(nn.Module):
    """The parametrization of one weight: W -> W + U diag(ReLU(s + δ) - s) Vᵀ, reshaped to W's shape."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        u, s, vh = torch.linalg.svd(weight.detach().flatten(1).float(), full_matrices=False)
        self.register_buffer("u", u.to(weight.dtype), persistent=False)
        self.register_buffer("s", s.to(weight.dtype), persistent=False)
        self.register_buffer("vh", vh.to(weight.dtype), persistent=False)
        self.delta = nn.Parameter(torch.zeros_like(self.s))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        change = (self.u * (torch.relu(self.s + self.delta) - self.s)) @ self.vh
        return weight + change.reshape(weight.shape)


@GENERATIVE_METHODS.register("svdiff")
@dataclass
class SVDiffConfig(GenerativeMethodConfig):
    description = "SV-Diff: a trained shift of every singular value of every linear and convolution weight."
    reference = "Han et al. 2023, arXiv 2303.11305"

    def adapt(self, component: nn.Module) -> None:
        for module in list(component.modules()):
            if isinstance(module, (nn.Linear, nn.Conv2d)) and not parametrize.is_parametrized(module, "weight"):
                parametrize.register_parametrization(module, "weight", SpectralShift(module.weight))
                module.parametrizations.weight.original.requires_grad_(False)

    def merge(self, model) -> None:
        for component in model.modules().values():
            for module in list(component.modules()):
                if parametrize.is_parametrized(module, "weight"):
                    parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
