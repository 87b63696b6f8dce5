"""Timing and peak memory of one callable: the measuring instrument of ``rlkern bench``.

* :func:`time_call` — warm-up calls (compilation, first-touch page faults and allocator growth
  happen here, not in the numbers), then ``repeats`` timed calls; reports median, min and IQR.
  :func:`timed_once` is its single timed call, for callers that interleave implementations.
* :func:`peak_extra_memory` — the memory one call needs on top of what is already allocated.
  CUDA: the caching allocator's peak counter. CPU: the process's peak resident set, reset just
  before the call through ``/proc/self/clear_refs``, with glibc switched to a mode in which the
  resident set follows the allocations (:mod:`rlkern.bench.allocator`).

A callable's return value is dropped inside the timed region, so one call's outputs never
inflate the next call's memory or time.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rlkern.bench import allocator


@dataclass(frozen=True)
class Timing:
    """Wall-clock times of one callable, in seconds.

    ``times`` are the timed calls in order; ``warmup`` the untimed ones (the first of these
    includes compilation for ``torch.compile`` implementations).
    """

    median: float
    min: float
    iqr: float
    times: tuple[float, ...]
    warmup: tuple[float, ...]


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a wall-clock reading covers it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(times: list[float] | tuple[float, ...], warmup: tuple[float, ...] = ()) -> Timing:
    """Median, min and interquartile range of ``times`` (at least one value).

    The median, not the mean, is the reported figure: on a shared, noisy machine single slow
    calls (preemption, page reclaim) are common and should not move the result.
    """
    if not times:
        raise ValueError("times must contain at least one value")
    ordered = sorted(times)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
        iqr = q3 - q1
    else:
        iqr = 0.0
    return Timing(
        median=statistics.median(ordered),
        min=ordered[0],
        iqr=iqr,
        times=tuple(times),
        warmup=tuple(warmup),
    )


def timed_once(
    fn: Callable[[], Any],
    *,
    device: torch.device | str = "cpu",
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Seconds taken by one call of ``fn()``.

    On CUDA the device is synchronised before the clock starts and before it stops, so the
    time covers the kernels, not just their launch. The result of ``fn`` is dropped inside the
    timed region: freeing outputs is part of a call's cost, and the next call starts from the
    same state.
    """
    dev = torch.device(device)
    synchronize(dev)
    start = clock()
    fn()
    synchronize(dev)
    return clock() - start


def time_call(
    fn: Callable[[], Any],
    *,
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    clock: Callable[[], float] = time.perf_counter,
    budget_s: float | None = None,
) -> Timing | None:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    Args:
        fn: the call to time.
        repeats: number of timed calls (>= 1; the CLI default is 5).
        warmup: number of untimed calls first. At least one call must precede the timed
            ones (the first call of anything pays for lazy initialisation, ``torch.compile``
            implementations need more); 0 is for callers that made that call themselves.
        device: where ``fn`` runs (see :func:`timed_once`).
        clock: seconds as a float; injectable for tests.
        budget_s: if given and the last warm-up call predicts that the timed calls would take
            longer than this, return ``None`` without running them (the caller reports a skip).

    Returns:
        :class:`Timing`, or ``None`` when skipped for the budget.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    warm = tuple(timed_once(fn, device=device, clock=clock) for _ in range(warmup))
    if budget_s is not None and warm and warm[-1] * repeats > budget_s:
        return None
    return summarize([timed_once(fn, device=device, clock=clock) for _ in range(repeats)], warm)


# ---------------------------------------------------------------------------------------------
# Peak memory


def _status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (e.g. ``VmRSS``, ``VmHWM``) in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} field")


def cpu_peak_supported() -> bool:
    """True where the peak resident set can be reset (Linux ``clear_refs`` value 5)."""
    return os.path.exists("/proc/self/clear_refs") and os.path.exists("/proc/self/status")


def peak_extra_memory(fn: Callable[[], Any], *, device: torch.device | str = "cpu") -> int | None:
    """Bytes that one call of ``fn()`` needs on top of the memory in use before it.

    CUDA: ``max_memory_allocated`` after the call minus ``memory_allocated`` before it, with the
    peak counter reset first — exact for tensors from torch's caching allocator.

    CPU: Linux lets a process reset its peak resident set size (``VmHWM``) by writing ``5`` to
    ``/proc/self/clear_refs`` (no page-table walk for this value: cheap); ``VmHWM`` after the
    call minus ``VmRSS`` just before it is the peak extra memory. The call runs inside
    :func:`rlkern.bench.allocator.for_memory`, so memory that glibc would otherwise reuse
    unseen is counted: its ``malloc_trim`` releases the free pages of the heap, so a block the
    call reuses is counted as its pages become resident again, and large blocks are mapped
    and unmapped. The call runs on the calling thread. (It once ran on a thread of its own, for
    a heap of its own; that thread's OpenMP team then slowed the small timed calls of every
    later group on 2 cores: the contiguous advantages floor at 65,536 rows read 246–304 µs
    after the shuffled-ids group, 55 µs without it.) Caveats:

    * Resident memory counts touched pages only: a buffer allocated but never written costs
      nothing here (true of the machine too, not a measuring error).
    * The kernel's counters are per-CPU and may lag by some hundreds of KiB: the resolution.
    * Without glibc (:func:`rlkern.bench.allocator.available` is False) reused heap memory
      can go unseen and the figure can be low.

    Returns:
        bytes (``>= 0``), or ``None`` where the platform offers no way to measure.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        fn()
        synchronize(dev)
        return max(0, torch.cuda.max_memory_allocated(dev) - before)
    if dev.type != "cpu" or not cpu_peak_supported():
        return None
    with allocator.for_memory():
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        before_kib = _status_kib("VmRSS")
        fn()
        peak_kib = _status_kib("VmHWM")
    return max(0, peak_kib - before_kib) * 1024


