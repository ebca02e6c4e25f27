"""A leaner forward and backward for peft's LoRA Linear layers: same parameters, names and results.

peft computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` op by op: four output-sized tensors
in forward and three input-sized ones for the input's gradient per layer, and under autocast it keeps
low-precision copies of W, A and B for backward. Here one autograd function computes
``y = x W^T + b + s (x A^T) B^T``: in fp32 as one matmul with ``W + s B A`` (weight-sized, made for the
call and again in backward), under autocast with the low-rank update added in place into the base
matmul's output and into the input's gradient (rounding W + s B A to bf16 would lose most of the small
update). It saves only x (once, in the compute dtype), the small ``x A^T`` and the parameters.

- After a LayerNorm, whose backward keeps its input z and statistics anyway, not even x is saved: A's
  gradient, a sum over tokens of x, is taken over z (``_grad_as``). That reads the norm's autograd node
  (``grad_fn._saved_input``, ...) and torch's private check for active saved-tensor hooks;
  ``norm_inputs_available()`` probes both once, and without them x is saved as usual.
- In timm's Mlp (``LeanMlp``), fc2 takes fc1's output h, which the GELU keeps anyway, as its input: it
  saves h, recomputes ``gelu(h)`` in backward and returns h's gradient through the GELU computed in place
  (aten's ``gelu_backward.grad_input``; where this torch lacks it, the Mlp stays timm's).
- A fused qkv split into q, k, v (``medpeft.backbones.SplitQKV``) with some of them adapted runs as one
  matmul over the fused weight, each update on its slice.
- In fp32 backward gets ``s gy B`` out of the input gradient's matmul (by ``[W + s B A | s B]``), and on
  the CPU every matmul goes through ``medpeft.accel.onednn.linear``.

A ViT block with LoRA on every linear layer then keeps 10 of the 16 token-sized tensors that full
fine-tuning keeps. Step times and memory: benchmarks/results/lora_costs*.md.

``make_lean`` converts the layers of a model that ``peft.get_peft_model`` has wrapped by changing their
class: state-dict names, ``save_pretrained``, ``PeftModel.from_pretrained`` and ``merge_and_unload`` are
peft's own. A layer falls back to peft's forward whenever its adapter is not plain LoRA (see
``LeanLinear.lean_adapter``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as PeftLinear
from timm.layers import Mlp
from torch import nn

from medpeft.accel.onednn import OneDNNLinear, linear, token_product
from medpeft.backbones.layers import SplitQKV, row_blocks

_NORM_SAVED = ("_saved_input", "_saved_result1", "_saved_result2", "_saved_weight", "_saved_bias")


@functools.cache
def norm_inputs_available() -> bool:
    """Whether a LayerNorm's autograd node exposes its saved input and statistics here, and torch's check
    for active saved-tensor hooks exists (both private to torch); probed once."""
    try:
        torch._C._autograd._top_saved_tensors_default_hooks(False)  # active saved-tensor hooks, if any
        with torch.inference_mode(False), torch.enable_grad():
            z = torch.arange(8.0).view(2, 4).requires_grad_()  # no random draw: runs' RNG streams stay as they are
            node = F.layer_norm(z, (4,), torch.ones(4), torch.zeros(4)).grad_fn
        return type(node).__name__ == "NativeLayerNormBackward0" and all(hasattr(node, n) for n in _NORM_SAVED)
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def gelu_backward_in_place_available() -> bool:
    """Whether this torch has aten's ``gelu_backward.grad_input`` (the GELU's backward into a given buffer)."""
    return hasattr(getattr(torch.ops.aten, "gelu_backward", None), "grad_input")


norm_inputs_available()  # probed at import, outside any forward pass, autocast or dispatch mode


def _stack_rows(parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The row-wise concatenation of `parts`: a view when they are adjacent blocks of one tensor (as
    ``SplitQKV`` keeps q, k, v), else a copy."""
    if len(parts) == 1:
        return parts[0]
    view = row_blocks(parts)
    return torch.cat(parts) if view is None else view


