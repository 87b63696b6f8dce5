"""linear_logprobs / linear_logprobs_with_grad on edge inputs, on every backend (cpu, torch,
triton in the interpreter): −inf in the bias, huge logits and tiny temperatures (the
backward's exact path), H = 0, the torch backend's backward, the upstream gradients' device,
and the argument checks. docs/linear_logprobs.md states these behaviours.
"""

from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import rlkern
from rlkern.reference import token_logprobs_reference

BACKENDS = ["cpu", "torch", "triton"]

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _make(n=5, hidden=8, vocab=7, *, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, hidden, generator=gen) * 0.5).to(dtype)
    w = (torch.randn(vocab, hidden, generator=gen) * 0.5).to(dtype)
    b = torch.randn(vocab, generator=gen).to(dtype)
    y = torch.randint(0, vocab, (n,), generator=gen)
    return h, w, b, y


def _grads(h, w, b, y, backend, *, temperature=1.0, w_lp=1.0, w_ent=0.5, w_lse=0.0):
    """Outputs and parameter gradients of Σ w_lp·logprobs + w_ent·entropy + w_lse·lse."""
    if backend == "triton":
        pytest.importorskip("triton")
    leaves = [t.detach().clone().requires_grad_() for t in (h, w, b)]
    out = rlkern.linear_logprobs(leaves[0], leaves[1], y, bias=leaves[2], return_entropy=True,
                                 temperature=temperature, backend=backend)
    weights = torch.linspace(0.5, 1.5, y.numel())
    total = (out.logprobs * weights * w_lp).sum() + (out.entropy * w_ent).sum() + \
        (out.lse * w_lse).sum()
    total.backward()
    return out, [t.grad for t in leaves]


def _truth(h, w, b, y, *, temperature=1.0, w_lp=1.0, w_ent=0.5, w_lse=0.0):
    """float64 truth on the exact logits of the (rounded) inputs."""
    leaves = [t.detach().double().requires_grad_() for t in (h, w, b)]
    ref = token_logprobs_reference(torch.nn.functional.linear(*leaves), y,
                                   temperature=temperature)
    weights = torch.linspace(0.5, 1.5, y.numel(), dtype=torch.float64)
    total = (ref["logprobs"] * weights * w_lp).sum() + (ref["entropy"] * w_ent).sum() + \
        (ref["lse"] * w_lse).sum()
    return ref, torch.autograd.grad(total, leaves)


