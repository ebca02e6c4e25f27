"""Activation recomputation for ViT blocks: trade a little compute for much less activation memory.

``train.recompute``:
- ``none``: autograd keeps every activation backward needs.
- ``selective``: each block keeps its input and the outputs of qkv, attention and fc2, and
  recomputes the rest in backward: layer norms, proj, the MLP's hidden layer (fc1 and GELU), residual
  adds, drop-path and dropout (with the same random masks). A ViT-S/B block then keeps 6 of its 16
  token-sized activations, for 5/12 of its forward matmul work (proj, fc1) once more: about 1/7 more
  than a full fine-tuning step. (Recomputing fc2 too would cost as much as fc1 and free one tensor.)
- ``blocks``: each block keeps only its input and recomputes its whole forward in backward (classic
  gradient checkpointing: least memory, about one more forward of compute).

Both are ``torch.utils.checkpoint`` (non-reentrant; ``selective`` with an op-level policy), applied to
each of ``model.blocks`` in place: module names, weights and saved files do not change.
"""

from __future__ import annotations

import functools
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from medpeft.accel.onednn import linear_op
from medpeft.errors import ConfigError
from medpeft.methods import unwrap

_keeping = [False]  # set while a block's qkv or fc2 runs (forward and its recomputation)


def _ops(*names: str) -> set:
    """The default overloads of the aten ops of these names that this torch has (some are private)."""
    return {getattr(torch.ops.aten, name).default for name in names if hasattr(torch.ops.aten, name)}


@functools.cache
def _kept_ops() -> tuple[set, set]:
    """(the matmuls of a linear layer, attention's ops): torch's, and oneDNN's linear where medpeft.accel uses it."""
    matmuls = _ops("mm", "addmm", "addmm_") | ({linear_op().default} if linear_op() is not None else set())
    # Attention: torch's fused kernels, or the batched matmuls (q k^T, attn v) of timm's path without them
    attention = _ops("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                     "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention", "bmm")
    return matmuls, attention


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep attention and the matmuls inside qkv and fc2 (also LoRA's, whose in-place update of the base
    output is kept with it; lean LoRA makes its weight-sized W + s B A with baddbmm, which is recomputed);
    recompute everything else."""
    matmuls, attention = _kept_ops()
    keep = op in attention or (_keeping[0] and op in matmuls)
    return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE


def apply_recompute(model: nn.Module, mode: str) -> None:
    """Make every block of the (possibly PEFT-wrapped) timm ViT `model` recompute as `mode` says."""
    if mode == "none":
        return
    blocks = getattr(unwrap(model), "blocks", None)
    if not isinstance(blocks, nn.Sequential) or not all(isinstance(getattr(b, "attn", None), nn.Module)
                                                          for b in blocks):
        raise ConfigError(f"train.recompute '{mode}' needs a ViT with blocks; use 'none' for this model")
    context = partial(create_selective_checkpoint_contexts, _policy, allow_cache_entry_mutation=True) \
        if mode == "selective" else None
    for block in blocks:
        block.forward = partial(_checkpointed, block.forward, context)
        if mode == "selective":
            for module in (getattr(block.attn, "qkv", None), getattr(getattr(block, "mlp", None), "fc2", None)):
                if module is not None:
                    module.forward = partial(_kept, module.forward)


def _kept(forward, *args, **kwargs):
    _keeping[0] = True
    try:
        return forward(*args, **kwargs)
    finally:
        _keeping[0] = False


def _checkpointed(forward, context, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    extra = {"context_fn": context} if context is not None else {}
    return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)
