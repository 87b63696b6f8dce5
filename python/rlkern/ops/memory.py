"""Fresh CPU buffers advised as transparent huge pages before their first write.

A fresh multi-MiB CPU tensor is mapped on first touch, one 4 KiB page at a time (glibc serves
large allocations with mmap), and on a virtual machine the faults can cost more than the
writes. Advised as huge pages (``MADV_HUGEPAGE``), its 2 MiB-aligned interior faults in 2 MiB
pieces (docs/benchmarks.md, "The backward", has what that did to the logprobs backward).
The CPU logprobs backward and the fused policy-loss op advise their fresh gradients in C++
(``csrc/cpu/huge_pages.h``); this is the same advice for buffers allocated in Python (the
bench's floors, the policy loss's other gradients and factors). A hint: without transparent
huge pages nothing changes.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["advise_huge_pages"]


def advise_huge_pages(t: Tensor) -> Tensor:
    """Advise the whole 2 MiB pages of ``t``'s memory as huge pages (a CPU tensor; one that
    holds no whole huge page is left alone, by the C++ helper) and return ``t``. Call it
    before the first write."""
    if t.is_cpu and t.nbytes:
        from rlkern import _C

        _C.advise_huge_pages(t.data_ptr(), t.nbytes)
    return t
