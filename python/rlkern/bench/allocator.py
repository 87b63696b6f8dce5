"""glibc malloc settings for benchmarking on CPU: one mode for timing, one for peak memory.

torch's CPU tensors come from ``malloc``. glibc serves a request from its heap, reusing freed
memory that stays resident, unless the request is above the *mmap threshold*: then it maps
fresh pages and unmaps them on free. By default the threshold adapts: it starts low and rises
(up to :data:`TIMING_MMAP_THRESHOLD`) each time a mapped block is freed, so a warmed-up process
serves everything up to that size from resident heap memory.

The two needs pull apart:

* **Timing** must see the allocator a long-running trainer sees. A fixed low threshold (what
  ``MALLOC_MMAP_THRESHOLD_=65536`` in the environment does) makes every allocation above it pay
  for ``mmap``, page faults and ``munmap`` on every call. Implementations that loop over rows,
  allocating a row-sized temporary each time, were measured several times slower that way
  once a row crossed the threshold. :func:`for_timing` instead fixes the settings a warmed-up
  default process converges to.
* **Peak memory** read from the resident set (``VmHWM``) must not miss memory that the heap
  reuses without it ever leaving the resident set. :func:`for_memory` (around the one call
  whose memory is measured) releases the heap's free pages (``malloc_trim``), so whatever the
  call touches is counted, and lowers the mmap threshold, so what the call frees is returned
  at once and the high-water mark follows the live allocations.

Only glibc offers these controls; elsewhere both are no-ops and :func:`available` says so.
"""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Iterator
from contextlib import contextmanager

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: glibc's ceiling for the adaptive mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX):
#: what a warmed-up default process serves from its heap.
TIMING_MMAP_THRESHOLD = 32 * 1024 * 1024
#: glibc keeps the trim threshold at twice the adaptive mmap threshold.
TIMING_TRIM_THRESHOLD = 2 * TIMING_MMAP_THRESHOLD
#: While measuring memory: blocks this large or larger are mapped and unmapped on free (a
#: few pages: the row-sized temporaries of per-row loops must be seen too).
MEMORY_MMAP_THRESHOLD = 16 * 1024
MEMORY_TRIM_THRESHOLD = 2 * MEMORY_MMAP_THRESHOLD


def _libc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def available() -> bool:
    """True when the allocator can be switched (glibc on Linux)."""
    return _LIBC is not None


def _set(mmap_threshold: int, trim_threshold: int) -> None:
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, trim_threshold)


def for_timing() -> None:
    """Fix the settings a warmed-up default glibc process converges to (see module doc).

    Fixing them (rather than leaving glibc adaptive) also makes runs repeatable: the adaptive
    threshold would depend on what the process happened to free earlier.
    """
    _set(TIMING_MMAP_THRESHOLD, TIMING_TRIM_THRESHOLD)


@contextmanager
def for_memory() -> Iterator[None]:
    """Within the block, resident memory follows allocations; timing settings after it."""
    if _LIBC is None:
        yield
        return
    _set(MEMORY_MMAP_THRESHOLD, MEMORY_TRIM_THRESHOLD)
    _LIBC.malloc_trim(0)
    try:
        yield
    finally:
        for_timing()
