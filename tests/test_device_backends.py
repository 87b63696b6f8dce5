"""The device suite: every compiled backend of the device under test against the float64
reference (or, for sampling, the CPU kernel's tokens), on tensors on that device.

The device is ``$RLKERN_TEST_DEVICE`` (``cpu`` or ``cuda``), by default ``cuda`` where CUDA is
available. On CUDA the backends are ``triton`` and ``cuda`` (the CUDA C++ kernels of
``rlkern._C``; skipped, with the reason, where ``_C`` was built without them); on CPU the C++
kernels (``cpu``). ``rlkern gpu-check`` runs this file with ``RLKERN_TEST_DEVICE=cuda``: it is
where the CUDA C++ kernels meet CUDA tensors in the test suite (the ``*_triton.py`` files
cover the Triton kernels on CUDA tensors in depth). Small shapes: the file runs in seconds.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

import rlkern
from conftest import assert_close_grad, assert_close_rows, stable_seed
from policy_loss_cases import CASES, make_inputs
from rlkern import backends
from rlkern.reference import token_logprobs_reference
from test_policy_loss import _check, _reference, _run

DEVICE = os.environ.get("RLKERN_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"RLKERN_TEST_DEVICE must be cpu or cuda, got {DEVICE!r}")
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("RLKERN_TEST_DEVICE=cuda but CUDA is not available", allow_module_level=True)


def _backends() -> list[object]:
    if DEVICE == "cpu":
        return ["cpu"]
    no_cuda = pytest.mark.skipif(not backends.has_cuda_kernels(),
                                 reason="rlkern._C was built without the CUDA kernels")
    return ["triton", pytest.param("cuda", marks=no_cuda)]


BACKENDS = _backends()
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _cpu(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.detach().cpu()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 1000), (1, 4097)], ids=str)
def test_token_logprobs_forward_backward(backend, dtype, shape) -> None:
    gen = torch.Generator().manual_seed(stable_seed("device-lp", shape, str(dtype)))
    logits = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    if labels.numel() > 1:
        labels.view(-1)[0] = -100  # an ignored position
    x = logits.to(DEVICE, copy=True).requires_grad_()
    out = rlkern.token_logprobs(x, labels.to(DEVICE), return_entropy=True, backend=backend)
    w_lp, w_ent = torch.randn(shape[:-1], generator=gen), torch.randn(shape[:-1], generator=gen)
    ((out.logprobs * w_lp.to(DEVICE)).sum() + (out.entropy * w_ent.to(DEVICE)).sum()).backward()

    ref_x = logits.double().requires_grad_()
    ref = token_logprobs_reference(ref_x, labels)
    ((ref["logprobs"] * w_lp.double()).sum() + (ref["entropy"] * w_ent.double()).sum()).backward()
    assert out.logprobs.device.type == DEVICE
    assert_close_rows(_cpu(out.logprobs), ref["logprobs"], dtype, f"logprobs/{backend}")
    assert_close_rows(_cpu(out.entropy), ref["entropy"], dtype, f"entropy/{backend}")
    assert x.grad is not None and x.grad.dtype == dtype
    assert_close_grad(_cpu(x.grad), ref_x.grad, dtype, f"grad/{backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_policy_loss_every_case_float32(name, backend) -> None:
    case = CASES[name]
    inp = make_inputs(6, 11, torch.float32, seed=stable_seed("device-pl", name) % 1000)
    out, grads = _run(case, {k: v.to(DEVICE) for k, v in inp.items()}, backend)
    assert out.loss.device.type == DEVICE
    on_cpu = SimpleNamespace(loss=_cpu(out.loss),
                             metrics={k: _cpu(v) for k, v in out.metrics.items()})
    _check(on_cpu, [_cpu(g) for g in grads], _reference(case, inp), torch.float32,
           f"{name}/{backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["grpo", "rloo", "dr_grpo"])
def test_group_advantages(backend, estimator) -> None:
    gen = torch.Generator().manual_seed(stable_seed("device-adv", estimator))
    scores = torch.randn(64, generator=gen)
    scores[8:16] = 0.5  # a group with zero variance
    got = rlkern.group_advantages(scores.to(DEVICE), group_size=8, estimator=estimator,
                                  backend=backend)
    ref = rlkern.group_advantages(scores.double(), group_size=8, estimator=estimator,
                                  backend="torch")
    assert got.advantages.device.type == DEVICE
    for field in ("advantages", "group_mean", "group_std"):
        torch.testing.assert_close(_cpu(getattr(got, field)).double(), getattr(ref, field),
                                   rtol=1e-5, atol=1e-6, msg=lambda m, f=field: f"{f}: {m}")
    assert torch.equal(_cpu(got.zero_variance_mask), ref.zero_variance_mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", [dict(temperature=0.7), dict(top_k=8, top_p=0.8, min_p=0.05)],
                         ids=str)
def test_sample_matches_the_cpu_kernel(backend, opts) -> None:
    gen = torch.Generator().manual_seed(stable_seed("device-sample", str(opts)))
    x = torch.randn(16, 300, generator=gen) * 2
    seeds = torch.randint(0, 2**40, (16,), generator=gen)
    steps = torch.randint(0, 99, (16,), generator=gen)
    got = rlkern.sample(x.to(DEVICE), seeds=seeds.to(DEVICE), steps=steps.to(DEVICE),
                        return_entropy=True, backend=backend, **opts)
    cpu = rlkern.sample(x, seeds=seeds, steps=steps, return_entropy=True, backend="cpu", **opts)
    assert got.tokens.device.type == DEVICE
    # The counter-based draws are the same on every backend (docs/sampling.md).
    assert torch.equal(_cpu(got.tokens), cpu.tokens)
    for f in ("raw_logprobs", "processed_logprobs", "entropy"):
        torch.testing.assert_close(_cpu(getattr(got, f)).double(), getattr(cpu, f).double(),
                                   rtol=1e-5, atol=2e-5, msg=lambda m, f=f: f"{f}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("multi_turn", [False, True])
def test_optimal_token_baseline(backend, multi_turn) -> None:
    """verl's OTB / TIR-OTB on the device (no CUDA C++ kernel: backend='cuda' raises)."""
    gen = torch.Generator().manual_seed(stable_seed("device-otb", str(multi_turn)))
    n, t = 24, 300
    rewards = torch.randn(n, t, generator=gen)
    mask = (torch.arange(t)[None] < torch.randint(0, t + 1, (n,), generator=gen)[:, None]) & \
        (torch.rand(n, t, generator=gen) > 0.2)
    probs = torch.rand(n, t, generator=gen).clamp_min(1e-3)
    spi2 = probs**2 + (1 - probs) ** 2 * torch.rand(n, t, generator=gen)
    rho = torch.rand(n, t, generator=gen) + 0.5
    ids = torch.randint(0, 5, (n,), generator=gen) * 1009
    args = (rewards, mask, probs.log(), spi2, ids, rho)

    def run(x, m, lp, sp, g, w, b):
        return rlkern.optimal_token_baseline(x, m, lp, sp, group_ids=g, rollout_is_weights=w,
                                             multi_turn=multi_turn, backend=b)

    on_device = [x.to(DEVICE) for x in args]
    if backend == "cuda":
        with pytest.raises(backends.BackendUnavailableError, match="no cuda kernel"):
            run(*on_device, backend)
        return
    got = run(*on_device, backend)
    ref = run(*(x.double() if x.is_floating_point() else x for x in args), "torch")
    assert got.advantages.device.type == DEVICE
    torch.testing.assert_close(_cpu(got.advantages).double(), ref.advantages, rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(_cpu(got.returns).double(), ref.returns, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", [dict(top_p=0.8), dict(top_k=8, top_p=0.8, min_p=0.05,
                                                         filter_order="joint")], ids=str)
