"""rlkern.sample on edge inputs, on every backend (cpu, torch, triton in the interpreter): its
outputs never require grad; finite rows are sampled at any magnitude and temperature; rows that
cannot be sampled raise (checks on) or give token −1 and NaN (checks off); tensor arguments
without data (meta) are refused clearly. docs/sampling.md states these behaviours.
"""

from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import rlkern
from conftest import bits
from rlkern.reference.sample import filtered_probs

BACKENDS = ["cpu", "torch", "triton"]

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _sample(logits, backend, **kw):
    if backend == "triton":
        pytest.importorskip("triton")
    n = logits.shape[0] if kw.get("indices") is None else kw["indices"].numel()
    kw.setdefault("seeds", torch.arange(n))
    kw.setdefault("steps", torch.zeros(n, dtype=torch.long))
    return rlkern.sample(logits, return_entropy=True, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_do_not_require_grad(backend):
    """Sampling is not differentiable: with logits (or a temperature tensor) requiring grad the
    outputs required grad too, and a backward then failed deep inside autograd."""
    logits = torch.randn(3, 9, requires_grad=True)
    temperature = torch.full((3,), 0.7, requires_grad=True)
    out = _sample(logits, backend, temperature=temperature, top_p=0.9)
    for name in ("tokens", "raw_logprobs", "processed_logprobs", "entropy"):
        assert not getattr(out, name).requires_grad, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["bf16 finfo.min", "one logit 1e10", "temperature 1e-10",
                                  "constant -1e10", "huge lse", "float64 finfo.min",
                                  "float64 beyond float"])
