"""CPU's fused policy loss when the forward writes the gradient itself.

A linear aggregate's ∂loss/∂row_sums is known before the forward up to the upstream gradient
(rlkern.ops.policy_loss.fused.UpstreamGuess). With the rows' valid counts from
``rlkern::policy_loss_lens_out``, the forward kernel forms each token's gradient with the
backward's products; the backward then returns it (guess right) or runs the two-pass op
(guess wrong). These tests check the op against the two-pass backward op for arbitrary
coefficients, which path each backward takes, and that the bits never depend on the guess.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rlkern
from conftest import bits
from policy_loss_cases import CASES, call_kwargs, make_inputs
from rlkern.config.layout import layout
from rlkern.ops.policy_loss import fused
from rlkern.ops.policy_loss.inputs import prepare

#: The shared cases the fused path serves: token ratio mode, not gmpo / vespo.
FUSED = [name for name, case in CASES.items()
         if case.config.policy_loss not in ("gmpo", "vespo", "gspo")
         and case.config.importance_sampling_level == "token"]


@pytest.fixture
def guess(monkeypatch) -> fused.UpstreamGuess:
    """A fresh guess (1, steady) for the test, and spies on the two backward paths."""
    g = fused.UpstreamGuess()
    monkeypatch.setattr(fused, "UPSTREAM", g)
    g.calls = []  # type: ignore[attr-defined]
    for name in ("_two_pass", "_backward"):
        real = getattr(fused, name)

        def spy(*args, _real=real, _name=name):
            g.calls.append(_name)
            return _real(*args)

        monkeypatch.setattr(fused, name, spy)
    return g


def _two_pass_grad(case, inp, upstream: float, monkeypatch) -> torch.Tensor:
    """∂(upstream · loss)/∂logprobs by the two-pass path (the fused one switched off)."""
    import rlkern.ops.policy_loss.api as api

    with monkeypatch.context() as m:
        m.setattr(api, "fused_applies", lambda p: False)
        return _grad(case, inp, upstream)


def _grad(case, inp, upstream: float) -> torch.Tensor:
    args, kw = call_kwargs(case, inp)
    lp = args[0].detach().clone().requires_grad_()
    out = rlkern.policy_loss(lp, *args[1:], config=case.config, backend="cpu", **kw)
    (g,) = torch.autograd.grad(out.loss, lp, torch.tensor(upstream, dtype=out.loss.dtype))
    return g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", FUSED)
def test_a_right_guess_needs_no_backward_kernel(name, dtype, guess, monkeypatch):
    """Guess 1, upstream 1 (``loss.backward()``): the forward's gradient is returned as it is,
    with the two-pass bits (masked tokens +0 included). Losses whose aggregation is not linear
    (gvpo, batch-normalised rollout weights) keep the factors; an entropy input without a
    gradient is a linear term."""
    case = CASES[name]
    inp = make_inputs(12, 37, dtype, seed=len(name) + 1)
    got = _grad(case, inp, 1.0)
    want = _two_pass_grad(case, inp, 1.0, monkeypatch)
    assert torch.equal(bits(got), bits(want))
    linear = case.config.policy_loss != "gvpo" and not case.config.rollout_batch_normalize
    assert guess.calls == ([] if linear else ["_backward"])


def test_a_wrong_guess_takes_the_two_pass_op_then_the_factors_then_the_new_guess(
        guess, monkeypatch):
    """A trainer that scales the loss by 1/4 (gradient accumulation): the first backward
    misses the guess 1 (two-pass op), the second sees an unsteady guess (factors, scaled),
    from the third on the forward writes the gradient for 1/4. Every gradient has the
    two-pass bits."""
    case = CASES["ppo-clip-higher-dual"]
    inp = make_inputs(7, 45, torch.float32, seed=4)
    want = _two_pass_grad(case, inp, 0.25, monkeypatch)
    guess.calls.clear()
    paths = []
    for _ in range(4):
        got = _grad(case, inp, 0.25)
        assert torch.equal(bits(got), bits(want))
        paths.append(list(guess.calls))
        guess.calls.clear()
    assert paths == [["_two_pass"], ["_backward"], [], []]
    assert guess.last == 0.25 and guess.steady


def test_an_upstream_that_varies_keeps_the_factors(guess, monkeypatch):
    case = CASES["ppo"]
    inp = make_inputs(5, 30, torch.float32, seed=9)
    paths = []
    for upstream in (0.5, 0.7, 0.9, 1.1):
        got = _grad(case, inp, upstream)
        assert torch.equal(bits(got[inp["mask"]]),
                           bits(_two_pass_grad(case, inp, upstream, monkeypatch)[inp["mask"]]))
        paths.append(guess.calls[0])
        guess.calls.clear()
    assert paths == ["_two_pass", "_backward", "_backward", "_backward"]


@pytest.mark.parametrize("a, b, same", [(1.0, 1.0, True), (0.0, -0.0, False),
                                        (math.nan, math.nan, False), (0.25, 0.25, True),
                                        (1.0, 1.0000000000000002, False)])
def test_the_guess_compares_bits(a, b, same):
    """Signed zeros are told apart (a −0 upstream gives −0 coefficients); NaN never matches."""
    g = fused.UpstreamGuess()
    g.observe(a)
    g.observe(b)
    assert g.steady is same


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("value", [1.0, 0.1, 1 / 3, -0.0, 3.5e-45, -1e-46, 1e-40, 3.4028235e38,
                                   3.4028236e38, -1e39, 1e300, math.inf, -math.inf])
def test_the_guess_is_rounded_as_a_tensor_of_the_loss_dtype_holds_it(dtype, value):
    """The forward compares the upstream's ``.item()`` with the guess as the loss's dtype holds
    it: rounded to nearest even, subnormals, overflow to ±inf and signed zeros as torch's."""
    want = torch.tensor(value, dtype=torch.float64).to(dtype).item()
    got = fused._as_dtype(value, dtype)
    assert got == want and math.copysign(1.0, got) == math.copysign(1.0, want)


