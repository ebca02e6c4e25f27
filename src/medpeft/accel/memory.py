"""Keep the memory that freed tensors held for the next training step (glibc's allocator settings)."""

from __future__ import annotations

import ctypes
import platform

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # malloc.h
_MMAP_THRESHOLD = 32 * 2**20  # the largest glibc accepts


def available() -> bool:
    """Whether this process's C library is glibc (whose mallopt settings are used here)."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def reuse_freed_memory() -> bool:
    """Make this process keep the memory that tensors free, for the next step's tensors; returns whether it could.

    glibc hands blocks above its mmap threshold, and the free top of its heap, back to the system as soon
    as they are freed, so on the CPU every training step would fault its activations in again page by
    page. This serves blocks up to 32 MB from the heap and never trims it: once the heap holds a step, a
    step faults in nothing, with the same peak memory. The memory returns to the system when the process
    ends. Does nothing where the C library is not glibc."""
    if not available():
        return False
    libc = ctypes.CDLL(None)
    libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    return True