def _source(x: torch.Tensor) -> tuple[str, tuple, object] | None:
    """How backward can recompute `x` from what its producer's backward keeps anyway: the input and
    statistics of the LayerNorm that made it. None when x comes from elsewhere, or when saved-tensor hooks
    (checkpointing, offloading) pack the producer's tensors, or under torch.compile."""
    fn = x.grad_fn
    if fn is None or torch.compiler.is_compiling() or not norm_inputs_available() \
            or torch._C._autograd._top_saved_tensors_default_hooks(False):  # hooks pack what autograd saves
        return None
    if type(fn).__name__ == "NativeLayerNormBackward0" and x.output_nr == 0:
        return "layer_norm", tuple(getattr(fn, name) for name in _NORM_SAVED), None
    return None


def _folded(dtype: torch.dtype) -> bool:
    """Whether the update is folded into the weight (fp32) rather than added apart (see ``_weight``)."""
    return dtype == torch.float32


def _weight(weights, slices, factors, dtype, with_b: bool = False) -> torch.Tensor:
    """The weight that the matmuls of x and of the input's gradient take: in fp32 ``W + s B A`` on each
    slice's rows (then one matmul computes base and update, and backward needs no token-sized update
    pass), else W alone, the update computed apart in the low precision (rounding W + s B A to bf16 would
    round away much of the update, which is small against W). `with_b` (fp32) appends a column block per
    slice, ``s B`` on the slice's rows and 0 elsewhere: the matmul of the output's gradient gy by it gives
    the input's gradient and every ``s gy B`` at once (alone, that skinny product cost a few passes over gy)."""
    weight = _stack_rows(weights)
    if not _folded(dtype):
        return weight.to(dtype)
    ranks = [a.shape[0] for a in factors[0::2]] if with_b else []
    cols = weight.shape[1]
    folded = weight.new_empty(weight.shape[0], cols + sum(ranks))
    folded[:, :cols] = weight
    b_blocks = folded[:, cols:].zero_().split(ranks, dim=1) if with_b else ()
    for (start, stop, scaling), a, b in zip(slices, factors[0::2], factors[1::2]):
        # baddbmm, not addmm: train.recompute 'selective' keeps addmm's outputs in qkv and fc2 (activations)
        folded[start:stop, :cols].unsqueeze(0).baddbmm_(b.unsqueeze(0), a.unsqueeze(0), alpha=scaling)
    for (start, stop, scaling), b, block in zip(slices, factors[1::2], b_blocks):
        torch.mul(b, scaling, out=block[start:stop])
    return folded


