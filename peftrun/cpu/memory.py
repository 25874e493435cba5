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
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
