"""Reusable pieces that reshape a timm ViT without changing what it computes, and the kernel of its
linear layers on the CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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


# torch's fp32 matmul on the CPU is MKL's sgemm; its oneDNN inner product (AVX-512 brgemm where the CPU has
# it) ran ViT-S's linear layers 2.1x faster and LoRA's rank-8 products 3x faster on an AMD EPYC with AVX-512
# (benchmarks/results/lora_costs.md). Private to torch, but what inductor's CPU backend calls.
ONEDNN_LINEAR = (getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available()
                 else None)
"""oneDNN's linear op (x W^T + b), or None where this torch has no oneDNN."""


def _onednn(x: torch.Tensor) -> bool:
    """Whether to take oneDNN's kernel: fp32 on the CPU outside autocast, and not while a graph is traced,
    compiled or exported (their graphs keep torch's portable linear: TorchScript, ONNX, inductor)."""
    return (ONEDNN_LINEAR is not None and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling() and not torch.compiler.is_exporting())


def _weight_operand(weight: torch.Tensor) -> torch.Tensor:
    """`weight` as oneDNN's linear reads it well: contiguous or a transposed view of a contiguous tensor
    (it ran a column slice 40x slower than its copy)."""
    return weight if weight.is_contiguous() or weight.t().is_contiguous() else weight.contiguous()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x weight^T + bias`` for a 2-D x (tokens x in): ``F.linear``, in fp32 on the CPU through oneDNN.
    `weight` (out x in) may be a transposed view; other strided views are copied first."""
    if not _onednn(x):
        return F.linear(x, weight, bias)
    return ONEDNN_LINEAR(x, _weight_operand(weight), bias, "none", [], "")


TOKEN_CHUNK = 1024
"""Tokens per oneDNN call in ``token_product`` of two wide operands (see there)."""


def token_product(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``p^T q``, the sum over the rows (tokens) of p (N x m) and q (N x n): a weight's gradient. Through
    oneDNN (see ``linear``), whose input must be row-major: the narrower of the two is transposed into a
    copy, the wider one read in place. When both are wide (a full weight's gradient), the sum runs over
    chunks of about TOKEN_CHUNK tokens, each added in the matmul's epilogue: one call over every token ran
    at 200 GFLOP/s, chunks at 250-290 (ViT-B's 768 x 3072 weights, 6,304 tokens)."""
    if not _onednn(p):
        return torch.mm(p.t(), q)
    swap = p.shape[1] > q.shape[1]
    narrow, wide = (q, p) if swap else (p, q)
    chunks = max(1, round(len(p) / TOKEN_CHUNK)) if narrow.shape[1] >= 64 else 1
    out = None
    for rows, weight in zip(narrow.tensor_split(chunks), wide.tensor_split(chunks)):
        rows, weight = rows.t().contiguous(), _weight_operand(weight.t())
        out = linear(rows, weight) if out is None else ONEDNN_LINEAR.binary(rows, out, weight, None, "add")
    return out.t() if swap else out


class _Linear(torch.autograd.Function):
    """``linear`` of a 2-D x with its backward through ``linear`` and ``token_product``."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        return linear(x, weight, bias)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = linear(gy, weight.t()) if need_x else None
        grad_w = token_product(gy, x) if need_w else None
        return grad_x, grad_w, gy.sum(0) if need_b else None  # need_b is False for no bias


class OneDNNLinear(nn.Linear):
    """An ``nn.Linear`` whose fp32 CPU forward and backward run oneDNN's inner product (see ``linear``);
    elsewhere (GPU, autocast, other dtypes, traced graphs) it is ``nn.Linear``. Same parameters and
    state-dict names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _onednn(x):
            return super().forward(x)
        # 2-D inside the function: its output is then no view of a tensor made inside (which peft's
        # AdaLoRA, adding into it in place, would be refused)
        out = _Linear.apply(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        return out.view(*x.shape[:-1], self.out_features)


def use_onednn_linear(model: nn.Module) -> int:
    """Make every plain ``nn.Linear`` of `model` a ``OneDNNLinear``, in place (a no-op where torch has no
    oneDNN); returns how many."""
    if ONEDNN_LINEAR is None:
        return 0
    converted = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
            converted += 1
    return converted
