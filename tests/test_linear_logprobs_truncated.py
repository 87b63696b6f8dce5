"""``linear_logprobs`` under the sampler's truncated distribution (top_k / top_p / min_p):
equal to ``token_logprobs`` of the materialised logits with the same filters (bit for bit on
the log-probs, so also to ``sample(...).processed_logprobs``), exact gradients, any chunking."""

from __future__ import annotations

import pytest
import torch

import rlkern

FILTERS = [dict(top_p=0.9), dict(top_k=5), dict(min_p=0.1, top_k=10),
           dict(top_k=7, top_p=0.8, min_p=0.02), dict(top_p=0.7, filter_order="joint")]


def _data(dtype=torch.float64, n=37, h=16, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) * 0.4).to(dtype)
    bias = torch.randn(v, generator=g, dtype=torch.float64).to(dtype)
    with torch.no_grad():  # labels mostly inside the kept sets: the likeliest tokens
        labels = (hidden.double() @ weight.double().T).argsort(1, descending=True)[:, 1]
    labels[3] = -100
    labels[4] = (hidden[4].double() @ weight.double().T).argmin()  # outside every kept set
    return hidden, weight, bias, labels


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("kw", FILTERS, ids=lambda kw: "-".join(kw))
def test_equals_token_logprobs_of_the_logits(kw, backend):
    h, w, b, y = _data()
    hh, ww, bb = (t.clone().requires_grad_() for t in (h, w, b))
    out = rlkern.linear_logprobs(hh, ww, y, bias=bb, temperature=0.7, return_entropy=True,
                                 chunk_size=8, backend=backend, **kw)
    h2, w2, b2 = (t.clone().requires_grad_() for t in (h, w, b))
    ref = rlkern.token_logprobs(torch.nn.functional.linear(h2, w2, b2), y, temperature=0.7,
                               return_entropy=True, backend=backend, **kw)
    assert torch.equal(out.logprobs, ref.logprobs)
    torch.testing.assert_close(out.entropy, ref.entropy, rtol=0, atol=1e-13)
    torch.testing.assert_close(out.lse, ref.lse, rtol=0, atol=1e-13)
    assert out.logprobs[4] == -torch.inf and out.logprobs[3] == 0
    finite = torch.isfinite(ref.logprobs)
    g = torch.randn(37, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ((out.logprobs[finite] * g[finite]).sum() + (out.entropy * g.flip(0)).sum()).backward()
    ((ref.logprobs[finite] * g[finite]).sum() + (ref.entropy * g.flip(0)).sum()).backward()
    for mine, theirs in ((hh, h2), (ww, w2), (bb, b2)):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-12, atol=1e-12)


def test_gradcheck_float64():
    h, w, b, y = _data(n=6, h=4, v=9)
    y[4] = 0
    ok = torch.isfinite(rlkern.token_logprobs(h @ w.T + b, y, top_p=0.8).logprobs)
    y = torch.where(ok, y, torch.full_like(y, -100))

    def f(hh, ww, bb):
        o = rlkern.linear_logprobs(hh, ww, y, bias=bb, top_p=0.8, return_entropy=True,
                                   chunk_size=2, backend="torch")
        return o.logprobs, o.entropy

    assert torch.autograd.gradcheck(f, tuple(t.clone().requires_grad_() for t in (h, w, b)))


@pytest.mark.parametrize("chunk", [1, 5, None])
def test_chunking_does_not_change_results(chunk):
    """Only the matmul's rounding of the logits depends on the chunk's rows (oneDNN picks its
    kernel by shape): the kept sets and values agree to float32 rounding."""
    h, w, b, y = _data(torch.float32)
    a = rlkern.linear_logprobs(h, w, y, bias=b, top_k=6, top_p=0.85, chunk_size=chunk,
                               return_entropy=True, backend="cpu")
    ref = rlkern.linear_logprobs(h, w, y, bias=b, top_k=6, top_p=0.85, chunk_size=37,
                                 return_entropy=True, backend="cpu")
    assert torch.equal(torch.isinf(a.logprobs), torch.isinf(ref.logprobs))
    torch.testing.assert_close(a.logprobs, ref.logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.entropy, ref.entropy, rtol=1e-5, atol=1e-5)


def test_bitwise_equal_to_sampler_processed_logprobs():
    """Drawn tokens scored by the trainer side equal the sampler's processed log-probs (one
    chunk: the same logits as the sampler's input, bit for bit)."""
    h, w, b, _ = _data(torch.float32, n=64, v=300)
    logits = torch.nn.functional.linear(h, w, b)
    n = logits.shape[0]
    s = rlkern.sample(logits, temperature=0.8, top_k=40, top_p=0.9, min_p=0.01,
                      seeds=torch.arange(n), steps=torch.zeros(n, dtype=torch.long),
                      backend="cpu")
    out = rlkern.linear_logprobs(h, w, s.tokens, bias=b, temperature=0.8, top_k=40,
                                 top_p=0.9, min_p=0.01, chunk_size=64, backend="cpu")
    assert torch.equal(out.logprobs, s.processed_logprobs)


