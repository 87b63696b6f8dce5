"""The CPU backward's fresh (N, V) gradient is advised as transparent huge pages
(csrc/cpu/huge_pages.h): filled in 4 KiB pages, a fresh buffer costs one page fault per
4 KiB, several times the writes themselves on a virtual machine.

The advice is visible in /proc/self/smaps: the mapping that holds the gradient's 2 MiB-aligned
interior carries the ``hg`` flag (MADV_HUGEPAGE), whether or not the kernel then found huge
pages for it. Linux only; skipped (with the reason) where the kernel has no transparent huge
pages.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import rlkern

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not THP.exists(),
    reason="transparent huge pages are Linux's, and this kernel has none "
           "(/sys/kernel/mm/transparent_hugepage/enabled is missing)")

HUGE = 2 << 20


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that contains ``address``."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    inside = False
    for line in lines:
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def _interior(t: torch.Tensor) -> int:
    """An address inside ``t``'s first whole 2 MiB page."""
    begin = (t.data_ptr() + HUGE - 1) // HUGE * HUGE
    assert begin + HUGE <= t.data_ptr() + t.nbytes, "the tensor holds no whole huge page"
    return begin


def _logits(n: int = 256, v: int = 151_936, dtype=torch.bfloat16) -> tuple[torch.Tensor, ...]:
    """Logits and labels. At 78 MB (bf16) and more, the logits, their clones and their
    gradients are above glibc's largest mmap threshold (32 MiB): each is a fresh mapping,
    advised only if this call advised it, never memory reused from an earlier buffer."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, v, generator=g) * 4).to(dtype)
    return x, torch.randint(0, v, (n,), generator=g)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_fresh_gradient_is_advised_as_huge_pages(dtype):
    x, y = _logits(dtype=dtype)
    logits = x.clone().requires_grad_()
    before = _vm_flags(_interior(logits))
    assert "hg" not in before  # a fresh mapping
    out = rlkern.token_logprobs(logits, y, return_entropy=True, backend="cpu")
    (grad,) = torch.autograd.grad(out.logprobs.sum() + out.entropy.sum(), logits)
    assert "hg" in _vm_flags(_interior(grad))
    assert _vm_flags(_interior(logits)) == before  # the input is left as it was


def test_the_in_place_backward_advises_nothing():
    x, y = _logits()
    logits = x.clone().requires_grad_()
    before = _vm_flags(_interior(logits))
    assert "hg" not in before  # a fresh mapping
    out = rlkern.token_logprobs(logits, y, inplace_backward=True, backend="cpu")
    (grad,) = torch.autograd.grad(out.logprobs.sum(), logits)
    assert grad.data_ptr() == logits.data_ptr()
    assert _vm_flags(_interior(grad)) == before


def test_the_truncated_backward_advises_its_gradient_too():
    x, y = _logits()
    logits = x.clone().requires_grad_()
    out = rlkern.token_logprobs(logits, y, top_k=50, backend="cpu")
    (grad,) = torch.autograd.grad(out.logprobs.nan_to_num(neginf=0.0).sum(), logits)
    assert "hg" in _vm_flags(_interior(grad))


def test_python_buffers_take_the_same_advice():
    """rlkern.ops.memory.advise_huge_pages (the bench floors' fresh buffers) advises a CPU
    tensor's whole 2 MiB pages and returns it; a tensor under 2 MiB is left alone."""
    from rlkern.ops.memory import advise_huge_pages

    big = torch.empty(20 * HUGE, dtype=torch.uint8)  # 40 MiB: a fresh mapping
    assert "hg" not in _vm_flags(_interior(big))
    assert advise_huge_pages(big) is big
    assert "hg" in _vm_flags(_interior(big))
    small = torch.empty(HUGE // 2, dtype=torch.uint8)
    before = _vm_flags(small.data_ptr())
    assert advise_huge_pages(small) is small
    assert _vm_flags(small.data_ptr()) == before
