"""token_logprobs under the sampler's truncated distribution (top_k / top_p / min_p): the
float64 reference for every filter combination and tie case, bitwise agreement with
rlkern.sample's processed (and raw) log-probs on the CPU kernel, gradients (gradcheck of the
reference, the kernels against its closed form), batch invariance and the errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rlkern
from rlkern.reference.sample import filtered_probs
from rlkern.reference.truncated_logprobs import (
    truncated_logprobs_grad_reference,
    truncated_logprobs_reference,
)

FILTERS = [dict(top_k=5), dict(top_p=0.8), dict(min_p=0.1), dict(top_k=6, top_p=0.7),
           dict(top_k=6, min_p=0.05), dict(top_p=0.85, min_p=0.02),
           dict(top_k=8, top_p=0.75, min_p=0.03),
           dict(top_k=8, top_p=0.75, min_p=0.03, filter_order="joint"),
           dict(top_k=4, top_p=0.5, filter_order="joint"), dict(top_p=1.0), dict(top_k=1)]


def _seeds(n):
    return torch.arange(n) * 7919 + 3, torch.arange(n) % 5


def _lp(x, y, backend="cpu", **kw):
    return rlkern.token_logprobs(x, y, backend=backend, return_entropy=True, **kw)


@pytest.mark.parametrize("opts", FILTERS, ids=str)
def test_matches_float64_reference(opts):
    """Every filter combination: logprobs / entropy / lse within the fp32 tolerance of the
    float64 reference, −inf exactly where the label is outside the kept set."""
    torch.manual_seed(0)
    x = torch.randn(7, 61) * 2.5
    y = torch.randint(0, 61, (7,))
    got = _lp(x, y, temperature=0.8, **opts)
    ref = truncated_logprobs_reference(x, y, temperature=0.8, **opts)
    kept = torch.stack([filtered_probs(x[r], temperature=0.8, **opts)[y[r]] > 0
                        for r in range(7)])
    assert torch.equal(torch.isfinite(got.logprobs), kept)
    assert torch.isneginf(got.logprobs[~kept]).all()
    for f in ("logprobs", "entropy", "lse"):
        torch.testing.assert_close(getattr(got, f).double(), ref[f], rtol=1e-5, atol=2e-5,
                                   msg=f)
    # The torch backend is the reference itself.
    tb = _lp(x.double(), y, backend="torch", temperature=0.8, **opts)
    torch.testing.assert_close(tb.logprobs, ref["logprobs"].double())


def test_filters_off_and_kept_mass():
    """With every filter off the truncated log-prob is the plain one; under top-p the kept
    set's probabilities sum to 1 (renormalised)."""
    torch.manual_seed(1)
    x = torch.randn(3, 40)
    y = torch.randint(0, 40, (3,))
    plain = rlkern.token_logprobs(x, y, return_entropy=True)
    off = _lp(x, y, top_p=1.0, top_k=40, min_p=0.0)
    torch.testing.assert_close(off.logprobs, plain.logprobs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(off.entropy, plain.entropy, rtol=1e-5, atol=1e-6)
    allv = torch.arange(40).repeat(3, 1)
    lp = _lp(x[:, None, :].expand(3, 40, 40), allv, top_p=0.7).logprobs
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(3), rtol=1e-5, atol=1e-6)


def test_ties():
    """Ties at the threshold are kept in index order, as the sampler keeps them."""
    x = torch.zeros(1, 10)
    x[0, :6] = 1.0  # six tokens tied at the top
    y = torch.arange(10)[None].T.reshape(10, 1)
    rows = x.expand(10, 10)
    for opts, n_kept in ((dict(top_k=3), 3), (dict(top_p=0.4), None), (dict(min_p=0.5), 6)):
        lp = _lp(rows, y.reshape(10), **opts).logprobs
        ref = truncated_logprobs_reference(rows, y.reshape(10), **opts)["logprobs"]
        assert torch.equal(torch.isfinite(lp), torch.isfinite(ref)), opts
        kept = torch.isfinite(lp).nonzero().reshape(-1).tolist()
        assert kept == list(range(len(kept))), opts  # the lower indices
        if n_kept is not None:
            assert len(kept) == n_kept
    lp = _lp(rows, y.reshape(10), top_k=3).logprobs
    torch.testing.assert_close(lp[:3], torch.full((3,), -torch.log(torch.tensor(3.0))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16,
                                   torch.float64])