def _forward(ctx, x, gelu, weights, bias, slices, *factors):
    """weights: the frozen weight as row blocks; bias: frozen or None; slices: ``(start, stop, scaling)``
    output columns of each adapter, whose ``A, B`` follow in `factors`. gelu: None, or ``(gelu(x),
    approximate)``: the layer's input is that GELU output of x, already computed, and x's gradient is
    returned through the GELU."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    inputs = x if gelu is None else gelu[0]
    x2 = inputs.reshape(-1, inputs.shape[-1]).to(dtype)
    out = linear(x2, _weight(weights, slices, factors, dtype), None if bias is None else bias.to(dtype))
    xas = []
    for (start, stop, scaling), a, b in zip(slices, factors[0::2], factors[1::2]):
        xas.append(linear(x2, a.to(dtype)))
        if not _folded(dtype):
            out[:, start:stop].addmm_(xas[-1], b.to(dtype).t(), alpha=scaling)
    source = ("gelu", (x,), gelu[1]) if gelu else _source(x)
    kind, sources, ctx.source_arg = source if source else (None, (x2,), None)
    ctx.save_for_backward(*sources, *weights, *xas, *factors)
    ctx.source, ctx.n_sources, ctx.n_weights = kind, len(sources), len(weights)
    ctx.dtype, ctx.x_shape, ctx.x_dtype, ctx.slices = dtype, x.shape, x.dtype, slices
    return out  # (tokens, out): lora_linear views it; a view made here could not be changed in place


def _grad_as(ctx, sources, gybs) -> list[torch.Tensor]:
    """A's gradients ``(s gy B)^T x`` (`gybs`: each slice's ``s gy B``) over the tokens of the layer's input x.
    After a LayerNorm, x = (z - mean) rstd w + b from its input z, and so the sum over tokens is taken of
    z itself: ``((G^T z) - (G^T mean) 1^T) diag(w) + (1^T gy B s)^T b^T`` with G = s gy B rstd (small),
    in fp32: one skinny matmul, no recomputed x. After a GELU, x is recomputed from its input."""
    if ctx.source != "layer_norm":
        x = sources[0] if ctx.source is None else F.gelu(sources[0], approximate=ctx.source_arg).to(ctx.dtype)
        x = x.reshape(-1, x.shape[-1])
        return [token_product(gyb, x) for gyb in gybs]
    z, mean, rstd, weight, bias = sources
    z, mean, rstd = z.reshape(-1, z.shape[-1]).float(), mean.reshape(-1, 1), rstd.reshape(-1, 1)
    grads = []
    for gyb in map(torch.Tensor.float, gybs):
        g = gyb * rstd
        grad = token_product(g, z).sub_(g.t() @ mean)
        grad = grad if weight is None else grad.mul_(weight.float())
        grads.append(grad if bias is None else grad.addr_(gyb.sum(0), bias.float()))
    return grads


def _backward(ctx, grad_out):
    saved = ctx.saved_tensors
    sources, saved = saved[:ctx.n_sources], saved[ctx.n_sources:]
    weights, saved = saved[:ctx.n_weights], saved[ctx.n_weights:]
    xas, factors = saved[:len(ctx.slices)], saved[len(ctx.slices):]
    gy = grad_out.reshape(-1, grad_out.shape[-1]).to(ctx.dtype).contiguous()  # oneDNN reads it row-major
    need_x, cols, grad_x = ctx.needs_input_grad[0], ctx.x_shape[-1], None
    # In fp32 one matmul for the input's gradient and every s gy B (see _weight). Not after a GELU: its
    # backward, in place into the input's gradient, allocates when that is a column block of a wider tensor.
    fused = _folded(ctx.dtype) and ctx.source != "gelu"
    if fused:
        folded = _weight(weights, ctx.slices, factors, ctx.dtype, with_b=True)
        product = linear(gy, folded[:, 0 if need_x else cols:].t())
        grad_x = product[:, :cols] if need_x else None
        gybs = product[:, cols if need_x else 0:].split([a.shape[0] for a in factors[0::2]], dim=1)
    else:
        gybs = [linear(gy[:, start:stop], b.to(ctx.dtype).t()).mul_(scaling)
                for (start, stop, scaling), b in zip(ctx.slices, factors[1::2])]
    grad_as = _grad_as(ctx, sources, gybs)
    grads = []
    for (start, stop, scaling), grad_a, xa, a, b in zip(ctx.slices, grad_as, xas, factors[0::2], factors[1::2]):
        grads += [grad_a.to(a.dtype), token_product(xa, gy[:, start:stop]).mul_(scaling).t().to(b.dtype)]
    if need_x and not fused:  # after A's gradients: a recomputed GELU output is freed by now
        grad_x = linear(gy, _weight(weights, ctx.slices, factors, ctx.dtype).t())
        if not _folded(ctx.dtype):
            for gyb, a in zip(gybs, factors[0::2]):
                grad_x.addmm_(gyb, a.to(ctx.dtype))
    if need_x:
        grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        if ctx.source == "gelu":  # through the GELU, in place: autograd's GeluBackward0 makes a new tensor
            grad_x = torch.ops.aten.gelu_backward.grad_input(grad_x, sources[0], approximate=ctx.source_arg,
                                                             grad_input=grad_x)
    return grad_x, None, None, None, None, *grads


def _make_function(device_type: str) -> type[torch.autograd.Function]:
    """The autograd function for one device type (``custom_fwd``/``custom_bwd`` are bound to one), so
    that backward runs under the autocast state of its forward."""
    return type(f"LoraLinear_{device_type}", (torch.autograd.Function,), {
        "forward": staticmethod(torch.amp.custom_fwd(_forward, device_type=device_type)),
        "backward": staticmethod(torch.amp.custom_bwd(_backward, device_type=device_type))})


# Made at import for the usual devices: torch.compile cannot trace making a class.
_FUNCTIONS = {device: _make_function(device) for device in ("cpu", "cuda")}


def lora_linear(x: torch.Tensor, weights: tuple[torch.Tensor, ...], bias: torch.Tensor | None,
                slices: tuple[tuple[int, int, float], ...], *factors: torch.Tensor,
                gelu_input: tuple[torch.Tensor, str] | None = None) -> torch.Tensor:
    """``x W^T + b`` (W frozen, given as row blocks) plus ``scaling (x A^T) B^T`` on the output columns
    ``start:stop`` of each slice, with ``A, B`` per slice in `factors`. Returns and saves no full-size
    update or weight delta; under autocast it computes in the autocast dtype and returns the parameters'
    gradients in their own dtype. ``gelu_input=(h, approximate)`` says that x is ``gelu(h)``: the
    gradient then goes to h, through the GELU (see the module's docstring)."""
    device = x.device.type
    function = _FUNCTIONS.get(device) or _FUNCTIONS.setdefault(device, _make_function(device))
    if gelu_input is None:
        out = function.apply(x, None, weights, bias, slices, *factors)
    else:
        out = function.apply(gelu_input[0], (x, gelu_input[1]), weights, bias, slices, *factors)
    return out.view(*x.shape[:-1], out.shape[-1])


def _frozen(layer: nn.Module) -> bool:
    return type(layer) in (nn.Linear, OneDNNLinear) and not any(p.requires_grad for p in layer.parameters())


class LeanLinear(PeftLinear):
    """peft's LoRA Linear with its forward through ``lora_linear`` when the adapter is plain LoRA."""

    def lean_adapter(self) -> str | None:
        """The one active adapter if plain LoRA can run it: not merged or disabled, no DoRA or other
        variant, no dropout in training, no bias on lora_B, a frozen nn.Linear base; else None."""
        if self.disable_adapters or self.merged or len(self.active_adapters) != 1 or self.fan_in_fan_out:
            return None
        adapter = self.active_adapters[0]
        if adapter not in self.lora_A or adapter in self.lora_variant or self.lora_B[adapter].bias is not None:
            return None
        dropout = self.lora_dropout[adapter]
        inactive = type(dropout) is nn.Dropout and (dropout.p == 0 or not dropout.training)
        if not (isinstance(dropout, nn.Identity) or inactive):
            return None
        return adapter if _frozen(self.get_base_layer()) else None

    def forward(self, x: torch.Tensor, *args, gelu_input: tuple[torch.Tensor, str] | None = None,
                **kwargs) -> torch.Tensor:
        """gelu_input: as ``lora_linear`` takes it (from ``LeanMlp``); peft's path ignores it."""
        adapter = None if args or kwargs else self.lean_adapter()
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        return lora_linear(x, (base.weight,), base.bias, ((0, base.out_features, self.scaling[adapter]),),
                           self.lora_A[adapter].weight, self.lora_B[adapter].weight, gelu_input=gelu_input)


class LeanMlp(Mlp):
    """timm's Mlp whose lean fc2, after a GELU, takes fc1's output as its input (see the module's docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x)
        x = self.norm(self.drop1(activated := self.act(hidden)))
        # inactive dropout and no norm return x itself; fc2 is no LeanLinear once merged
        gelu = x is activated and type(self.act) is nn.GELU and isinstance(self.fc2, LeanLinear)
        x = self.fc2(x, gelu_input=(hidden, self.act.approximate)) if gelu else self.fc2(x)
        return self.drop2(x)


class LeanSplitQKV(SplitQKV):
    """A SplitQKV whose adapted q/k/v run as one matmul over the fused weight plus in-place updates."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, biases, slices, factors, start = [], [], [], [], 0
        for child in (self.q, self.k, self.v):
            if isinstance(child, LeanLinear):
                adapter = child.lean_adapter()
                if adapter is None:
                    return super().forward(x)
                base = child.get_base_layer()
                stop = start + base.out_features
                slices.append((start, stop, child.scaling[adapter]))
                factors += [child.lora_A[adapter].weight, child.lora_B[adapter].weight]
            elif _frozen(child):
                base, stop = child, start + child.out_features
            else:
                return super().forward(x)
            weights.append(base.weight)
            biases.append(base.bias)
            start = stop
        bias = None if biases[0] is None else torch.cat(biases)
        return lora_linear(x, tuple(weights), bias, tuple(slices), *factors)


def make_lean(model: nn.Module) -> int:
    """Give every peft LoRA Linear of `model` the lean forward (and every SplitQKV holding one the fused
    path, every timm Mlp with a lean fc2 the GELU's backward in fc2), in place; returns the number of LoRA
    layers converted."""
    converted = 0
    for module in model.modules():
        if type(module) is PeftLinear:
            module.__class__ = LeanLinear
            converted += 1
    for module in model.modules():
        if type(module) is SplitQKV and any(isinstance(c, LeanLinear) for c in module.children()):
            module.__class__ = LeanSplitQKV
        if type(module) is Mlp and isinstance(module.fc2, LeanLinear) and gelu_backward_in_place_available():
            module.__class__ = LeanMlp
    return converted
