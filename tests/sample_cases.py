"""Sampling options shared by the sampler tests (test_sample.py: the C++ CPU kernel and the
reference; test_sample_cuda_emulation.py: the CUDA kernel in the emulator)."""

from __future__ import annotations

#: Every filter alone, with a temperature, and combined (in the default top-k → top-p → min-p
#: order and in the joint order).
OPTIONS = [
    dict(),
    dict(temperature=0.7),
    dict(top_k=4),
    dict(top_p=0.6),
    dict(min_p=0.2),
    dict(top_k=6, top_p=0.8, temperature=1.3),
    dict(top_k=6, top_p=0.8, min_p=0.1),
    dict(top_k=6, top_p=0.7, filter_order="joint"),
]


def option_id(opts: dict) -> str:
    """The test id of a set of options, e.g. ``top_k=6,top_p=0.8`` (``plain`` for none)."""
    return ",".join(f"{k}={v}" for k, v in opts.items()) or "plain"


def tied_rows():
    """Three rows of 37 logits (seeded), row 1 with a tie at its top, and their seeds and
    steps: the small inputs of the interpreter-bound Triton sampler tests."""
    import torch

    torch.manual_seed(0)
    x = torch.randn(3, 37) * 2
    x[1, 5] = x[1, 6] = x[1].max()  # a tie at the top
    return x, torch.randint(0, 2**40, (3,)), torch.randint(0, 99, (3,))
