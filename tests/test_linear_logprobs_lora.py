"""``linear_logprobs`` / ``linear_grpo_loss`` with a LoRA-adapted head ``(A, B, s)``: equal to
the op on the merged weight ``W + s·B·A`` (which the op never forms), gradients for ``A``, ``B``,
``W``, ``hidden``, ``bias``; against a peft ``LoraLayer`` on ``lm_head`` where peft is
installed; combined with the filters and the soft cap; bad adapters refused."""

from __future__ import annotations

import pytest
import torch

import rlkern


def _data(dtype=torch.float64, n=21, h=12, v=40, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape, s=1.0: (torch.randn(*shape, generator=g, dtype=torch.float64)
                                  * s).to(dtype)
    hidden, weight, bias = make(n, h), make(v, h, s=0.4), make(v)
    a, b = make(r, h, s=0.3), make(v, r, s=0.3)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[n // 2] = -100
    return hidden, weight, bias, a, b, labels


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("extra", [dict(), dict(top_p=0.9), dict(softcap=2.0)],
                         ids=["plain", "top_p", "softcap"])
def test_equals_the_merged_weight(backend, extra):
    h, w, bias, a, b, y = _data()
    leaves = [t.clone().requires_grad_() for t in (h, w, bias, a, b)]
    hh, ww, bb, aa, bbb = leaves
    out = rlkern.linear_logprobs(hh, ww, y, bias=bb, lora=(aa, bbb, 0.5), temperature=0.8,
                                 return_entropy=True, chunk_size=6, backend=backend, **extra)
    ref_leaves = [t.clone().requires_grad_() for t in (h, w, bias, a, b)]
    h2, w2, b2, a2, bb2 = ref_leaves
    ref = rlkern.linear_logprobs(h2, w2 + 0.5 * bb2 @ a2, y, bias=b2, temperature=0.8,
                                 return_entropy=True, backend="torch", **extra)
    # the compiled truncated kernels work in the sampler's fp32 arithmetic
    tol = 1e-6 if backend == "cpu" and "top_p" in extra else 1e-10
    finite = torch.isfinite(ref.logprobs)
    assert torch.equal(finite, torch.isfinite(out.logprobs))
    torch.testing.assert_close(out.logprobs[finite], ref.logprobs[finite], rtol=tol, atol=tol)
    torch.testing.assert_close(out.entropy, ref.entropy, rtol=tol, atol=tol)
    g = torch.randn(21, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ((out.logprobs[finite] * g[finite]).sum() + (out.entropy * g.flip(0)).sum()).backward()
    ((ref.logprobs[finite] * g[finite]).sum() + (ref.entropy * g.flip(0)).sum()).backward()
    for mine, theirs in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=100 * tol, atol=tol)


def test_gradcheck():
    h, w, _, a, b, y = _data(n=5, h=3, v=7, r=2)

    def f(hh, ww, aa, bb):
        o = rlkern.linear_logprobs(hh, ww, y, lora=(aa, bb, 2.0), return_entropy=True,
                                   chunk_size=2, backend="torch")
        return o.logprobs, o.entropy

    assert torch.autograd.gradcheck(f, tuple(t.clone().requires_grad_() for t in (h, w, a, b)))


def test_matches_a_peft_lora_head():
    peft = pytest.importorskip("peft", reason="peft is not installed (the parity extra)")
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.lm_head = torch.nn.Linear(16, 50, bias=False)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                      target_modules=["lm_head"]))
    layer = lora.base_model.model.lm_head
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.2)  # peft starts B at 0
    h = torch.randn(9, 16)
    y = torch.randint(0, 50, (9,))
    ref = torch.log_softmax(layer(h), -1).gather(1, y[:, None])[:, 0]
    ref.sum().backward()
    want = layer.lora_A["default"].weight.grad.clone()
    layer.lora_A["default"].weight.grad = None
    out = rlkern.linear_logprobs(h, layer.base_layer.weight, y,
                                 lora=(layer.lora_A["default"].weight,
                                       layer.lora_B["default"].weight,
                                       layer.scaling["default"]), backend="cpu")
    torch.testing.assert_close(out.logprobs, ref, rtol=1e-5, atol=1e-5)
    out.logprobs.sum().backward()
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, want, rtol=1e-4,
                               atol=1e-6)


def test_linear_grpo_loss_with_lora_is_the_merged_head():
    g = torch.Generator().manual_seed(4)
    B, T, H, V, r = 3, 5, 8, 30, 2
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.4
    a = (torch.randn(r, H, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    b = (torch.randn(V, r, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    y = torch.randint(0, V, (B, T), generator=g)
    mask = torch.arange(T)[None] < torch.tensor([5, 2, 4])[:, None]
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64)
    out = rlkern.linear_grpo_loss(h, w, y, mask, adv, old_logprobs=old, lora=(a, b, 1.5),
                                  backend="cpu")
    out.loss.backward()
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ref = rlkern.linear_grpo_loss(h, w + 1.5 * b2 @ a2, y, mask, adv, old_logprobs=old,
                                  backend="torch")
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.grad, a2.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-9, atol=1e-12)


def test_bad_adapters_refused():
    h, w, _, a, b, y = _data(torch.float32)
    with pytest.raises(TypeError, match="tuple"):
        rlkern.linear_logprobs(h, w, y, lora=(a, b))
    with pytest.raises(ValueError, match=r"A must be \(r, H"):
        rlkern.linear_logprobs(h, w, y, lora=(a.T, b, 1.0))
    with pytest.raises(ValueError, match="dtype"):
        rlkern.linear_logprobs(h, w, y, lora=(a.double(), b, 1.0))
    with pytest.raises(ValueError, match="finite"):
        rlkern.linear_logprobs(h, w, y, lora=(a, b, float("nan")))
    with pytest.raises(ValueError, match="process_group"):
        rlkern.linear_logprobs(h, w, y, lora=(a, b, 1.0), process_group=object())
