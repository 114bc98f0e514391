"""Keep freed CPU memory in the process for the next tensor of the same size.

PyTorch's CPU tensors come from the C library's malloc. glibc's returns every freed block above
32 MB to the operating system (its largest mmap threshold) and trims freed memory off the top of
its heap, so the next activation of that size is mapped afresh: the kernel zeroes and
page-faults it in again on first write, and unmaps it again when it is freed. A B-cos layer
writes several activation-sized buffers (the 2x-wide MaxOut output, the output, its gradient),
so at batch 32 and 128 px the first layers of a network fault in hundreds of MB every batch
(benchmarks: README, "CPU memory").
"""
from __future__ import annotations

import ctypes
import sys

__all__ = ['keep_freed_cpu_memory']

# mallopt(3) parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2 ** 31 - 1


def keep_freed_cpu_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the system.

    Large blocks then come from the heap (no ``mmap`` per tensor) and freed memory stays there
    (no trimming), so the buffers of one batch are reused by the next without page faults: a
    no-grad forward of bcos_resnet18 (32 images, 128 px, 2 threads) took ~0.8x the time and
    `explain` 0.9x, with 1.02x the peak memory (benchmarks/cpu_memory.py). Process-wide and not
    undone: the process keeps its peak memory until it exits, as PyTorch's GPU caching allocator
    does. The ``timm-bcos`` command calls it; in your own scripts call it once at start-up, or set
    ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647`` before
    Python starts.

    Returns:
        whether it applied: False where the C library is not glibc (macOS, Windows, musl).
    """
    if not sys.platform.startswith('linux'):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: musl's mallopt does nothing
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