def test_per_row_filters_and_3d_inputs():
    h, w, b, y = _data(n=12)
    top_p = torch.linspace(0.5, 1.0, 12, dtype=torch.float64)
    out = rlkern.linear_logprobs(h.view(3, 4, -1), w, y.view(3, 4), bias=b,
                                 top_p=top_p.view(3, 4), chunk_size=5, backend="cpu")
    ref = rlkern.token_logprobs(torch.nn.functional.linear(h, w, b), y, top_p=top_p,
                                backend="cpu")
    assert out.logprobs.shape == (3, 4)
    assert torch.equal(out.logprobs.view(-1), ref.logprobs)


def test_softcap_then_filters():
    h, w, b, y = _data()
    out = rlkern.linear_logprobs(h, w, y, bias=b, softcap=1.5, top_p=0.9, temperature=0.8,
                                 backend="cpu", chunk_size=10)
    x = torch.nn.functional.linear(h, w, b)
    ref = rlkern.token_logprobs(1.5 * torch.tanh(x / 1.5), y, top_p=0.9, temperature=0.8,
                                backend="cpu")
    torch.testing.assert_close(out.logprobs, ref.logprobs, rtol=0, atol=1e-14)


def test_under_no_grad_and_empty():
    h, w, _, y = _data(torch.float32)
    with torch.no_grad():
        out = rlkern.linear_logprobs(h.requires_grad_(), w, y, top_k=3, backend="cpu")
    assert not out.logprobs.requires_grad
    empty = rlkern.linear_logprobs(h[:0], w, y[:0], top_k=3, return_entropy=True)
    assert empty.logprobs.shape == (0,) and empty.entropy.shape == (0,)


def test_bad_filters_and_process_group_refused():
    h, w, _, y = _data(torch.float32)
    with pytest.raises(ValueError, match="top_p"):
        rlkern.linear_logprobs(h, w, y, top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        rlkern.linear_logprobs(h, w, y, top_k=0)
    with pytest.raises(ValueError, match="process_group"):
        rlkern.linear_logprobs(h, w, y, top_k=3, process_group=object())


def _loss_inputs(seed=3):
    g = torch.Generator().manual_seed(seed)
    B, T, H, V = 4, 6, 16, 40
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.4
    with torch.no_grad():
        y = (h @ w.T).argsort(-1, descending=True)[..., 1]
    mask = torch.arange(T)[None] < torch.tensor([6, 3, 1, 5])[:, None]
    y[~mask] = 12345  # garbage ids at padding: never scored
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64)
    return h, w, y, mask, adv, old


@pytest.mark.parametrize("cfg", [dict(), dict(policy_loss="cispo", entropy_coef=0.01,
                                             loss_agg_mode="seq-mean-token-mean"),
                                 dict(top_entropy_quantile=0.5, entropy_coef=0.02)],
                         ids=["ppo", "cispo-entropy", "entropy-quantile"])
def test_linear_grpo_loss_with_filters_is_the_composition(cfg):
    h, w, y, mask, adv, old = _loss_inputs()
    config = rlkern.PolicyLossConfig(**cfg)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = rlkern.linear_grpo_loss(hh, ww, y, mask, adv, old_logprobs=old, config=config,
                                  temperature=0.9, top_k=8, top_p=0.9, backend="cpu")
    out.loss.backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    scored = y.masked_fill(~mask, -100)
    lp = rlkern.token_logprobs(torch.nn.functional.linear(h2, w2), scored, temperature=0.9,
                               top_k=8, top_p=0.9, return_entropy=True, backend="cpu")
    need_entropy = config.entropy_coef != 0 or config.top_entropy_quantile < 1
    ref = rlkern.policy_loss(lp.logprobs, old, adv, mask, config=config,
                             entropy=lp.entropy if need_entropy else None, backend="cpu")
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hh.grad, h2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ww.grad, w2.grad, rtol=1e-10, atol=1e-12)
    assert out.metrics.keys() == ref.metrics.keys()


def test_linear_grpo_loss_filters_off_equal_the_fused_loss():
    """top_k = V keeps every token: the composition gives the one-pass loss, to the truncated
    kernel's precision (it works in the sampler's fp32 arithmetic for float64 logits too, so
    its log-probs are ~1e-7 from the float64 ones; docs/sampling.md)."""
    h, w, y, mask, adv, old = _loss_inputs()
    y = y.masked_fill(~mask, 0)
    a = rlkern.linear_grpo_loss(h, w, y, mask, adv, old_logprobs=old, top_k=w.shape[0],
                                backend="cpu")
    b = rlkern.linear_grpo_loss(h, w, y, mask, adv, old_logprobs=old, backend="cpu")
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-9)