def _close(got, exp, rtol=1e-4):
    scale = float(exp.abs().max()) if exp.numel() else 1.0
    torch.testing.assert_close(got.double(), exp.double(), rtol=rtol, atol=rtol * max(scale, 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_neg_inf_bias_entries_give_finite_gradients(backend):
    """A −inf bias entry masks a vocabulary entry: p = 0 there, and the entropy gradient's
    0·(−inf) must be its limit 0, not NaN (Triton gave NaN in ∂W and ∂h)."""
    h, w, b, y = _make()
    b[[1, 4]] = float("-inf")
    y[0] = 1  # and one label on a masked entry: its logprob is −inf, its gradient finite
    out, grads = _grads(h, w, b, y, backend, w_lp=0.0)
    _, expected = _truth(h, w, b, y, w_lp=0.0)
    for got, exp in zip(grads, expected, strict=True):
        assert torch.isfinite(got).all()
        _close(got, exp)
    assert torch.isneginf(out.logprobs[0]) and torch.isfinite(out.entropy).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_neg_inf_bias_with_grad_is_finite(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    h, w, b, y = _make()
    b[[0, 3]] = float("-inf")
    g = torch.linspace(-1.0, 1.0, y.numel())
    res = rlkern.linear_logprobs_with_grad(h, w, y, grad_logprobs=g, grad_entropy=g.flip(0),
                                           bias=b, return_entropy=True, backend=backend)
    for t in (res.grad_hidden, res.grad_weight, res.grad_bias):
        assert torch.isfinite(t).all()
    ref = rlkern.linear_logprobs_with_grad(h.double(), w.double(), y, grad_logprobs=g.double(),
                                           grad_entropy=g.flip(0).double(), bias=b.double(),
                                           return_entropy=True, backend="torch")
    for got, exp in ((res.grad_hidden, ref.grad_hidden), (res.grad_weight, ref.grad_weight),
                     (res.grad_bias, ref.grad_bias)):
        _close(got, exp)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_torch_backend_backward_runs_and_matches_cpu(temperature):
    """backend="torch" raised "element 0 of tensors does not require grad" in its backward
    (it ran autograd inside a registered op, below autograd)."""
    h, w, b, y = _make()
    _, g_torch = _grads(h, w, b, y, "torch", temperature=temperature, w_lse=0.3)
    _, g_cpu = _grads(h, w, b, y, "cpu", temperature=temperature, w_lse=0.3)
    for got, exp in zip(g_cpu, g_torch, strict=True):
        _close(got, exp)


def test_torch_backend_with_grad_runs_and_matches_cpu():
    h, w, b, y = _make()
    g = torch.linspace(-1.0, 1.0, y.numel())
    a = rlkern.linear_logprobs_with_grad(h, w, y, grad_logprobs=g, grad_entropy=g, bias=b,
                                         return_entropy=True, backend="torch")
    c = rlkern.linear_logprobs_with_grad(h, w, y, grad_logprobs=g, grad_entropy=g, bias=b,
                                         return_entropy=True, backend="cpu")
    for got, exp in ((c.grad_hidden, a.grad_hidden), (c.grad_weight, a.grad_weight),
                     (c.grad_bias, a.grad_bias), (c.outputs.logprobs, a.outputs.logprobs)):
        _close(got, exp)


@pytest.mark.parametrize("which", ["grad_logprobs", "grad_entropy"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_upstream_gradient_on_another_device_raises(which, backend):
    """A meta (or any other device's) upstream gradient returned uninitialised memory."""
    h, w, b, y = _make()
    g = torch.ones(y.numel(), device="meta")
    with pytest.raises(ValueError, match=f"{which} is on meta"):
        rlkern.linear_logprobs_with_grad(h, w, y, bias=b, return_entropy=True, backend=backend,
                                         **{which: g})


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_hidden_size_gives_the_bias_softmax(backend):
    """H = 0: the logits are the bias. It failed in a reshape (-1, 0)."""
    _, _, b, y = _make()
    h, w = torch.zeros(5, 0), torch.zeros(7, 0)
    out, (gh, gw, gb) = _grads(h, w, b, y, backend)
    ref, (_, _, gb_ref) = _truth(h, w, b, y)
    torch.testing.assert_close(out.logprobs.double(), ref["logprobs"], rtol=1e-5, atol=1e-5)
    assert gh.shape == (5, 0) and gw.shape == (7, 0)
    _close(gb, gb_ref)
    # A constant −1e10 bias: every token equally likely.
    out = rlkern.linear_logprobs(h, w, y, bias=torch.full((7,), -1e10), backend=backend)
    torch.testing.assert_close(out.logprobs, torch.full((5,), -math.log(7)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["huge hidden", "tiny temperature", "huge, constant weight"])
def test_huge_scaled_logits_backward_is_exact(backend, case):
    """Rows whose |lse| is large take their gradient from recomputed row summaries (the
    rounded lse would move p by up to e^1000); the result equals the float64 truth."""
    h, w, b, y = _make()
    temperature = 1.0
    if case == "huge hidden":
        h = h * 1e10
        b = b * 1e10
    elif case == "tiny temperature":
        temperature = 1e-10
    else:  # all logits of a row equal in exact arithmetic: ties of huge values, with H = 1
        h = (torch.arange(1.0, 6.0) * 1e9)[:, None]
        w = torch.full((7, 1), 0.5)
        b = torch.zeros(7)
    out, grads = _grads(h, w, b, y, backend, temperature=temperature, w_lse=0.25)
    ref, expected = _truth(h, w, b, y, temperature=temperature, w_lse=0.25)
    for name in ("logprobs", "entropy"):
        got = getattr(out, name).double()
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, ref[name], rtol=1e-5, atol=1e-4, msg=name)
    for got, exp in zip(grads, expected, strict=True):
        assert torch.isfinite(got).all()
        _close(got, exp)


@pytest.mark.parametrize("value,error", [(2**70, ValueError), (0.5, TypeError)])
def test_ignore_index_is_checked(value, error):
    h, w, _, y = _make()
    with pytest.raises(error, match="ignore_index"):
        rlkern.linear_logprobs(h, w, y, ignore_index=value)
    with pytest.raises(error, match="ignore_index"):
        rlkern.linear_logprobs_with_grad(h, w, y, grad_logprobs=torch.ones(5),
                                         ignore_index=value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_hidden_row_is_nan_only_there(backend):
    h, w, b, y = _make()
    h[2, 3] = float("nan")
    out, grads = _grads(h, w, b, y, backend)
    assert torch.isnan(out.logprobs[2]) and torch.isnan(out.entropy[2])
    keep = torch.tensor([0, 1, 3, 4])
    assert torch.isfinite(out.logprobs[keep]).all() and torch.isfinite(grads[0][keep]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_grpo_loss_with_entropy_bonus_and_neg_inf_bias_is_finite(backend):
    """The fused GRPO loss drives the same kernels: with an entropy bonus its Triton
    backward met 0·(−inf) at −inf bias entries (NaN in ∂W)."""
    if backend == "triton":
        pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 3, 8, generator=gen).requires_grad_()
    weight = (torch.randn(7, 8, generator=gen) * 0.5).requires_grad_()
    bias = torch.randn(7, generator=gen)
    bias[[2, 5]] = float("-inf")
    bias.requires_grad_()
    labels = torch.tensor([[0, 1, 3], [4, 6, 0]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    out = rlkern.linear_grpo_loss(hidden, weight, labels, mask, torch.tensor([1.0, -0.5]),
                                  bias=bias, entropy_coef=0.01, backend=backend)
    out.loss.backward()
    for t in (hidden, weight, bias):
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_entropy_gradient_of_a_near_uniform_row_keeps_tiny_differences(backend):
    """Logits of ~1e-20 (tiny h, huge W): E_p[z] − z_v ~ 1e-20 must not be formed from
    log p = z − log s, whose O(1) log s rounds it away (the torch backend's ∂h was off by
    1e4×); the float64 paths keep it to the last bit."""
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(3, 1, generator=gen, dtype=torch.float64) * 1e-30
    w = torch.randn(5, 1, generator=gen, dtype=torch.float64) * 1e10
    y = torch.tensor([0, 1, 2])
    g = torch.randn(3, generator=gen, dtype=torch.float64)
    res = rlkern.linear_logprobs_with_grad(h, w, y, grad_entropy=g, return_entropy=True,
                                           backend=backend)
    x = h @ w.T
    p = torch.softmax(x, -1)
    expected = (g[:, None] * p * ((p * x).sum(-1, keepdim=True) - x)) @ w
    torch.testing.assert_close(res.grad_hidden, expected, rtol=1e-9, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_gradient_of_a_single_logit_is_exactly_zero(backend):
    """V = 1: the entropy is 0 whatever the logit, so is its gradient. E_p[z] − z_v must
    cancel exactly (formed before anything scales it): Triton's ∂h was ~400 through a weight of
    1e10, the rounding of x·log₂e against lse·log₂e."""
    if backend == "triton":
        pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(3, 4, generator=gen) * 1e-30
    w = torch.randn(1, 4, generator=gen) * 1e10
    b = torch.randn(1, generator=gen)
    g = torch.randn(3, generator=gen)
    for temperature in (1.0, 0.7):
        res = rlkern.linear_logprobs_with_grad(h, w, torch.zeros(3, dtype=torch.long),
                                               grad_entropy=g, bias=b, return_entropy=True,
                                               temperature=temperature, backend=backend)
        assert res.outputs.entropy.tolist() == [0.0, 0.0, 0.0]
        assert torch.all(res.grad_hidden == 0) and torch.all(res.grad_weight == 0)
