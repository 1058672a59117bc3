"""Keep freed memory inside the process (glibc malloc settings) for CPU simulations.

Every force evaluation of a batched model allocates and frees the same large tensors
(a few MiB each for tens of replicas, tens of MiB at R = 128). With glibc's defaults,
blocks above the mmap threshold are handed back to the operating system when freed
(munmap, heap trimming) and page-faulted in again, zero-filled, at the next step. On the
CPU that kernel time was 30-50 % of a replica-engine step (aspirin, R = 8-128;
`benchmarks/README.md`, 1).

`keep_freed_memory` therefore sends every block to the heap and never shrinks it:

* ``M_MMAP_MAX = 0``: no block is served by its own mmap. Raising the mmap threshold is
  not enough: its largest value is 32 MiB, and at R = 128 some tensors are larger (MACE,
  aspirin: a 39 MiB block was mmapped and munmapped, 9,900 page faults, at every step
  while the heap was still smaller than it). glibc still falls back to mmap where the
  heap cannot grow, so no allocation fails because of this.
* ``M_TRIM_THRESHOLD = -1``: the top of the heap is never given back (a 1 GiB threshold
  still let a large batch, which frees more than that at once, trim and fault it back).
* ``M_MMAP_THRESHOLD = 32 MiB`` as well: setting any of these switches off glibc's
  dynamic threshold, whose behaviour differs between versions.

The cost is memory: the process keeps its peak heap until it exits, which a simulation
reaches again at its next step anyway. The setting is process-wide and lasts until exit;
the same as starting Python with ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:``
``glibc.malloc.trim_threshold=18446744073709551615:glibc.malloc.mmap_threshold=33554432``.
"""
from __future__ import annotations

import ctypes

MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's largest allowed mmap threshold on 64-bit
MMAP_MAX = 0  # no block gets an mmap of its own (glibc still uses mmap where brk fails)
TRIM_THRESHOLD_BYTES = -1  # mallopt(3): -1 switches trimming off
# mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4

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
                        and libc.mallopt(_M_MMAP_MAX, MMAP_MAX)
                        and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        _applied = False
    return _applied
