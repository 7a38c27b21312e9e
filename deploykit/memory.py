"""Keep freed memory in the process for reuse: what repeated CPU model runs want.

glibc serves large allocations (PyTorch's activations, over 128 KiB to a few MiB by its
dynamic threshold) with fresh mmap()s and returns them to the kernel when freed, so every
forward pass faults its activations in again, page by page, and zeroes them. Measured here
(a 2-vCPU VM, benchmarks/results/memory.md), that made the int16 search's model runs 1.3x
to 1.6x slower, in one process at one or two threads and in two worker processes at once.
Serving allocations up to 32 MiB from the heap and not trimming it removes that; memory
stays at the process's peak, which a run of one model at fixed shapes reaches anyway.
Applied by the CLI and by Ray workers, not on import: it is the process's allocator, and a
library should not change it behind its user's back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's maximum on 64-bit
_TOP_PAD = 64 * 1024 * 1024


@functools.cache
def keep_freed_memory() -> bool:
    """Tune glibc's allocator of this process (once); False where it is not glibc (macOS,
    musl, Windows), which then keeps its own behaviour."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Trim threshold far above any peak (the largest an int holds): freed heap memory stays.
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1)
    return bool(ok and mallopt(_M_TOP_PAD, _TOP_PAD))
