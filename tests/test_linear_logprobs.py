"""linear_logprobs / linear_logprobs_with_grad against token_logprobs on materialised logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import rlkern
from conftest import GRAD_TOL, assert_close_rows
from rlkern.ops.linear_logprobs import LinearTiling
from rlkern.reference import linear_logprobs_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def make(n=37, hidden=48, vocab=1000, dtype=torch.float32, bias=True, ignore=(3,)):
    h = torch.randn(n, hidden, dtype=torch.float64).to(dtype)
    w = (torch.randn(vocab, hidden, dtype=torch.float64) * 0.3).to(dtype)
    b = torch.randn(vocab, dtype=torch.float64).to(dtype) if bias else None
    y = torch.randint(0, vocab, (n,))
    for i in ignore:
        y[i] = -100
    return h, w, b, y


def grads_of(fn, *tensors):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    loss = out["logprobs"].sum() * 0.7 + out["entropy"].sum() * 0.3 + out["lse"].sum() * 0.1
    loss.backward()
    return out, [None if t is None else t.grad for t in leaves]


def assert_grad(actual, expected, dtype, what):
    rtol, _ = GRAD_TOL[dtype]
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol,
                               atol=rtol * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk,vocab_tile", [(2048, 1000), (5, 300), (1, 1000), (16, 999)])
def test_matches_materialised_logits(dtype, bias, chunk, vocab_tile):
    """Same bf16 rounding of the logits as F.linear, so even bf16 agrees to fp32 accuracy."""
    h, w, b, y = make(dtype=dtype, bias=bias)

    def fused(h, w, b):
        lp, lse, ent = torch.ops.rlkern.linear_logprobs_fwd(h, w, y, b, 0.8, -100, True, chunk,
                                                           vocab_tile, "", "cpu")
        return {"logprobs": lp, "lse": lse, "entropy": ent}

    def eager(h, w, b):
        out = rlkern.token_logprobs(F.linear(h, w, b), y, temperature=0.8, return_entropy=True)
        return out._asdict()

    out, g = grads_of(fused, h, w, b)
    ref, g_ref = grads_of(eager, h, w, b)
    for key in ("logprobs", "lse", "entropy"):
        assert_close_rows(out[key], ref[key], torch.float32 if dtype != torch.float64 else dtype,
                          key)
    for name, a, e in zip(("hidden", "weight", "bias"), g, g_ref, strict=True):
        if e is not None:
            assert a.dtype == dtype
            assert_grad(a, e, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_api_3d_against_float64_truth(dtype):
    h, w, b, y = make(n=24, dtype=dtype)
    h3, y3 = h.view(4, 6, -1), y.view(4, 6)
    out = rlkern.linear_logprobs(h3, w, y3, bias=b, temperature=1.3, return_entropy=True)
    assert out.logprobs.shape == (4, 6) and out.self_certainty is None
    # Judged in float64 on the same rounded logits that the lm_head would produce.
    logits = F.linear(h3, w, b).double()
    truth = linear_logprobs_reference(logits, torch.eye(logits.shape[-1], dtype=torch.float64),
                                      y3, temperature=1.3)
    assert_close_rows(out.logprobs, truth["logprobs"], dtype, "logprobs")
    assert_close_rows(out.entropy, truth["entropy"], dtype, "entropy")


def test_no_grad_forward_and_ignore_rows():
    h, w, b, y = make(ignore=(0, 5))
    with torch.no_grad():
        out = rlkern.linear_logprobs(h, w, y, bias=b, return_entropy=True)
    assert not out.logprobs.requires_grad
    assert torch.all(out.logprobs[[0, 5]] == 0) and torch.all(out.entropy[[0, 5]] == 0)
    hh = h.clone().requires_grad_()
    rlkern.linear_logprobs(hh, w, y, bias=b).logprobs.sum().backward()
    assert torch.all(hh.grad[[0, 5]] == 0) and torch.all(hh.grad[1].abs() > 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk", [None, 7])
def test_with_grad_matches_autograd(dtype, chunk):
    h, w, b, y = make(dtype=dtype)
    g_lp = torch.randn(37)
    g_ent = torch.randn(37)
    res = rlkern.linear_logprobs_with_grad(h, w, y, bias=b, grad_logprobs=g_lp,
                                           grad_entropy=g_ent, return_entropy=True,
                                           temperature=0.9, chunk_size=chunk)
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    ref = rlkern.token_logprobs(F.linear(*leaves), y, temperature=0.9, return_entropy=True)
    ((ref.logprobs * g_lp).sum() + (ref.entropy * g_ent).sum()).backward()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert_close_rows(res.outputs.logprobs, ref.logprobs, acc, "logprobs")
    assert_close_rows(res.outputs.entropy, ref.entropy, acc, "entropy")
    # The weight gradient is accumulated over row chunks in float32 from bf16 partial
    # products, the materialised path in one matmul: one extra bf16 rounding per chunk.
    for name, got, leaf in zip(("hidden", "weight", "bias"),
                               (res.grad_hidden, res.grad_weight, res.grad_bias), leaves,
                               strict=True):
        assert got.dtype == dtype
        assert_grad(got, leaf.grad, dtype, name)


def test_with_grad_without_entropy_grad():
    h, w, _, y = make(bias=False)
    res = rlkern.linear_logprobs_with_grad(h, w, y, grad_logprobs=torch.ones(37))
    assert res.grad_bias is None and res.outputs.entropy is None
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    rlkern.token_logprobs(hh @ ww.T, y).logprobs.sum().backward()
    torch.testing.assert_close(res.grad_hidden, hh.grad)
    torch.testing.assert_close(res.grad_weight, ww.grad)


def test_gradcheck_float64():
    h, w, b, y = make(n=5, hidden=4, vocab=9, dtype=torch.float64, ignore=(2,))

    def fn(h, w, b):
        lp, lse, ent = torch.ops.rlkern.linear_logprobs_fwd(h, w, y, b, 0.7, -100, True, 2, 4,
                                                           "", "cpu")
        return lp, lse, ent

    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in (h, w, b)))


def test_bad_inputs():
    h, w, b, y = make()
    with pytest.raises(ValueError, match=r"weight must have shape \(V, H\) with H = "):
        rlkern.linear_logprobs(h, w[:, :5], y)
    with pytest.raises(ValueError, match=r"weight must have shape \(V, H\)"):
        rlkern.linear_logprobs(h, w.view(10, 100, 48), y)
    with pytest.raises(ValueError, match=r"bias must have shape \(V,\)"):
        rlkern.linear_logprobs(h, w, y, bias=b[:10])
    with pytest.raises(TypeError, match="weight dtype"):
        rlkern.linear_logprobs(h, w.double(), y)
    with pytest.raises(ValueError, match="labels must have shape"):
        rlkern.linear_logprobs(h, w, y[:3])
    with pytest.raises(ValueError, match=r"labels: value 1000 at flat position 4"):
        y2 = y.clone()
        y2[4] = 1000
        rlkern.linear_logprobs(h, w, y2)
    with pytest.raises(ValueError, match="temperature"):
        rlkern.linear_logprobs(h, w, y, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        rlkern.linear_logprobs(h, w, y, chunk_size=0)
    with pytest.raises(ValueError, match="grad_logprobs must have shape"):
        rlkern.linear_logprobs_with_grad(h, w, y, grad_logprobs=torch.ones(3))


def test_empty_input():
    h = torch.randn(0, 8, requires_grad=True)
    out = rlkern.linear_logprobs(h, torch.randn(10, 8), torch.zeros(0, dtype=torch.long),
                                 return_entropy=True)
    assert out.logprobs.shape == (0,)
    out.logprobs.sum().backward()
    assert h.grad.shape == (0, 8)


def test_opcheck_and_compile():
    h, w, b, y = make(n=6, hidden=8, vocab=50)
    torch.library.opcheck(torch.ops.rlkern.linear_logprobs_fwd.default,
                          (h.requires_grad_(), w, y, b, 1.0, -100, True, 4, 16, "", "cpu"))
    out = torch.ops.rlkern.linear_logprobs_fwd(h, w, y, b, 1.0, -100, True, 4, 16, "", "cpu")
    g = torch.randn(6)
    lse, ent = out[1].detach(), out[2].detach()
    torch.library.opcheck(torch.ops.rlkern.linear_logprobs_bwd.default,
                          (h.detach(), w, y, b, lse, ent, g, g, None, 1.0, -100, 4, 16, "", "cpu"))
    torch.library.opcheck(torch.ops.rlkern.linear_logprobs_fwd_bwd.default,
                          (h.detach(), w, y, b, g, g, 1.0, -100, True, 4, "", "cpu"))

    def step(h):
        out = rlkern.linear_logprobs(torch.tanh(h), w, y, bias=b, return_entropy=True)
        return out.logprobs.sum() + out.entropy.mean()

    torch._dynamo.reset()
    x1 = h.detach().clone().requires_grad_()
    torch.compile(step, fullgraph=True)(x1).backward()
    x2 = h.detach().clone().requires_grad_()
    step(x2).backward()
    torch.testing.assert_close(x1.grad, x2.grad)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 100_000), vocab=st.integers(1, 300_000), unit=st.sampled_from([1, 7, 256]))
def test_fused_rows_splits_evenly_within_the_cap(n, vocab, unit):
    """The one-pass chunking: the fewest chunks of at most the cap (in whole units), all equal
    but the last, which is short of the others by less than one unit per chunk."""
    cap = LinearTiling.fused_rows(vocab)
    rows = LinearTiling.fused_rows(vocab, n=n, unit=unit)
    units = -(-n // unit)
    assert rows % unit == 0
    if unit <= cap:
        assert rows <= cap
        assert -(-units // (rows // unit)) == -(-units // max(1, cap // unit))  # fewest chunks
    chunks = -(-n // rows)
    assert n - (chunks - 1) * rows > rows - chunks * unit  # the tail is nearly full
    assert LinearTiling.fused_rows(vocab, chunk_size=5, n=n, unit=unit) == 5


def test_fused_rows_at_the_benchmark_shape():
    # 2048 rows at V = 151936: two chunks of 1024, not 1766 + 282.
    assert LinearTiling.fused_rows(151936, n=2048) == 1024
    assert LinearTiling.fused_rows(151936, n=2048, unit=256) == 1024
