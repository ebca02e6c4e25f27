"""Frozen-prefix feature caching: compute what a method leaves untouched once per image, train the rest.

Applies (``train.frozen_prefix_cache: true``) when augmentation is off, so an image always gives the
same input, and the method trains nothing before some point of the model:
- only the classifier trains (linear probe; any timm model): the cache holds the pre-logits features
  (pooled, a few KB per image) and each step runs the head alone;
- a ViT whose first k blocks and embedding are frozen and unhooked (``partial``, adapters on the last
  blocks): the cache holds the tokens after block k and each step runs blocks k.. onwards.
The prefix runs once, in eval mode (running BatchNorm statistics, no drop-path or dropout), and the
cache lives in memory: tokens cost ``tokens x width x 4`` bytes per image (ViT-S/16
at 224: 0.3 MB). Any other method (LoRA on every block, VPT, full fine-tuning) has no frozen prefix.
"""

from __future__ import annotations

import torch
from torch import nn

from medpeft.errors import ConfigError
from medpeft.methods import unwrap

HEAD = -1
"""``frozen_prefix``'s answer when everything but the classifier is frozen."""


def _hooked(module: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def frozen_prefix(model: nn.Module) -> int:
    """HEAD if only the classifier trains, else the number k > 0 of leading ViT blocks that the method
    leaves untouched (frozen, no hooks) with a frozen embedding; ConfigError if there is none."""
    net = unwrap(model)
    classifier = net.get_classifier()
    trained = {id(p) for p in net.parameters() if p.requires_grad}
    if trained and trained <= {id(p) for p in classifier.parameters()} and not _hooked(net):
        return HEAD
    blocks = getattr(net, "blocks", None)
    if isinstance(blocks, nn.Sequential) and hasattr(net, "_pos_embed"):
        inside = {id(p) for block in blocks for p in block.parameters()}
        stem = [p for p in net.parameters() if id(p) not in inside and p.requires_grad]
        late = {id(p) for part in (net.norm, getattr(net, "fc_norm", nn.Identity()), classifier)
                for p in part.parameters()}
        k = next((i for i, block in enumerate(blocks) if _trainable(block) or _hooked(block)), len(blocks))
        if k > 0 and all(id(p) in late for p in stem) and not _hooked(net.patch_embed):
            return k
    raise ConfigError("train.frozen_prefix_cache: this method trains the model from its first block on "
                      "(only a linear probe or a ViT with frozen leading blocks has a frozen prefix)")


@torch.no_grad()
def prefix(model: nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    """The cached input of the trainable rest for images `x` (the model in eval mode)."""
    net = unwrap(model)
    if k == HEAD:
        return net.forward_head(net.forward_features(x), pre_logits=True)
    x = net.norm_pre(net.patch_drop(net._pos_embed(net.patch_embed(x))))
    return net.blocks[:k](x)


class Suffix(nn.Module):
    """The model from the end of its frozen prefix on: features -> logits (shares the model's parameters)."""

    def __init__(self, model: nn.Module, k: int):
        super().__init__()
        self.model, self.k = model, k

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        net = unwrap(self.model)
        if self.k == HEAD:
            return net.get_classifier()(features)
        return net.forward_head(net.norm(net.blocks[self.k:](features)))