def test_truncated_logprobs_equal_the_samplers(backend, opts) -> None:
    """token_logprobs under the sampler's filters: the drawn tokens' log-probs equal the
    sampler's processed log-probs bit for bit on the same backend; values and the gradient
    (kept set fixed) within the fp32 tolerance of the float64 reference."""
    from rlkern.reference.truncated_logprobs import (
        truncated_logprobs_grad_reference,
        truncated_logprobs_reference,
    )

    gen = torch.Generator().manual_seed(stable_seed("device-trunc", str(opts)))
    x = torch.randn(12, 300, generator=gen) * 2
    seeds = torch.randint(0, 2**40, (12,), generator=gen)
    steps = torch.randint(0, 99, (12,), generator=gen)
    drawn = rlkern.sample(x.to(DEVICE), seeds=seeds.to(DEVICE), steps=steps.to(DEVICE),
                          temperature=0.7, backend=backend, **opts)
    xd = x.to(DEVICE, copy=True).requires_grad_()
    out = rlkern.token_logprobs(xd, drawn.tokens, temperature=0.7, return_entropy=True,
                                backend=backend, **opts)
    assert torch.equal(_cpu(out.logprobs), _cpu(drawn.processed_logprobs))
    w = torch.randn(2, 12, generator=gen)
    ((out.logprobs * w[0].to(DEVICE)).sum() + (out.entropy * w[1].to(DEVICE)).sum()).backward()
    y = _cpu(drawn.tokens)
    ref = truncated_logprobs_reference(x, y, temperature=0.7, **opts)
    for f in ("logprobs", "entropy"):
        torch.testing.assert_close(_cpu(getattr(out, f)).double(), ref[f], rtol=1e-5, atol=2e-5,
                                   msg=lambda m, f=f: f"{f}: {m}")
    grad = truncated_logprobs_grad_reference(x, y, w[0], w[1], None, temperature=0.7, **opts)
    torch.testing.assert_close(_cpu(xd.grad).double(), grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_groups_match_the_cpu_kernel(backend) -> None:
    """num_samples = G: the same tokens as the CPU kernel (draw j: Philox index j)."""
    gen = torch.Generator().manual_seed(stable_seed("device-sample-n"))
    x = torch.randn(6, 300, generator=gen) * 2
    seeds = torch.randint(0, 2**40, (6,), generator=gen)
    steps = torch.randint(0, 99, (6,), generator=gen)
    opts = dict(top_k=20, top_p=0.9, num_samples=4, return_entropy=True)
    got = rlkern.sample(x.to(DEVICE), seeds=seeds.to(DEVICE), steps=steps.to(DEVICE),
                        backend=backend, **opts)
    cpu = rlkern.sample(x, seeds=seeds, steps=steps, backend="cpu", **opts)
    assert got.tokens.shape == (24,) and got.tokens.device.type == DEVICE
    assert torch.equal(_cpu(got.tokens), cpu.tokens)
    for f in ("raw_logprobs", "processed_logprobs", "entropy"):
        torch.testing.assert_close(_cpu(getattr(got, f)).double(), getattr(cpu, f).double(),
                                   rtol=1e-5, atol=2e-5, msg=lambda m, f=f: f"{f}: {m}")
