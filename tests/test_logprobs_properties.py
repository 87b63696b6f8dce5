"""Property tests (hypothesis): shapes, strides, dtypes, temperatures and ignore_index."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rlkern
from conftest import assert_close_grad, assert_close_rows
from rlkern.reference import token_logprobs_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@st.composite
def logits_cases(draw):
    """A (B, L, V) logits view with arbitrary leading strides plus matching labels."""
    dtype = draw(st.sampled_from(DTYPES))
    B = draw(st.integers(1, 3))
    L = draw(st.integers(1, 5))
    V = draw(st.sampled_from([1, 2, 3, 15, 16, 17, 33, 99, 257, 4095, 4097, 8200]))
    pad_L = draw(st.integers(0, 2))  # extra rows in the storage: a shifted / sliced view
    transpose = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.1, 1.0, 8.0]))
    storage = (torch.randn(B, L + pad_L, V, generator=gen, dtype=torch.float64) * scale).to(dtype)
    logits = storage[:, pad_L:, :]
    if transpose:
        logits = logits.transpose(0, 1)
    ignore_index = draw(st.sampled_from([-100, -1, 0]))
    labels = torch.randint(0, V, logits.shape[:-1], generator=gen)
    drop = torch.rand(logits.shape[:-1], generator=gen) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    labels[drop] = ignore_index
    temperature = draw(st.sampled_from([1.0, 0.25, 0.7, 1.9]))
    return logits, labels, temperature, ignore_index


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=logits_cases(), backend=st.sampled_from(["cpu", "torch"]))
def test_forward_backward_property(case, backend):
    logits, labels, temperature, ignore_index = case
    dtype = logits.dtype
    x = logits.detach().requires_grad_()
    out = rlkern.token_logprobs(x, labels, temperature=temperature, ignore_index=ignore_index,
                                return_entropy=True, return_stats=True, backend=backend)
    x64 = logits.detach().double().requires_grad_()
    ref = token_logprobs_reference(x64, labels, temperature=temperature,
                                   ignore_index=ignore_index)
    for field in ("logprobs", "entropy", "lse", "self_certainty", "sum_p_sq"):
        assert_close_rows(getattr(out, field), ref[field], dtype, field)
    # Entropy lies in [0, log V]; log-probabilities are ≤ 0.
    valid = labels != ignore_index
    assert torch.all(out.logprobs[valid] <= 1e-6)
    vocab = logits.shape[-1]
    assert torch.all(out.entropy[valid] >= -1e-5)
    assert torch.all(out.entropy[valid] <= torch.log(torch.tensor(float(vocab))) + 1e-4)

    w = torch.randn(labels.shape, dtype=torch.float64)
    ((out.logprobs.double() + out.entropy.double()) * w).sum().backward()
    ((ref["logprobs"] + ref["entropy"]) * w).sum().backward()
    # Terms of size |w| (1 + 2 max|z|) / T cancel in the entropy gradient.
    z_max = float(logits.double().abs().max()) / temperature if logits.numel() else 0.0
    scale = float(w.abs().max()) * (1.0 + 2.0 * z_max) / temperature
    assert_close_grad(x.grad, x64.grad, dtype, "grad", scale=scale)
    assert torch.all(x.grad[~valid] == 0)
