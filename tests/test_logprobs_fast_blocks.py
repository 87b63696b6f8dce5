"""The CPU row kernels' fast paths give the bits of their exact ones.

**The fold's two block paths** (csrc/cpu/logprobs_row.h, ``kFast``).

A block of finite logits whose max is not ±0 takes the fast path: the max of 16-bit logits taken
as integers, and 2^x without the clamp that only −inf needs. Any other block (a −inf, NaN or
+inf logit, a zero max) is redone on the exact path. Both must give the same sums.

−inf, and a finite logit far below the rest of its row (−1e30; −6e4 in fp16), each add exactly
0 to every sum behind the logprobs, the entropy, the lse and Σp². So a row holding −inf at some
positions (its blocks redone exactly) and the same row holding the far value there (fast) must
agree bit for bit. Self-certainty is left out: its Σ(x − c) sees the −inf itself.

**The bf16 store** (csrc/cpu/simd.h, ``VecF::store``): one conversion instruction, except for
vectors holding a subnormal or a NaN, which it would flush to 0 or keep the sign of. A bf16
backward forms the float32 gradient a float32 backward forms and rounds it, so it must equal
that gradient rounded by torch, subnormals included.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rlkern
from conftest import assert_close_rows, bits
from rlkern.reference import token_logprobs_reference

FAR = {torch.bfloat16: -1e30, torch.float16: -6e4, torch.float32: -1e30}
FIELDS = ("logprobs", "entropy", "lse", "sum_p_sq")


def _pair(dtype: torch.dtype, rows: int, vocab: int, seed: int, holes: int):
    """The same logits twice, one with −inf at `holes` random positions a row, the other with
    FAR[dtype] there; labels away from those positions."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, vocab, generator=gen) * 4).to(dtype)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    pos = torch.randint(0, vocab, (rows, holes), generator=gen)
    pos = torch.where(pos == labels[:, None], (pos + 1) % vocab, pos)
    with_inf, with_far = x.clone(), x.clone()
    with_inf.scatter_(1, pos, float("-inf"))
    with_far.scatter_(1, pos, FAR[dtype])
    return with_inf, with_far, labels


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("vocab", [17, 4096, 4096 * 2 + 37, 151936])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_exact_and_fast_blocks_agree_bitwise(dtype, vocab, temperature):
    with_inf, with_far, labels = _pair(dtype, 6, vocab, vocab * 31 + int(temperature * 10), 3)
    kw = dict(temperature=temperature, return_entropy=True, return_stats=True, backend="cpu")
    a = rlkern.token_logprobs(with_inf, labels, **kw)
    b = rlkern.token_logprobs(with_far, labels, **kw)
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert torch.isfinite(x).all(), name
        assert torch.equal(bits(x), bits(y)), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_sampler_blocks_agree_bitwise(dtype):
    """The sampler's fold (kept-set search) through both paths: the same tokens and logprobs."""
    with_inf, with_far, _ = _pair(dtype, 8, 4096 * 3 + 5, 5, 5)
    seeds, steps = torch.arange(8), torch.zeros(8, dtype=torch.long)
    for filters in ({}, {"top_k": 50}, {"top_p": 0.9}, {"min_p": 0.05}):
        kw = dict(temperature=0.7, seeds=seeds, steps=steps, return_entropy=True, backend="cpu",
                  **filters)
        a, b = rlkern.sample(with_inf, **kw), rlkern.sample(with_far, **kw)
        assert torch.equal(a.tokens, b.tokens), filters
        for name in ("raw_logprobs", "processed_logprobs", "entropy"):
            assert torch.equal(bits(getattr(a, name)), bits(getattr(b, name))), (filters, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_zero_max_blocks_match_the_reference(dtype):
    """Rows whose max is +0 or −0 (the integer max's one tie) take the exact path."""
    gen = torch.Generator().manual_seed(3)
    x = -(torch.rand(4, 5000, generator=gen) * 6)
    x[0, 7] = 0.0
    x[1, 9] = -0.0
    x[2, ::3] = 0.0
    x[3, ::2] = -0.0
    x[3, 1::4] = 0.0
    x = x.to(dtype)
    labels = torch.tensor([7, 9, 0, 1])
    out = rlkern.token_logprobs(x, labels, return_entropy=True, backend="cpu")
    ref = token_logprobs_reference(x.double(), labels)
    for field in ("logprobs", "entropy"):  # the logits are exact in float64: fp32 sums only
        torch.testing.assert_close(getattr(out, field).double(), ref[field], rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_bf16_gradient_rounds_subnormals_as_torch_does(temperature):
    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(4, 5000, generator=gen) * 30).to(torch.bfloat16)  # spreads of ~200 nats
    labels = torch.randint(0, 5000, (4,), generator=gen)

    def grad(logits: torch.Tensor) -> torch.Tensor:
        z = logits.detach().clone().requires_grad_()
        out = rlkern.token_logprobs(z, labels, temperature=temperature, return_entropy=True,
                                    backend="cpu")
        (out.logprobs.sum() + 0.5 * out.entropy.sum()).backward()
        return z.grad

    g16, g32 = grad(x), grad(x.float())
    subnormal = (g32 != 0) & (g32.abs() < torch.finfo(torch.float32).tiny)
    assert subnormal.sum() > 100  # the case the conversion instruction would flush
    assert torch.equal(bits(g16), bits(g32.to(torch.bfloat16)))


SPECIALS = [float("-inf"), float("inf"), float("nan"), 0.0, -0.0, 1e30, -1e30]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
       vocab=st.sampled_from([5, 16, 4096, 4097, 8192 + 33]),
       seed=st.integers(0, 2**31 - 1),
       specials=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2**31 - 1),
                                   st.sampled_from(SPECIALS)), max_size=12),
       zero_max_row=st.booleans(),
       temperature=st.sampled_from([1.0, 0.6]))
def test_rows_with_special_values_match_the_reference(dtype, vocab, seed, specials,
                                                      zero_max_row, temperature):
    """Whatever mix of blocks takes which path, each row agrees with the float64 reference
    (NaN where it is NaN); the label's logit stays finite."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, vocab, generator=gen) * 3
    labels = torch.randint(0, vocab, (4,), generator=gen)
    if zero_max_row:
        x[0] = -x[0].abs()
        x[0, (int(labels[0]) + 1) % vocab] = 0.0
    for row, pos, value in specials:
        if pos % vocab != int(labels[row]):
            x[row, pos % vocab] = value
    if dtype == torch.float16:
        big = torch.isfinite(x) & (x.abs() > 6e4)
        x = torch.where(big, x.sign() * 6e4, x)  # ±1e30 → ±6e4 (inf in fp16)
    x = x.to(dtype)
    out = rlkern.token_logprobs(x, labels, temperature=temperature, return_entropy=True,
                                return_stats=True, backend="cpu")
    ref = token_logprobs_reference(x.double(), labels, temperature=temperature)
    for field in ("logprobs", "entropy", "lse", "sum_p_sq"):
        assert_close_rows(getattr(out, field), ref[field], dtype, field)