@pytest.mark.parametrize("opts", [dict(top_p=0.9), dict(top_k=20, min_p=0.05),
                                  dict(top_k=30, top_p=0.8, filter_order="joint")], ids=str)
def test_bitwise_equal_to_sampler(dtype, opts):
    """token_logprobs(same filters).logprobs == sample(...).processed_logprobs of the drawn
    tokens bit for bit, and the unfiltered token_logprobs == raw_logprobs, at several batch
    sizes and row positions (batch invariance)."""
    torch.manual_seed(2)
    V = 3001
    x = (torch.randn(9, V) * 3).to(dtype)
    seeds, steps = _seeds(9)
    for T, raw_t in ((0.7, True), (1.3, False), (1.0, True)):
        s = rlkern.sample(x, temperature=T, seeds=seeds, steps=steps, raw_temperature=raw_t,
                          backend="cpu", **opts)
        t = rlkern.token_logprobs(x, s.tokens, temperature=T, backend="cpu", **opts)
        assert torch.equal(t.logprobs.float(), s.processed_logprobs)
        for ent in (False, True):
            plain = rlkern.token_logprobs(x, s.tokens, temperature=T if raw_t else 1.0,
                                          return_entropy=ent, backend="cpu")
            assert torch.equal(plain.logprobs.float(), s.raw_logprobs)
        # Row 4 alone, at another position of another batch, in a (B, L, V) layout.
        for sub in (x[4:5], x[[2, 4, 0]], x[torch.tensor([4] * 5)].reshape(1, 5, V)):
            lab = torch.full(sub.shape[:-1], int(s.tokens[4]))
            t2 = rlkern.token_logprobs(sub, lab, temperature=T, backend="cpu", **opts)
            r = (t2.logprobs.reshape(-1) == t.logprobs[4]).nonzero()
            assert r.numel() >= 1
            assert t2.logprobs.reshape(-1)[1 if sub.shape[0] == 3 else 0] == t.logprobs[4]


def test_per_row_tensors_and_layouts():
    """Per-row filter tensors ((N,) or logits.shape[:-1]) give each row its own filters; strided
    (B, L, V) views are read in place."""
    torch.manual_seed(3)
    store = torch.randn(2, 5, 50)
    x = store[:, :-1, :]  # TRL's logits[:, :-1, :]
    y = torch.randint(0, 50, (2, 4))
    k = torch.tensor([[3, 50, 7, 1], [10, 2, 50, 4]])
    p = torch.tensor([[0.9, 0.5, 1.0, 0.3], [0.7, 1.0, 0.95, 0.6]], dtype=torch.float64)
    got = _lp(x, y, top_k=k, top_p=p)
    flat = _lp(x.reshape(8, 50), y.reshape(8), top_k=k.reshape(8), top_p=p.reshape(8))
    assert torch.equal(got.logprobs.reshape(8), flat.logprobs)
    for r in range(8):
        one = _lp(x.reshape(8, 50)[r:r + 1], y.reshape(8)[r:r + 1], top_k=int(k.reshape(8)[r]),
                  top_p=float(p.reshape(8)[r]))
        assert torch.equal(one.logprobs, flat.logprobs[r:r + 1])


def test_ignore_index_and_bad_rows():
    x = torch.randn(4, 20)
    y = torch.tensor([3, -100, 5, 7])
    out = _lp(x, y, top_p=0.9)
    assert out.logprobs[1] == 0 and out.entropy[1] == 0 and out.lse[1] == 0
    x[2, 4] = float("nan")
    out = _lp(x, y, top_p=0.9)
    assert out.logprobs[2].isnan() and out.lse[2].isnan()
    x[3] = float("-inf")
    with pytest.raises(ValueError, match="all -inf"):
        _lp(x, y, top_p=0.9)


# ---------------------------------------------------------------------------------------------
# Gradients


