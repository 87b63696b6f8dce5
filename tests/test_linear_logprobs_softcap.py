"""Logit soft-capping in the fused linear ops (``softcap=c``: logits ``z = c·tanh(x/c)`` of the
head's output ``x``, before the temperature, as Gemma 2 applies ``final_logit_softcapping``):
every backend (cpu C++ epilogues, the float64 torch reference, Triton in the interpreter)
against torch autograd of the materialised capped logits, the one-pass forward+backward, the
fused GRPO loss, gradcheck in float64 and the argument checks. The vocabulary-parallel path is
covered by tests/test_linear_logprobs_distributed.py."""

from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import rlkern
from rlkern.reference.linear_logprobs import linear_logprobs_reference

BACKENDS = ["cpu", "torch", "triton"]

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _make(n=23, hidden=16, vocab=301, *, seed=0, dtype=torch.float32, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, hidden, generator=gen, dtype=torch.float64) * scale).to(dtype)
    w = (torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) * scale).to(dtype)
    b = torch.randn(vocab, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randint(0, vocab, (n,), generator=gen)
    if n > 3:
        y[3] = -100
    return h, w, b, y


def _weights(n, dtype=torch.float64):
    return torch.linspace(0.5, 1.5, n, dtype=dtype), torch.linspace(-1.0, 1.0, n, dtype=dtype)


def _truth(h, w, b, y, cap, temperature):
    """float64 autograd of the materialised logits ``c·tanh((hWᵀ + b)/c) / T`` of the (rounded)
    inputs: outputs and the gradients of ``Σ g_lp·logp + g_ent·entropy``."""
    leaves = [t.detach().double().requires_grad_() for t in (h, w, b)]
    z = cap * torch.tanh(torch.nn.functional.linear(*leaves) / cap) / temperature
    logp_all = torch.log_softmax(z, -1)
    valid = y != -100
    logp = logp_all.gather(1, y.clamp(min=0)[:, None])[:, 0] * valid
    entropy = -(logp_all.exp() * logp_all).sum(-1) * valid
    g_lp, g_ent = _weights(y.numel())
    grads = torch.autograd.grad((logp * g_lp + entropy * g_ent).sum(), leaves)
    return logp.detach(), entropy.detach(), grads


def _run(h, w, b, y, cap, temperature, backend, chunk_size=None):
    if backend == "triton":
        pytest.importorskip("triton")
    leaves = [t.detach().clone().requires_grad_() for t in (h, w, b)]
    out = rlkern.linear_logprobs(leaves[0], leaves[1], y, bias=leaves[2], return_entropy=True,
                                 temperature=temperature, softcap=cap, backend=backend,
                                 chunk_size=chunk_size)
    g_lp, g_ent = _weights(y.numel(), out.logprobs.dtype)
    (out.logprobs * g_lp + out.entropy * g_ent).sum().backward()
    return out, [t.grad for t in leaves]


def _close(got, want, rtol, atol):
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_softcap_matches_autograd_of_capped_logits(backend, dtype):
    h, w, b, y = _make(dtype=dtype)
    cap, temperature = 5.0, 0.7
    logp, entropy, grads = _truth(h, w, b, y, cap, temperature)
    # chunk_size=8 on cpu: several row chunks and vocab tiles feed the capped running state
    out, got = _run(h, w, b, y, cap, temperature, backend, chunk_size=8)
    tol = {"rtol": 1e-9, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 2e-5,
                                                                        "atol": 2e-5}
    _close(out.logprobs, logp, **tol)
    _close(out.entropy, entropy, **tol)
    for g, want in zip(got, grads, strict=True):
        _close(g, want, **tol)
    # the cap matters here: the uncapped op gives other values
    plain = rlkern.linear_logprobs(h, w, y, bias=b, temperature=temperature, backend=backend)
    assert (plain.logprobs.double() - logp).abs().max() > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_bf16_matches_materialised_logits(backend):
    """bf16 inputs against torch autograd of the materialised logits in float32, the way a
    Gemma 2 head computes them (bf16 matmul, then the cap)."""
    h, w, b, y = _make(dtype=torch.bfloat16, scale=1.0)
    cap, temperature = 3.0, 1.0
    leaves = [t.detach().clone().requires_grad_() for t in (h, w, b)]
    x = torch.nn.functional.linear(*leaves).float()
    z = cap * torch.tanh(x / cap) / temperature
    logp_all = torch.log_softmax(z, -1)
    valid = y != -100
    logp = logp_all.gather(1, y.clamp(min=0)[:, None])[:, 0] * valid
    entropy = -(logp_all.exp() * logp_all).sum(-1) * valid
    g_lp, g_ent = _weights(y.numel(), torch.float32)
    (logp * g_lp + entropy * g_ent).sum().backward()
    out, got = _run(h, w, b, y, cap, temperature, backend)
    assert out.logprobs.dtype == torch.float32
    torch.testing.assert_close(out.logprobs, logp.detach(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.entropy, entropy.detach(), rtol=2e-2, atol=2e-2)
    for g, leaf in zip(got, leaves, strict=True):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), leaf.grad.float(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_with_grad_matches_autograd(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    h, w, b, y = _make()
    cap, temperature = 4.0, 1.3
    logp, entropy, grads = _truth(h, w, b, y, cap, temperature)
    g_lp, g_ent = _weights(y.numel(), torch.float32)
    res = rlkern.linear_logprobs_with_grad(h, w, y, grad_logprobs=g_lp, grad_entropy=g_ent,
                                           bias=b, temperature=temperature,
                                           return_entropy=True, softcap=cap, backend=backend,
                                           chunk_size=7 if backend == "cpu" else None)
    _close(res.outputs.logprobs, logp, 2e-5, 2e-5)
    _close(res.outputs.entropy, entropy, 2e-5, 2e-5)
    for g, want in zip((res.grad_hidden, res.grad_weight, res.grad_bias), grads, strict=True):
        _close(g, want, 2e-5, 2e-5)


def test_softcap_reference():
    h, w, b, y = _make(dtype=torch.float32)
    cap = 2.0
    ref = linear_logprobs_reference(h, w, y, bias=b, temperature=0.5, softcap=cap)
    logp, entropy, _ = _truth(h, w, b, y, cap, 0.5)
    assert ref["logprobs"].dtype == torch.float32
    _close(ref["logprobs"], logp, 1e-6, 1e-6)
    _close(ref["entropy"], entropy, 1e-6, 1e-6)
    plain = linear_logprobs_reference(h, w, y, bias=b, temperature=0.5)
    assert not torch.allclose(plain["logprobs"], ref["logprobs"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_gradcheck_fp64(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    h, w, b, y = _make(n=4, hidden=3, vocab=9, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]

    def fn(hh, ww, bb):
        out = rlkern.linear_logprobs(hh, ww, y, bias=bb, return_entropy=True, temperature=0.9,
                                     softcap=1.5, backend=backend)
        return out.logprobs, out.entropy

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_caps_infinite_logits(backend):
    """``c·tanh(±inf/c) = ±c``: a +inf logit (from the bias) is capped to c, like a large one,
    and its gradient is 0; the reference gives the same."""
    if backend == "triton":
        pytest.importorskip("triton")
    h, w, b, y = _make(n=6, hidden=4, vocab=11, dtype=torch.float64)
    b = b.clone()
    b[2] = math.inf
    b[5] = -math.inf
    big = b.clone()
    big[2], big[5] = 1e6, -1e6
    out, got = _run(h, w, b, y, 3.0, 1.0, backend)
    want, want_grads = _run(h, w, big, y, 3.0, 1.0, "torch")
    assert torch.isfinite(out.logprobs).all() and torch.isfinite(out.entropy).all()
    torch.testing.assert_close(out.logprobs, want.logprobs)
    torch.testing.assert_close(out.entropy, want.entropy)
    for g, wg in zip(got, want_grads, strict=True):
        torch.testing.assert_close(g, wg)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_nan_logit_makes_row_nan(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    h, w, b, y = _make(n=5, hidden=4, vocab=9)
    h = h.clone()
    h[1, 0] = math.nan
    out = rlkern.linear_logprobs(h, w, y, bias=b, return_entropy=True, softcap=2.0,
                                 backend=backend)
    assert torch.isnan(out.logprobs[1]) and torch.isnan(out.entropy[1])
    rest = torch.tensor([0, 2, 4])  # row 3 is ignore_index (0)
    assert torch.isfinite(out.logprobs[rest]).all()


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_linear_grpo_loss_softcap_matches_policy_loss(backend):
    """The fused GRPO loss with ``softcap`` equals policy_loss on the capped logprobs."""
    B, T, H, V = 3, 5, 8, 50
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(B, T, H, generator=gen, dtype=torch.float64)
    w = torch.randn(V, H, generator=gen, dtype=torch.float64)
    y = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.2
    adv = torch.randn(B, generator=gen, dtype=torch.float64)
    old = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    cfg = rlkern.PolicyLossConfig.trl("dapo", entropy_coef=0.01)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = rlkern.linear_grpo_loss(hh, ww, y, mask, adv, old_logprobs=old, config=cfg,
                                  temperature=0.8, softcap=2.0, backend=backend)
    out.loss.backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp = rlkern.linear_logprobs(h2, w2, y, temperature=0.8, return_entropy=True, softcap=2.0,
                                backend=backend)
    ref = rlkern.policy_loss(lp.logprobs, old, adv[:, None].expand(B, T), mask, config=cfg,
                             entropy=lp.entropy)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(hh.grad, h2.grad)
    torch.testing.assert_close(ww.grad, w2.grad)
    module = rlkern.LinearGRPOLoss(cfg, temperature=0.8, softcap=2.0, backend=backend)
    loss, _ = module(h, w, y, mask, adv, old_per_token_logps=old)
    torch.testing.assert_close(loss, ref.loss.detach())


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, -math.inf])
def test_softcap_bad_values_raise(bad):
    h, w, _, y = _make(n=3, hidden=4, vocab=5)
    with pytest.raises(ValueError, match="softcap"):
        rlkern.linear_logprobs(h, w, y, softcap=bad)
    with pytest.raises(ValueError, match="softcap"):
        rlkern.linear_logprobs_with_grad(h, w, y, softcap=bad)
    with pytest.raises(ValueError, match="softcap"):
        rlkern.linear_grpo_loss(h.view(1, 3, 4), w, y.view(1, 3).clamp(min=0),
                                torch.ones(1, 3, dtype=torch.bool), torch.ones(1), softcap=bad)


@pytest.mark.parametrize("bad", ["2.0", True, torch.tensor(2.0)])
def test_softcap_bad_types_raise(bad):
    h, w, _, y = _make(n=3, hidden=4, vocab=5)
    with pytest.raises(TypeError, match="softcap"):
        rlkern.linear_logprobs(h, w, y, softcap=bad)


def test_cpp_epilogue_rejects_bad_softcap():
    """The C++ ops check the cap themselves (0 means none; negative / non-finite raise)."""
    tile = torch.randn(2, 5)
    labels = torch.tensor([1, 3])
    stats = torch.zeros(2, 4, dtype=torch.float64)
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="softcap"):
            torch.ops.rlkern.linear_logprobs_tile_fwd_(tile, labels, 0, 1.0, -100, True, stats,
                                                       bad)
        with pytest.raises(ValueError, match="softcap"):
            torch.ops.rlkern.linear_logprobs_tile_bwd_(tile, labels, 0, [None] * 5, [None] * 5,
                                                       1.0, -100, tile.clone(), None, bad)


def test_registered_op_without_softcap_argument_still_differentiates():
    """Callers of the registered op from before the ``softcap`` argument (it defaults to 0,
    no capping) keep working, backward included."""
    h, w, b, y = _make(n=6, hidden=4, vocab=9)
    hh = h.clone().requires_grad_()
    lp, _, _ = torch.ops.rlkern.linear_logprobs_fwd(hh, w, y, b, 1.0, -100, False, 4, 16, "",
                                                    "cpu")
    lp.sum().backward()
    h2 = h.clone().requires_grad_()
    rlkern.linear_logprobs(h2, w, y, bias=b).logprobs.sum().backward()
    torch.testing.assert_close(hh.grad, h2.grad)
