"""The registered ops behind token_logprobs: opcheck, torch.compile(fullgraph=True), meta."""

from __future__ import annotations

import pytest
import torch

import rlkern
from rlkern.config.logprobs import outputs

OPS_BACKENDS = ["cpu", "torch"]


def _inputs(dtype=torch.float32, shape=(2, 3, 37)):
    logits = torch.randn(shape, dtype=dtype)
    labels = torch.randint(0, shape[-1], shape[:-1])
    labels[0, 1] = -100
    return logits, labels


@pytest.mark.parametrize("backend", OPS_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_entropy,with_stats", [(False, False), (True, False), (True, True)])
def test_opcheck_fwd(backend, dtype, with_entropy, with_stats):
    logits, labels = _inputs(dtype)
    logits.requires_grad_(dtype == torch.float32)
    torch.library.opcheck(
        torch.ops.rlkern.logprobs_fwd.default,
        (logits, labels, 0.9, -100, with_entropy, with_stats, False, backend),
    )


@pytest.mark.parametrize("backend", OPS_BACKENDS)
def test_opcheck_bwd(backend):
    logits, labels = _inputs()
    out = torch.ops.rlkern.logprobs_fwd(logits, labels, 0.9, -100, True, False, False, backend)
    g = torch.randn(2, 3)
    torch.library.opcheck(
        torch.ops.rlkern.logprobs_bwd.default,
        (logits, labels, out[1], out[2], g, g, None, 0.9, -100, backend),
    )
    torch.library.opcheck(
        torch.ops.rlkern.logprobs_bwd_inplace.default,
        (logits.clone(), labels, out[1], out[2], g, None, g, 0.9, -100, backend),
    )


def test_opcheck_compiled_out_ops():
    logits, labels = _inputs()
    rows = labels.shape
    OUT = outputs()  # the ops take the per-row outputs as one list in this order
    outs = [torch.empty(rows) for _ in OUT]
    torch.library.opcheck(
        torch.ops.rlkern.logprobs_fwd_out.default,
        (logits, labels, 1.0, -100, outs),
    )
    saved = [outs[o] if o in (OUT.lse, OUT.entropy) else None for o in OUT]
    grads = [outs[OUT.logprobs] if o in (OUT.logprobs, OUT.entropy) else None for o in OUT]
    torch.library.opcheck(
        torch.ops.rlkern.logprobs_bwd_out.default,
        (logits, labels, saved, grads, 1.0, -100, torch.empty_like(logits)),
    )


@pytest.mark.parametrize("inplace_backward", [False, True])
def test_torch_compile_fullgraph_forward_and_backward(inplace_backward):
    logits, labels = _inputs(shape=(2, 5, 64))
    weights = torch.randn(2, 5)

    def step(x):
        h = x * 1.0  # the lm_head output whose buffer inplace_backward may reuse
        out = rlkern.token_logprobs(h[:, :-1], labels[:, 1:], temperature=0.7,
                                    return_entropy=True, inplace_backward=inplace_backward)
        return (out.logprobs * weights[:, 1:]).sum() + 0.1 * out.entropy.sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1 = logits.clone().requires_grad_()
    loss = compiled(x1)
    loss.backward()
    x2 = logits.clone().requires_grad_()
    expected = step(x2)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(x1.grad, x2.grad)


def test_torch_compile_inductor():
    """The default inductor backend compiles the surrounding torch code around the op."""
    logits = torch.randn(4, 50)
    labels = torch.tensor([3, -100, 49, 0])

    def step(x):
        out = rlkern.token_logprobs(torch.tanh(x) * 5, labels, return_entropy=True)
        return (out.logprobs.exp() * out.entropy).sum()

    torch._dynamo.reset()
    x = logits.clone().requires_grad_()
    torch.compile(step, fullgraph=True)(x).backward()
    y = logits.clone().requires_grad_()
    step(y).backward()
    torch.testing.assert_close(x.grad, y.grad)


def test_meta_tensors_give_shapes():
    logits = torch.empty(3, 4, 1000, device="meta", dtype=torch.bfloat16)
    labels = torch.empty(3, 4, device="meta", dtype=torch.long)
    out = torch.ops.rlkern.logprobs_fwd(logits, labels, 1.0, -100, True, True, False, "torch")
    assert [t.shape for t in out] == [torch.Size([3, 4])] * 5
    assert all(t.dtype == torch.float32 for t in out)