def _op_inputs(name: str, dtype: torch.dtype, B: int, T: int, seed: int):
    case = CASES[name]
    inp = make_inputs(B, T, dtype, seed=seed)
    args, kw = call_kwargs(case, inp)
    kw.pop("num_tokens", None)
    kw.pop("num_seqs", None)
    return prepare(*args, config=case.config, **kw)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(FUSED), f64=st.booleans(), B=st.integers(1, 5),
       T=st.integers(1, 150), seed=st.integers(0, 2**16),
       lp_coef=st.sampled_from([0.0, 0.3, -1.7]), poison=st.booleans())
def test_the_op_writes_the_two_pass_gradient_for_any_coefficients(name, f64, B, T, seed,
                                                                   lp_coef, poison):
    """``policy_loss_fused_fwd_out(..., grad_rows)`` against the two-pass ops for random
    coefficients of every statistic (the lp_sum one included, which no linear aggregate
    uses; a NaN coefficient for one row): the same row_stats and the same gradient bits."""
    dtype = torch.float64 if f64 else torch.float32
    p = _op_inputs(name, dtype, B, T, seed)
    lay = layout("policy_loss")
    gen = torch.Generator().manual_seed(seed)
    grad_rows = torch.randn(len(lay.row_grads), B, generator=gen, dtype=torch.float64)
    grad_rows[lay.row_grads.lp_sum] = lp_coef
    if poison:
        grad_rows[lay.row_grads.pg_sum, 0] = math.nan
    stats = torch.empty(len(lay.row_stats), B, dtype=torch.float64)
    grad = torch.full((B, T), 7.0, dtype=dtype)  # every position must be written
    torch.ops.rlkern.policy_loss_fused_fwd_out(p.lp, p.old, p.adv, p.mask, p.inputs, p.flags,
                                               p.hparams, stats, grad, None, grad_rows)
    want_stats = torch.empty_like(stats)
    torch.ops.rlkern.policy_loss_fwd_out(p.lp, p.old, p.adv, p.mask, p.inputs, p.flags,
                                         p.hparams, want_stats)
    want = torch.full((B, T), -3.0, dtype=dtype)
    torch.ops.rlkern.policy_loss_bwd_out(p.lp, p.old, p.adv, p.mask, p.inputs, want_stats,
                                         grad_rows, p.flags, p.hparams, want, None)
    assert torch.equal(bits(stats), bits(want_stats))
    assert torch.equal(bits(grad), bits(want))
    assert (bits(grad[~p.mask]) == 0).all()  # +0 at masked tokens, as the two-pass op


def test_the_op_refuses_factor_buffers_with_coefficients():
    p = _op_inputs("ppo", torch.float32, 3, 8, 1)
    lay = layout("policy_loss")
    stats = torch.empty(len(lay.row_stats), 3, dtype=torch.float64)
    rows = torch.zeros(len(lay.row_grads), 3, dtype=torch.float64)
    d = torch.empty(3, 8)
    fwd = torch.ops.rlkern.policy_loss_fused_fwd_out
    with pytest.raises(RuntimeError, match="token_grad_kl: not with grad_rows"):
        fwd(p.lp, p.old, p.adv, p.mask, p.inputs, p.flags, p.hparams, stats, d, d.clone(), rows)
    with pytest.raises(RuntimeError, match="grad_rows"):
        fwd(p.lp, p.old, p.adv, p.mask, p.inputs, p.flags, p.hparams, stats, d, None,
            rows[:, :2].contiguous())
    with pytest.raises(TypeError, match="grad_rows: expected Double"):
        fwd(p.lp, p.old, p.adv, p.mask, p.inputs, p.flags, p.hparams, stats, d, None,
            rows.float())


@settings(max_examples=60, deadline=None)
@given(B=st.integers(0, 6), T=st.integers(0, 300), pad=st.integers(0, 70),
       density=st.sampled_from([0.0, 0.3, 0.9, 1.0]), seed=st.integers(0, 2**16))
def test_lens_count_each_rows_valid_tokens(B, T, pad, density, seed):
    """Rows of every length around the 64-byte steps, strided rows (a column slice)."""
    gen = torch.Generator().manual_seed(seed)
    wide = torch.rand(B, T + pad, generator=gen) < density
    mask = wide[:, pad:]
    lens = torch.full((B,), -1.0, dtype=torch.float64)
    torch.ops.rlkern.policy_loss_lens_out(mask, lens)
    assert torch.equal(lens, mask.sum(1, dtype=torch.float64))


def test_lens_refuse_bad_arguments():
    lens_out = torch.ops.rlkern.policy_loss_lens_out
    mask = torch.ones(3, 5, dtype=torch.bool)
    with pytest.raises(TypeError, match="mask: expected Bool"):
        lens_out(mask.float(), torch.empty(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"mask: expected \(B, T\)"):
        lens_out(mask[0], torch.empty(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="lens"):
        lens_out(mask, torch.empty(4, dtype=torch.float64))
    with pytest.raises(TypeError, match="lens: expected Double"):
        lens_out(mask, torch.empty(3))
    with pytest.raises(RuntimeError, match="unit stride"):
        lens_out(torch.ones(5, 3, dtype=torch.bool).t(), torch.empty(3, dtype=torch.float64))

