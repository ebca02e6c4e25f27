"""Where and how a run computes: its device, its precision (autocast), and the process session around it
(the allocator's speed-up, joining and leaving a launcher's DDP process group)."""

from __future__ import annotations

import functools
import os
import platform
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


def cpu_name() -> str:
    """The processor's model name and its bf16 matmul instructions (AMX, AVX512-BF16; Linux)."""
    try:
        lines = open("/proc/cpuinfo").read().split("\n\n")[0].splitlines()
    except OSError:
        return platform.machine()
    info = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in lines)}
    flags = info.get("flags", "").split()
    bf16 = [name for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16")) if flag in flags]
    return f"{info.get('model name', platform.machine())} ({', '.join(bf16) or 'no bf16 matmul unit'})"


def numerics() -> dict:
    """What a CPU run's numbers depend on besides its config and seeds: the processor (cpu_name: its bf16
    units decide bf16's rounding), the core count (the threads, so the order of float sums), torch's CPU
    kernels (its capability) and the versions of the libraries that compute and initialise the models."""
    from importlib.metadata import version

    return {"cpu": cpu_name(), "cpus": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "packages": {name: version(name) for name in ("torch", "timm", "peft", "numpy")}}


def cpu_precision() -> str:
    """The cheaper ``train.precision`` of a run on this CPU: 'bf16' where its matmuls run natively, else
    'fp32' (emulated bf16 is slower than fp32)."""
    return "bf16" if cpu_bf16_matmul() else "fp32"


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

