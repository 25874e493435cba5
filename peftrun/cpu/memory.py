"""glibc malloc settings for CPU training: freed activation memory stays in the process.

A training step allocates and frees hundreds of MB of activations and gradients in blocks of a few MB.
By default glibc serves blocks above its mmap threshold with fresh mappings (the threshold adapts, up to
32 MiB, only as such blocks are freed) and gives heap memory back to the OS beyond its trim threshold,
so a step keeps touching new pages, each one a page fault the kernel zero-fills. On this project's
2-core VMs a packed step of the throughput benchmark took ~56,000 page faults, and an elementwise op
writing a fresh 4 MB output ran ~5x slower than one writing reused memory. Fixing the mmap threshold at
its maximum and raising the trim threshold keeps that memory in the process: ~12,000 faults per step,
1.06-1.08x the step rate, ~40 MB more peak RSS (docs/throughput.md).
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's largest allowed on 64-bit
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where there is no glibc."""
    return _mallopt((M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))


GATHER_MMAP_THRESHOLD = 1 << 20


def map_gathered_weights() -> bool:
    """Under ZeRO-3 on CPU ranks: blocks of 1 MiB and more get mappings of their own, given back to the
    OS when freed; False where there is no glibc.

    ZeRO-3 gathers each weight whole for its use and frees it again, a few MB at a time in layer order,
    from zero.Init on. Served from the heap (glibc's mmap threshold adapts up to 32 MiB as such blocks
    are freed, and keep_freed_memory fixes it there), those blocks fragment it and the freed space stays
    resident: a 0.4B bf16 LoRA run on 2 ranks grew by ~1.2 GB per process over 2 steps and peaked at
    2.6-3.0 GB against DDP's 1.9 GB; with this, 1.8 / 1.7 GB (docs/scaling.md). A fixed threshold also
    stops the adaptation. Activations pay page faults again (memory.py's docstring): under ZeRO-3 on a
    CPU memory is the point. Call it before the model is built.
    """
    return _mallopt((M_MMAP_THRESHOLD, GATHER_MMAP_THRESHOLD))


def _mallopt(*settings: tuple[int, int]) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    return all(bool(mallopt(option, value)) for option, value in settings)
