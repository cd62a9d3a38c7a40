"""Keep freed memory in the process so that large tensors do not page-fault on every step.

glibc's malloc serves every allocation above its mmap threshold (at most 32 MiB, however it
adapts) with a fresh mmap and returns it to the kernel on free. A training step at long context
allocates and frees many such tensors ([n, d_ff] activations, [n, r*r] sketch features,
gradients), so each step touches all of them as new pages: the kernel zeroes every 4 KiB page
again, and memory-bound operators (elementwise, cat, fill, layer norm) run several times slower
per element at 16k tokens than at 4k. Measured on the tiny shape, polysketch-random, one thread:
903 tokens/s at 16k with glibc's defaults against 1488 with the heap kept (1575 at 4k).

`keep_freed_memory` turns mmap off for malloc and never trims the heap, so after a few steps
the heap holds the pages a whole step needs and a step reuses the pages the previous one freed
(tests/python/test_heap.py counts the page faults). Nothing is returned to the kernel until the
process ends, which is what a training, evaluation or benchmark process wants; the resident peak
is the live tensors' peak plus the heap's fragmentation.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from typing import Optional

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_applied: Optional[bool] = None


def keep_freed_memory() -> bool:
    """Applies the setting once per process. True where it took effect (glibc), False where the
    C library has no mallopt or refused it: then allocation behaves as before."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # -1 becomes the largest size_t in glibc: the heap is never trimmed.
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, -1))
