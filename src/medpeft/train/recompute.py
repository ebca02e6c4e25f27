"""Activation recomputation for ViT blocks: trade a little compute for much less activation memory.

``train.recompute``:
- ``none``: autograd keeps every activation backward needs.
- ``selective``: each block keeps the outputs of its matmuls and attention (the costly ops) and
  recomputes the cheap ones in backward: layer norms, GELU, residual adds, drop-path and dropout
  (with the same random masks). A ViT block then keeps about 11 of its 16 token-sized activations.
- ``blocks``: each block keeps only its input and recomputes its whole forward in backward (classic
  gradient checkpointing: least memory, about one more forward of compute).

Both are ``torch.utils.checkpoint`` (non-reentrant; ``selective`` with an op-level policy), applied to
each of ``model.blocks`` in place: module names, weights and saved files do not change.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from medpeft.errors import ConfigError
from medpeft.methods import unwrap

_aten = torch.ops.aten
# Kept by `selective`: the matmuls (also those of LoRA's lean layers, whose in-place update of the base
# output is kept with it) and attention.
_SAVED = [_aten.mm.default, _aten.addmm.default, _aten.addmm_.default, _aten.bmm.default,
          _aten._scaled_dot_product_flash_attention_for_cpu.default,
          _aten._scaled_dot_product_flash_attention.default, _aten._scaled_dot_product_efficient_attention.default,
          _aten._scaled_dot_product_cudnn_attention.default]


def apply_recompute(model: nn.Module, mode: str) -> None:
    """Make every block of the (possibly PEFT-wrapped) timm ViT `model` recompute as `mode` says."""
    if mode == "none":
        return
    blocks = getattr(unwrap(model), "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        raise ConfigError(f"train.recompute '{mode}' needs a ViT with blocks; use 'none' for this model")
    context = partial(create_selective_checkpoint_contexts, _SAVED, allow_cache_entry_mutation=True) \
        if mode == "selective" else None
    for block in blocks:
        block.forward = partial(_checkpointed, block.forward, context)


def _checkpointed(forward, context, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    extra = {"context_fn": context} if context is not None else {}
    return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)