def test_finite_rows_are_sampled_at_any_magnitude(backend, case):
    """z = (x − max x) / T: finite rows never overflow into a "NaN" or "all -inf" error."""
    temperature = 1.0
    if case == "bf16 finfo.min":
        logits = torch.full((2, 9), torch.finfo(torch.bfloat16).min, dtype=torch.bfloat16)
        temperature = 0.3
    elif case == "one logit 1e10":
        logits = torch.randn(2, 9)
        logits[:, 4] = 1e10
    elif case == "temperature 1e-10":
        logits = torch.tensor([[0.0, 1.0, 3.0, 2.0, -1.0]] * 2)
        temperature = 1e-10
    elif case == "constant -1e10":
        logits = torch.full((2, 9), -1e10)
    elif case == "float64 finfo.min":  # beyond the float range: shifted in float64 first
        logits = torch.full((2, 9), torch.finfo(torch.float64).min, dtype=torch.float64)
    elif case == "float64 beyond float":
        logits = torch.tensor([[1e300, 1e300 - 1e290, -1e300]] * 2, dtype=torch.float64)
        temperature = 1e290
    else:  # lse = 3e38 / 1e-10 leaves the float range: the row is still fine
        logits = torch.tensor([[3e38, 0.0, -3e38]] * 2)
        temperature = 1e-10
    out = _sample(logits, backend, temperature=temperature)
    assert ((out.tokens >= 0) & (out.tokens < logits.shape[1])).all()
    for name in ("raw_logprobs", "processed_logprobs", "entropy"):
        assert torch.isfinite(getattr(out, name)).all(), name
    if case in ("one logit 1e10", "temperature 1e-10", "huge lse"):
        expected = {"one logit 1e10": 4, "temperature 1e-10": 2, "huge lse": 0}[case]
        assert out.tokens.tolist() == [expected] * 2
        assert out.raw_logprobs.tolist() == [0.0, 0.0]
    elif case == "float64 beyond float":  # z = (0, −1, −2e10): p = (e/(1 + e), 1/(1 + e), 0)
        assert set(out.tokens.tolist()) <= {0, 1}
        torch.testing.assert_close(out.entropy, torch.full((2,), 0.5822031), rtol=1e-5,
                                   atol=1e-6)
    else:  # equal logits: uniform
        torch.testing.assert_close(out.raw_logprobs, torch.full((2,), -math.log(9)))
        torch.testing.assert_close(out.entropy, torch.full((2,), math.log(9)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_unsampleable_rows_with_checks_off_give_token_minus_one(backend):
    """NaN, +inf or all −inf rows: token −1 and NaN logprobs and entropy, on every backend
    (the torch backend raised an IndexError)."""
    logits = torch.randn(4, 6)
    logits[0, 2] = float("nan")
    logits[1] = float("-inf")
    logits[2, 5] = float("inf")
    with pytest.raises(ValueError, match="row 0 contains NaN"):
        _sample(logits, backend)
    with pytest.raises(ValueError, match="row 0 is all -inf"):
        _sample(logits[1:], backend)
    with pytest.raises(ValueError, match="row 0 contains NaN"):
        _sample(logits[2:], backend)
    rlkern.set_checks(False)
    try:
        out = _sample(logits, backend, top_k=3)
    finally:
        rlkern.set_checks(True)
    assert out.tokens[:3].tolist() == [-1, -1, -1] and 0 <= int(out.tokens[3]) < 6
    for name in ("raw_logprobs", "processed_logprobs", "entropy"):
        values = getattr(out, name)
        assert torch.isnan(values[:3]).all() and torch.isfinite(values[3]), name


@pytest.mark.parametrize("name", ["seeds", "steps", "indices", "temperature", "top_p"])
def test_meta_tensor_arguments_are_refused_clearly(name):
    logits = torch.randn(2, 5)
    kw = {"seeds": torch.arange(2), "steps": torch.zeros(2, dtype=torch.long)}
    value = {"seeds": torch.arange(2), "steps": torch.zeros(2, dtype=torch.long),
             "indices": torch.arange(2), "temperature": torch.ones(2),
             "top_p": torch.full((2,), 0.5)}[name]
    kw[name] = value.to("meta")
    with pytest.raises(ValueError, match=f"{name} is on the meta device"):
        rlkern.sample(logits, **kw)


def test_rows_past_element_2_31_are_read_in_place():
    """Rows that start past element 2^31 of their storage (a strided view; the pages between
    are never touched) give the bits of the same rows stored contiguously: the sampler and the
    truncated log-probs form 64-bit row offsets. (test_logprobs.py checks token_logprobs.)"""
    vocab = 1000
    base = torch.empty(2**31 + 3 * vocab, dtype=torch.bfloat16)
    rows = (torch.randn(2, vocab, generator=torch.Generator().manual_seed(3)) * 3).bfloat16()
    far = base.as_strided((2, vocab), (2**31 + vocab, 1))
    far.copy_(rows)
    kw = {"seeds": torch.tensor([5, 6]), "steps": torch.zeros(2, dtype=torch.long),
          "top_k": 20, "top_p": 0.9, "return_entropy": True, "backend": "cpu"}
    got, want = rlkern.sample(far, **kw), rlkern.sample(rows.clone(), **kw)
    for name in got._fields:
        assert torch.equal(bits(getattr(got, name)), bits(getattr(want, name))), name
    labels = torch.tensor([int(want.tokens[0]), vocab - 1])
    got = rlkern.token_logprobs(far, labels, top_k=20, top_p=0.9, backend="cpu")
    want = rlkern.token_logprobs(rows.clone(), labels, top_k=20, top_p=0.9, backend="cpu")
    assert torch.equal(bits(got.logprobs), bits(want.logprobs))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_signed_zeros_are_one_value(backend, dtype):
    """A logit −0.0 beside a max of +0.0 is a tie, kept in index order like any other (the
    reference's stable sort). The order keys once ranked +0 above −0: where the row's max came
    out +0 (it depends on which lane holds which zero), top-k 1 kept the +0 token at a higher
    index. Rows of −3 with −0 and +0 at several lane offsets, and one row with two −0."""
    pairs = [(0, 1), (0, 9), (3, 17), (10, 40), (7, 8)]
    logits = torch.full((len(pairs) + 1, 64), -3.0)
    for r, (neg, pos) in enumerate(pairs):
        logits[r, neg], logits[r, pos] = -0.0, 0.0
    logits[-1, 10], logits[-1, 25], logits[-1, 40] = -0.0, -0.0, 0.0
    logits = logits.to(dtype)
    last = [[10], [10, 25]]
    for k in (1, 2):
        out = _sample(logits, backend, top_k=k, top_p=0.999)
        labels = torch.tensor([pos for _, pos in pairs] + [40])
        lp = rlkern.token_logprobs(logits, labels, top_k=k, top_p=0.999, backend=backend).logprobs
        for r in range(logits.shape[0]):
            kept = last[k - 1] if r == len(pairs) else list(pairs[r][:k])
            ref = filtered_probs(logits[r].double(), top_k=k, top_p=0.999) > 0
            assert ref.nonzero().flatten().tolist() == kept  # the rows are built as meant
            assert int(out.tokens[r]) in kept, (k, r, out.tokens)
            assert bool(torch.isfinite(lp[r])) == (int(labels[r]) in kept), (k, r, lp)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_tokens_whose_weight_underflows_keep_a_finite_logprob(backend, dtype):
    """A token inside the kept set whose fp32 weight exp(z) underflows to 0 (z below about
    −103) still has a finite, representable log-prob under the truncated distribution; log 0
    once made it −inf. Rows: one logit at 0 and the rest far below (−60 / T = −200), top-k 5;
    the labels 1–4 are kept, label 9 is not."""
    logits = torch.full((2, 64), -60.0)
    logits[:, 0] = 0.0
    logits[1, 3] = -58.0  # a kept token with its own z
    logits = logits.to(dtype)
    labels = torch.tensor([1, 3])
    for label_set, kept in ((labels, True), (torch.tensor([9, 9]), False)):
        lp = rlkern.token_logprobs(logits, label_set, temperature=0.3, top_k=5,
                                   backend=backend).logprobs
        for r in range(2):
            ref = filtered_probs(logits[r].double(), temperature=0.3, top_k=5)
            want = torch.log(ref[label_set[r]])
            assert bool(torch.isfinite(want)) == kept  # the rows are built as meant
            if kept:
                assert torch.isfinite(lp[r]), (r, lp)
                torch.testing.assert_close(lp[r].double(), want, rtol=1e-6, atol=0)
            else:
                assert lp[r] == float("-inf"), (r, lp)
    # and its gradient: d log q_y / d x = (onehot(y) − q) / T, q ≈ 0 off the row's max
    x = logits.float().requires_grad_()
    rlkern.token_logprobs(x.to(dtype), labels, temperature=0.3, top_k=5,
                          backend=backend).logprobs.sum().backward()
    rel = 1e-5 if dtype == torch.float32 else 4e-3  # a bf16 gradient: 8 mantissa bits
    for r in range(2):
        assert x.grad[r, labels[r]].item() == pytest.approx(1 / 0.3, rel=rel), x.grad[r]
        assert x.grad[r, 0].item() == pytest.approx(-1 / 0.3, rel=rel), x.grad[r]