def test_gradcheck_reference_and_closed_form():
    """gradcheck of the float64 reference (kept set fixed within the step), and its autograd
    against the closed form the kernels implement."""
    torch.manual_seed(4)
    x = (torch.randn(4, 12, dtype=torch.float64) * 2).requires_grad_(True)
    y = torch.tensor([0, 3, 5, 11])
    for opts in ({"top_p": 0.8}, {"top_k": 5, "min_p": 0.05}, {"top_k": 6, "top_p": 0.6,
                                                               "filter_order": "joint"}):
        ref = truncated_logprobs_reference(x.detach(), y, temperature=0.9, **opts)
        y_in = torch.where(torch.isfinite(ref["logprobs"]), y, -100)  # labels in K

        def f(x, opts=opts, y_in=y_in):
            r = truncated_logprobs_reference(x, y_in, temperature=0.9, **opts)
            return r["logprobs"], r["entropy"], r["lse"]

        torch.autograd.gradcheck(f, (x,), eps=1e-7, atol=1e-6)
        g = [torch.randn(4, dtype=torch.float64) for _ in range(3)]
        r = truncated_logprobs_reference(x, y, temperature=0.9, **opts)
        lp = torch.where(torch.isfinite(r["logprobs"]), r["logprobs"], 0.0)
        (auto,) = torch.autograd.grad((lp * g[0] + r["entropy"] * g[1] + r["lse"] * g[2]).sum(),
                                      x)
        closed = truncated_logprobs_grad_reference(x, y, *g, temperature=0.9, **opts)
        torch.testing.assert_close(closed, auto)
    # The public op with the torch backend is differentiable through the closed form.
    torch.autograd.gradcheck(
        lambda x: _lp(x, torch.tensor([0, 1, 2, 3]), backend="torch", top_p=0.99).entropy,
        (x,), eps=1e-7, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_backward_matches_closed_form(dtype):
    torch.manual_seed(5)
    x = (torch.randn(6, 300) * 2).to(dtype)
    s = rlkern.sample(x, temperature=0.8, top_p=0.85, top_k=40, seeds=torch.arange(6),
                      steps=torch.zeros(6, dtype=torch.long))
    y = s.tokens.clone()
    y[1] = int(torch.argmin(x[1].float()))  # a label outside the kept set: no gradient term
    xx = x.clone().requires_grad_(True)
    out = _lp(xx, y, temperature=0.8, top_p=0.85, top_k=40)
    g = [torch.randn(6) for _ in range(3)]
    lp = torch.where(torch.isfinite(out.logprobs), out.logprobs, 0.0)
    (lp * g[0] + out.entropy * g[1] + out.lse * g[2]).sum().backward()
    closed = truncated_logprobs_grad_reference(x, y, *g, temperature=0.8, top_p=0.85, top_k=40)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(xx.grad.double(), closed, **tol)
    # Zero outside the kept set when only the log-prob is differentiated.
    xx.grad = None
    out = _lp(xx, y, temperature=0.8, top_p=0.85, top_k=40)
    torch.where(torch.isfinite(out.logprobs), out.logprobs, 0.0).sum().backward()
    q = torch.stack([filtered_probs(x[r], temperature=0.8, top_p=0.85, top_k=40)
                     for r in range(6)])
    assert (xx.grad[q == 0] == 0).all()
    assert (xx.grad[1] == 0).all()


# ---------------------------------------------------------------------------------------------
# Errors (the sampler's messages) and registration


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(top_p=0.0), ValueError, r"top_p must lie in \(0.0, 1.0\]"),
    (dict(top_p=1.5), ValueError, "top_p must lie in"),
    (dict(top_k=0), ValueError, r"top_k must lie in \[1, inf\]"),
    (dict(min_p=-0.1), ValueError, r"min_p must lie in \[0.0, 1.0\]"),
    (dict(top_k=2.5), TypeError, "top_k: expected an int"),
    (dict(top_k=torch.tensor([1.0, 2.0])), TypeError, "top_k: expected an integer tensor"),
    (dict(top_p=torch.tensor([0.5, 0.6, 0.7])), ValueError, r"top_p: a per-row tensor"),
    (dict(top_p=torch.tensor([0.5, float("nan")])), ValueError, "top_p must lie in"),
    (dict(top_p=0.9, filter_order="nucleus"), ValueError, "filter_order must be one of"),
    (dict(top_p=0.9, return_stats=True), ValueError, "return_stats is not available"),
])
def test_bad_inputs(kw, exc, msg):
    x = torch.randn(2, 10)
    y = torch.tensor([1, 2])
    with pytest.raises(exc, match=msg):
        rlkern.token_logprobs(x, y, **kw)
    sample_kw = {k: v for k, v in kw.items() if k != "return_stats"}
    if "return_stats" not in kw:  # the sampler refuses the same values with the same message
        with pytest.raises(exc, match=msg):
            rlkern.sample(x, seeds=torch.arange(2), steps=torch.zeros(2, dtype=torch.long),
                          **sample_kw)


