"""fp32 linear layers on the CPU through oneDNN's inner product instead of torch's matmul (MKL's sgemm).

oneDNN's op is private to torch (``torch.ops.mkldnn._linear_pointwise``, the one inductor's CPU backend
calls): ``available()`` probes it once and everything here falls back to ``F.linear`` / ``torch.mm``
without it. Results equal the public path's to fp32 rounding; measured speeds are in
benchmarks/results/lora_costs*.md.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


def _op():
    """oneDNN's linear op (x W^T + b, with a ``binary`` overload that adds into another tensor), or None."""
    if not torch.backends.mkldnn.is_available():
        return None
    return getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


@functools.cache
def available() -> bool:
    """Whether this torch has oneDNN's linear op with both overloads used here, and they compute what
    ``F.linear`` does (probed once, on small tensors)."""
    op = _op()
    if op is None or not hasattr(op, "binary"):
        return False
    x, weight, bias = (torch.randn(*shape, generator=torch.Generator().manual_seed(0))
                       for shape in ((5, 8), (3, 8), (3,)))
    try:
        out = op(x, weight, bias, "none", [], "")
        added = op.binary(x, out, weight, None, "add")
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    expected = F.linear(x, weight, bias)
    return torch.allclose(out, expected, atol=1e-5) and torch.allclose(added, expected + x @ weight.t(), atol=1e-5)


available()  # probed at import, outside any dispatch mode that would count its ops


def linear_op():
    """oneDNN's linear op where ``available()``, else None (e.g. for a recomputation policy's op set)."""
    return _op() if available() else None


def _onednn(x: torch.Tensor) -> bool:
    """Whether to take oneDNN's kernel: fp32 on the CPU outside autocast, and not while a graph is traced,
    compiled or exported (their graphs keep torch's portable linear: TorchScript, ONNX, inductor)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling()
            and not torch.compiler.is_exporting() and available())


def _weight_operand(weight: torch.Tensor) -> torch.Tensor:
    """`weight` as oneDNN's linear reads it well: contiguous or a transposed view of a contiguous tensor
    (other strided views are copied)."""
    return weight if weight.is_contiguous() or weight.t().is_contiguous() else weight.contiguous()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x weight^T + bias`` for a 2-D x (tokens x in): ``F.linear``, in fp32 on the CPU through oneDNN.
    `weight` (out x in) may be a transposed view."""
    if not _onednn(x):
        return F.linear(x, weight, bias)
    return _op()(x, _weight_operand(weight), bias, "none", [], "")


TOKEN_CHUNK = 1024
"""Tokens per oneDNN call in ``token_product`` of two wide operands (see there)."""


def token_product(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``p^T q``, the sum over the rows (tokens) of p (N x m) and q (N x n): a weight's gradient. Through
    oneDNN (see ``linear``), whose input must be row-major: the narrower of the two is transposed into a
    copy, the wider one read in place. When both are wide (m, n >= 64: a full weight's gradient), the sum
    runs over chunks of about TOKEN_CHUNK tokens, each added in the matmul's epilogue (faster than one call
    over every token)."""
    if not _onednn(p):
        return torch.mm(p.t(), q)
    swap = p.shape[1] > q.shape[1]
    narrow, wide = (q, p) if swap else (p, q)
    chunks = max(1, round(len(p) / TOKEN_CHUNK)) if narrow.shape[1] >= 64 else 1
    out = None
    for rows, weight in zip(narrow.tensor_split(chunks), wide.tensor_split(chunks)):
        rows, weight = rows.t().contiguous(), _weight_operand(weight.t())
        out = linear(rows, weight) if out is None else _op().binary(rows, out, weight, None, "add")
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
    elsewhere (GPU, autocast, other dtypes, traced graphs, no oneDNN) it is ``nn.Linear``. Same parameters
    and state-dict names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _onednn(x):
            return super().forward(x)
        # 2-D inside the function: its output is then no view of a tensor made inside (which peft's
        # AdaLoRA, adding into it in place, would be refused)
        out = _Linear.apply(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        return out.view(*x.shape[:-1], self.out_features)


def use_onednn_linear(model: nn.Module) -> int:
    """Make every plain ``nn.Linear`` of `model` a ``OneDNNLinear``, in place (none where oneDNN's op is not
    ``available()``); returns how many."""
    if not available():
        return 0
    converted = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
            converted += 1
    return converted
