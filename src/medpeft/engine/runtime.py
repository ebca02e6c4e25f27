"""Where and how a run computes: its device, its precision (autocast), and the process session around it
(the allocator's speed-up, joining and leaving a launcher's DDP process group)."""

from __future__ import annotations

import functools
import warnings
from contextlib import contextmanager, nullcontext

import torch

from medpeft import accel
from medpeft.config import TrainConfig
from medpeft.engine.distributed import check_launcher_precision, start, stop


def resolve_device(name: str) -> torch.device:
    """``train.device`` as a device: 'auto' is the GPU where there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_bf16_matmul() -> bool:
    """Whether torch runs bf16 matmuls on this CPU natively (AVX-512 and up); without, they are emulated,
    orders of magnitude slower than fp32. Asks oneDNN (a private torch query) where it can, else the
    public CPU capability."""
    query = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    if query is not None:
        try:
            return bool(query())
        except RuntimeError:
            pass
    return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")


EMULATED_BF16 = "this CPU has no bf16 matmul instructions (AVX-512 and up): torch emulates them, far slower than fp32"


@functools.cache
def _warn_emulated_bf16() -> None:
    warnings.warn(f"train.precision 'bf16': {EMULATED_BF16}; use 'fp32'", stacklevel=3)


def autocast(device: torch.device, precision: str):
    """The autocast context of ``train.precision`` on `device` (none for fp32)."""
    if precision == "fp32":
        return nullcontext()
    if precision == "bf16" and device.type == "cpu" and not cpu_bf16_matmul():
        _warn_emulated_bf16()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@contextmanager
def session(train: TrainConfig):
    """This process's part in a run: yields (processes, device). Under a launcher (torchrun, accelerate
    launch) it joins the process group and takes its local GPU, and leaves the group at the end."""
    check_launcher_precision(train.precision)
    accel.prepare_process(train)
    procs, device = start(resolve_device(train.device))
    try:
        yield procs, device
    finally:
        stop(procs)

