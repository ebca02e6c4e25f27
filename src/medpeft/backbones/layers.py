"""Reusable pieces that reshape a timm ViT without changing what it computes."""

from __future__ import annotations

import torch
from torch import nn


def classifier_name(model: nn.Module) -> str:
    """The name of a timm model's classification head module ('head', 'fc', 'classifier', 'head.fc')."""
    return model.pretrained_cfg.get("classifier", "head")


class SplitQKV(nn.Module):
    """A fused ``qkv`` Linear as three Linears ``q``, ``k``, ``v`` whose outputs are concatenated.

    Lets a PEFT method target the query and value projections alone (as MED-PEFT does) with
    ordinary ``nn.Linear`` layers; ``fuse_qkv`` turns it back into one Linear, bit for bit. The three
    weights are views of the fused ones: splitting copies nothing, so runs that share a backbone in
    memory keep sharing it.
    """

    def __init__(self, qkv: nn.Linear):
        super().__init__()
        dim = qkv.out_features // 3
        for i, name in enumerate(("q", "k", "v")):
            # Views of the fused weights: no copy, no random init drawn.
            linear = nn.Linear(qkv.in_features, dim, bias=qkv.bias is not None, device="meta")
            rows = slice(i * dim, (i + 1) * dim)
            linear.weight = nn.Parameter(qkv.weight.detach()[rows], requires_grad=qkv.weight.requires_grad)
            if qkv.bias is not None:
                linear.bias = nn.Parameter(qkv.bias.detach()[rows], requires_grad=qkv.bias.requires_grad)
            setattr(self, name, linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)

    def _apply(self, fn, recurse=True):
        """``Module.to`` (device, dtype) converts q, k and v each on its own: make their weights and
        biases row blocks of one tensor again, so the fused weight stays a view (no copy per call)."""
        super()._apply(fn, recurse)
        bases = [getattr(c, "get_base_layer", lambda c=c: c)() for c in (self.q, self.k, self.v)]
        for name in ("weight", "bias"):
            params = [getattr(base, name) for base in bases]
            if params[0] is not None and row_blocks(params) is None:
                fused = torch.cat([p.data for p in params])
                for p, block in zip(params, fused.split([len(p) for p in params])):
                    p.data = block
        return self

    def fused(self) -> nn.Linear:
        q, k, v = self.q, self.k, self.v
        linear = nn.Linear(q.in_features, 3 * q.out_features, bias=q.bias is not None,
                           device=q.weight.device, dtype=q.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
            if q.bias is not None:
                linear.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
        return linear


def row_blocks(parts) -> torch.Tensor | None:
    """The row-wise concatenation of `parts` as a view, if they are adjacent row blocks of one tensor (as
    ``split_qkv`` leaves q, k, v); else None."""
    first, offset = parts[0], parts[0].storage_offset()
    for part in parts:
        if not (part.is_contiguous() and part.dtype == first.dtype and part.device == first.device
                and part.shape[1:] == first.shape[1:] and part.storage_offset() == offset
                and part.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()):
            return None
        offset += part.numel()
    return first.as_strided((sum(len(p) for p in parts), *first.shape[1:]), first.stride(), first.storage_offset())


def _attention_modules(model: nn.Module):
    for name, module in model.named_modules():
        if name.endswith(".attn") and hasattr(module, "qkv"):
            yield module


def split_qkv(model: nn.Module) -> nn.Module:
    """Replace every fused ``attn.qkv`` Linear by a SplitQKV, in place; returns the model."""
    for attn in _attention_modules(model):
        if isinstance(attn.qkv, nn.Linear):
            attn.qkv = SplitQKV(attn.qkv)
    return model


def fuse_qkv(model: nn.Module) -> nn.Module:
    """Undo ``split_qkv`` in place: the model gets back the backbone's exact module structure."""
    for attn in _attention_modules(model):
        if isinstance(attn.qkv, SplitQKV):
            attn.qkv = attn.qkv.fused()
    return model
