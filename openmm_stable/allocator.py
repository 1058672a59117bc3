"""Keep freed memory inside the process (glibc malloc settings) for CPU simulations.

Every force evaluation of a batched model allocates and frees the same large tensors
(a few MiB each for tens of replicas). With glibc's defaults, blocks above the mmap
threshold are handed back to the operating system when freed (munmap, heap trimming)
and page-faulted in again, zero-filled, at the next step. On the CPU that kernel time
was 30-50 % of a replica-engine step (aspirin, R = 8-128; `benchmarks/README.md`, 1).

`keep_freed_memory` raises glibc's mmap threshold to its largest value (32 MiB) and its
trim threshold to 1 GiB, so that freed blocks are reused instead. The setting is
process-wide and lasts until exit; the same as starting Python with
``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824``.
"""
from __future__ import annotations

import ctypes

MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's largest allowed mmap threshold on 64-bit
TRIM_THRESHOLD_BYTES = 2**30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (malloc.h)

_applied = False


def keep_freed_memory() -> bool:
    """Apply the settings once per process; True where they are in force (glibc), False
    where there is no glibc (macOS, musl), which then keeps its own behaviour."""
    global _applied
    if _applied:
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")
        _applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
                        and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        _applied = False
    return _applied