def test_opcheck_and_compile():
    import rlkern.ops.truncated_logprobs

    x = torch.randn(1, 3, 17)
    y = torch.tensor([1, 5, 16])
    T = torch.full((3,), 0.9, dtype=torch.float64)
    p = torch.full((3,), 0.8, dtype=torch.float64)
    torch.library.opcheck(torch.ops.rlkern.truncated_logprobs_fwd.default,
                          (x, y, T, None, p, None, False, -100, True, "cpu"))
    g = torch.ones(3)
    torch.library.opcheck(torch.ops.rlkern.truncated_logprobs_bwd.default,
                          (x, y, T, None, p, None, False, -100, g, None, None, "cpu"))

    @torch.compile(fullgraph=True, backend="eager")
    def f(x, y):
        return rlkern.token_logprobs(x, y, top_p=0.8, temperature=0.9).logprobs

    assert torch.equal(f(x[0], y), rlkern.token_logprobs(x[0], y, top_p=0.8,
                                                          temperature=0.9).logprobs)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(V=st.sampled_from([1, 2, 5, 33, 257]), n=st.integers(1, 4),
       k=st.one_of(st.none(), st.integers(1, 40)),
       p=st.one_of(st.none(), st.floats(0.05, 1.0)),
       mp=st.one_of(st.none(), st.floats(0.0, 1.0)), joint=st.booleans(),
       T=st.sampled_from([0.3, 1.0, 2.0]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**31 - 1))
def test_property_sampler_agreement(V, n, k, p, mp, joint, T, dtype, seed):
    """For any filters: the drawn token is always kept (finite log-prob), the log-probs equal
    the sampler's processed ones bit for bit, and they match the float64 reference."""
    if k is None and p is None and mp is None:
        p = 0.9
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, V, generator=gen) * 3).to(dtype)
    if V > 2:
        x[:, 1] = x[:, 0]  # a tie
    opts = dict(top_k=k, top_p=p, min_p=mp, filter_order="joint" if joint else "top_k_first")
    seeds, steps = _seeds(n)
    s = rlkern.sample(x, temperature=T, seeds=seeds, steps=steps, **opts)
    out = rlkern.token_logprobs(x, s.tokens, temperature=T, return_entropy=True, **opts)
    assert torch.isfinite(out.logprobs).all()
    assert torch.equal(out.logprobs, s.processed_logprobs)
    ref = truncated_logprobs_reference(x, s.tokens, temperature=T, **opts)
    torch.testing.assert_close(out.logprobs.double(), ref["logprobs"], rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(out.entropy.double(), ref["entropy"], rtol=1e-5, atol=5e-5)


def test_all_filter_combinations_small():
    """Each subset of {top_k, top_p, min_p} × both orders against the reference."""
    torch.manual_seed(6)
    x = torch.randn(5, 23) * 2
    y = torch.randint(0, 23, (5,))
    values = dict(top_k=7, top_p=0.7, min_p=0.08)
    for r in range(1, 4):
        for names in itertools.combinations(values, r):
            for order in ("top_k_first", "joint"):
                opts = {n: values[n] for n in names} | {"filter_order": order}
                got = _lp(x, y, **opts)
                ref = truncated_logprobs_reference(x, y, **opts)
                torch.testing.assert_close(got.logprobs.double(), ref["logprobs"], rtol=1e-5,
                                           atol=2e-5, msg=str(opts))
