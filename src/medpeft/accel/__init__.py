"""medpeft's speed-ups, behind one switch: ``train.accel`` (on by default; ``false`` leaves the plain
torch, timm and peft modules). Each is used where it was measured faster (benchmarks/results/), and each
use of a torch private API is guarded by a capability check whose fallback is the public path:

- fp32 linear layers on the CPU through oneDNN (``medpeft.accel.onednn``; private op, probed);
- peft's LoRA layers as one autograd function each (``medpeft.accel.lean_lora``; its private reads of
  autograd nodes are probed);
- freed memory kept for the next step (``medpeft.accel.memory``; glibc only);
- for ``train.attention: auto``, timm's matmul + softmax attention under bf16 on the CPU (torch's fused
  CPU kernel is the slower there), torch's fused kernel elsewhere;
- CNNs in channels-last layout, the one GPU convolutions and oneDNN's CPU convolutions want.
"""

from __future__ import annotations

import torch
from torch import nn

from medpeft.accel import lean_lora, memory, onednn
from medpeft.config import TrainConfig


def capabilities() -> dict[str, bool]:
    """What this machine's torch offers the speed-ups (each probed once)."""
    return {"onednn_linear": onednn.available(), "lean_lora_norm_inputs": lean_lora.norm_inputs_available(),
            "gelu_backward_in_place": lean_lora.gelu_backward_in_place_available(),
            "glibc_allocator": memory.available()}


def memory_format(family: str, train: TrainConfig) -> torch.memory_format:
    """The layout of the model's weights and of its input batches: channels-last for CNNs with accel on."""
    return torch.channels_last if train.accel and family == "cnn" else torch.contiguous_format


def fused_attention(train: TrainConfig, device: torch.device) -> bool | None:
    """Whether timm's attention layers run torch's fused kernel (True) or the matmul + softmax path (False);
    None leaves timm's own choice ('auto' with accel off)."""
    if train.attention != "auto":
        return train.attention == "fused"
    if not train.accel:
        return None
    return not (train.precision == "bf16" and device.type == "cpu")


def apply(model: nn.Module, family: str, train: TrainConfig, device: torch.device) -> nn.Module:
    """Put `model` (a method already applied) in the form `train` asks for, in place; returns it."""
    fused = fused_attention(train, device)
    if fused is not None:
        for module in model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = fused
    if train.accel:
        model.to(memory_format=memory_format(family, train))
        onednn.use_onednn_linear(model)
        lean_lora.make_lean(model)
    return model


def prepare_process(train: TrainConfig) -> None:
    """The process-wide speed-ups (the allocator's), before a run's first step."""
    if train.accel:
        memory.reuse_freed_memory()
