"""The Triton truncated log-probs in the interpreter (CPU tensors, few rows: each filtered row
runs the threshold search's probes as Python): the float64 reference, bitwise agreement with
the Triton sampler's processed log-probs at several batch sizes and positions, and the
backward against the closed form."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import rlkern
from rlkern.reference.truncated_logprobs import (
    truncated_logprobs_grad_reference,
    truncated_logprobs_reference,
)
from sample_cases import tied_rows

OPTS = [dict(top_k=8, top_p=0.8, min_p=0.05), dict(top_p=0.7, filter_order="joint", top_k=5)]


@pytest.mark.parametrize("opts", OPTS, ids=str)
def test_bitwise_equal_to_triton_sampler(opts):
    x, seeds, steps = tied_rows()
    s = rlkern.sample(x, temperature=0.8, seeds=seeds, steps=steps, backend="triton", **opts)
    t = rlkern.token_logprobs(x, s.tokens, temperature=0.8, return_entropy=True,
                              backend="triton", **opts)
    assert torch.equal(t.logprobs, s.processed_logprobs)
    # Row 2 alone and at another position of another batch: the same bits.
    for sub, pos in ((x[2:3], 0), (x[[0, 2]], 1)):
        t2 = rlkern.token_logprobs(sub, s.tokens[[2] * sub.shape[0]], temperature=0.8,
                                   backend="triton", **opts)
        assert t2.logprobs[pos] == t.logprobs[2]
    ref = truncated_logprobs_reference(x, s.tokens, temperature=0.8, **opts)
    for f in ("logprobs", "entropy", "lse"):
        torch.testing.assert_close(getattr(t, f).double(), ref[f], rtol=1e-5, atol=2e-5, msg=f)
    cpu = rlkern.token_logprobs(x, s.tokens, temperature=0.8, return_entropy=True,
                                backend="cpu", **opts)
    torch.testing.assert_close(t.entropy, cpu.entropy, rtol=1e-5, atol=1e-6)


def test_backward_labels_outside_and_ignore():
    torch.manual_seed(1)
    x = torch.randn(3, 29) * 2
    y = torch.tensor([int(x[0].argmax()), int(x[1].argmin()), -100])  # kept, outside, ignored
    xx = x.clone().requires_grad_(True)
    out = rlkern.token_logprobs(xx, y, temperature=0.9, top_p=0.6, return_entropy=True,
                                backend="triton")
    assert torch.isfinite(out.logprobs[0]) and torch.isneginf(out.logprobs[1])
    g = [torch.randn(3) for _ in range(3)]
    lp = torch.where(torch.isfinite(out.logprobs), out.logprobs, 0.0)
    (lp * g[0] + out.entropy * g[1] + out.lse * g[2]).sum().backward()
    closed = truncated_logprobs_grad_reference(x, y, *g, temperature=0.9, top_p=0.6)
    torch.testing.assert_close(xx.grad.double(), closed, rtol=1e-5, atol=1e-6)
    assert (xx.grad[2] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_raw_equal_to_token_logprobs(dtype):
    """The Triton sampler's raw log-probs come from the token-logprobs forward's row summary:
    equal to token_logprobs (Triton) bit for bit, with and without raw_temperature, for G > 1
    draws, and for a row at another batch position."""
    torch.manual_seed(2)
    x = (torch.randn(3, 45) * 3).to(dtype)
    seeds, steps = torch.arange(3), torch.zeros(3, dtype=torch.long)
    for raw_t in (True, False):
        s = rlkern.sample(x, temperature=0.7, top_k=9, seeds=seeds, steps=steps,
                          raw_temperature=raw_t, num_samples=2, backend="triton")
        t = rlkern.token_logprobs(x.repeat_interleave(2, 0), s.tokens,
                                  temperature=0.7 if raw_t else 1.0, backend="triton")
        assert torch.equal(t.logprobs, s.raw_logprobs)
    one = rlkern.token_logprobs(x[2:3], s.tokens[4:5], temperature=1.0, backend="triton")
    assert one.logprobs[0] == s.raw_logprobs[4]
