"""DiffFit (Xie et al. 2023, arXiv 2304.06648): biases, norms and a trained scale factor γ on every residual
branch, initialised to 1 (so the untrained model is the base model). In a UNet the branches end in an
attention layer's output projection (``to_out.0``), a feed-forward's last linear layer (``ff.net.2``), a
spatial transformer's output projection (``proj_out``) and a ResNet block's second convolution
(``conv2``); in a CLIP text encoder, ``out_proj`` and ``mlp.fc2``. γ scales the branch's output, so
merging multiplies that layer's weight and bias by it."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from medpeft.generate.methods.registry import GENERATIVE_METHODS, GenerativeMethodConfig
from medpeft.generate.methods.selective import select

BRANCH_ENDS = re.compile(r"(^|\.)(to_out\.0|ff\.net\.2|proj_out|conv2|out_proj|mlp\.fc2)$")


def _scale(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return output * module.difffit_scale


@GENERATIVE_METHODS.register("difffit")
@dataclass
class DiffFitConfig(GenerativeMethodConfig):
    description = "DiffFit: biases, norms and a scale factor (init 1) on the output of every residual branch."
    reference = "Xie et al. 2023, arXiv 2304.06648"

    def adapt(self, component: nn.Module) -> None:
        select(component, bias=True, norm=True)
        for name, module in component.named_modules():
            if BRANCH_ENDS.search(name) and isinstance(module, (nn.Linear, nn.Conv2d)):
                module.difffit_scale = nn.Parameter(torch.ones((), dtype=module.weight.dtype,
                                                               device=module.weight.device))
                module._difffit_hook = module.register_forward_hook(_scale)

    @torch.no_grad()
    def merge(self, model) -> None:
        for component in model.modules().values():
            for module in component.modules():
                if hasattr(module, "_difffit_hook"):
                    module.weight.mul_(module.difffit_scale)
                    if module.bias is not None:
                        module.bias.mul_(module.difffit_scale)
                    module._difffit_hook.remove()
                    del module.difffit_scale, module._difffit_hook
