"""The registered ops behind group_advantages, GroupStats and the §2.1 helpers: opcheck,
torch.compile(fullgraph=True), fake (meta) shapes."""

from __future__ import annotations

import pytest
import torch

import rlkern
from rlkern import backends
from rlkern.config.advantages import codes

OPS_BACKENDS = ["cpu", "torch"]


def _group_inputs(n=24):
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (n,), generator=gen).float()
    ids = torch.randint(0, 5, (n,), generator=gen) * 977 - 3
    weights = torch.randint(1, 9, (n,), generator=gen).double()
    loglik = -torch.rand(n, generator=gen, dtype=torch.float64)
    return scores, ids, weights, loglik


@pytest.mark.parametrize("backend", OPS_BACKENDS)
@pytest.mark.parametrize("estimator", ["grpo", "opo", "xrpo", "reinforce_pp_baseline"])
@pytest.mark.parametrize("by_ids", [True, False])
def test_opcheck_group_advantages(backend, estimator, by_ids):
    scores, ids, weights, loglik = _group_inputs()
    options = {"lam": 0.5, "kappa": 0.3} if estimator == "xrpo" else {}
    flags, hparams = rlkern.AdvantageConfig(estimator=estimator, **options).kernel_args()
    args = (scores, ids if by_ids else None, 0 if by_ids else 4,
            weights if estimator in ("opo", "reinforce_pp_baseline") else None,
            loglik if estimator == "xrpo" else None, flags, hparams, False, backend)
    torch.library.opcheck(torch.ops.rlkern.group_advantages.default, args)


def test_opcheck_compiled_out_ops():
    backends.cpp_ops()
    scores, ids, weights, loglik = _group_inputs()
    n = scores.numel()
    outs = (torch.empty(n), torch.empty(n), torch.empty(n), torch.empty(n, dtype=torch.bool))
    xrpo = rlkern.AdvantageConfig(estimator="xrpo", lam=0.5, kappa=0.3).kernel_args()
    torch.library.opcheck(torch.ops.rlkern.group_advantages_out.default,
                          (scores, ids, 0, weights, loglik, *xrpo, *outs))
    keys = torch.empty(n, dtype=torch.long)
    moments = torch.empty(n, len(codes().moments), dtype=torch.float64)
    count = torch.empty(1, dtype=torch.long)
    flags, hparams = rlkern.AdvantageConfig().kernel_args()
    torch.library.opcheck(torch.ops.rlkern.group_moments_out.default,
                          (scores, ids, 0, flags, keys, moments, count))
    torch.ops.rlkern.group_moments_out(scores, ids, 0, flags, keys, moments, count)
    k = int(count)  # opcheck ran on copies
    assert k == 5
    row_group = torch.randint(0, k, (n,))
    torch.library.opcheck(torch.ops.rlkern.group_finish_out.default,
                          (scores, row_group, moments[:k].contiguous(), flags, hparams, *outs))
    x = torch.randn(6, 5)
    mask = torch.rand(6, 5) > 0.3
    torch.library.opcheck(torch.ops.rlkern.discounted_returns_out.default,
                          (x, mask, 0.9, torch.empty_like(x)))
    torch.library.opcheck(torch.ops.rlkern.position_baseline_out.default,
                          (x, mask, None, 3, torch.empty_like(x)))
    torch.library.opcheck(torch.ops.rlkern.gtpo_weights_out.default,
                          (x.abs(), mask, torch.tensor([4, 4, 1, 1, 1, 9]), 0, 1e-6,
                           torch.empty_like(x), torch.empty_like(x)))
    s = torch.randn(10)
    modes = codes().gigpo_mode
    torch.library.opcheck(
        torch.ops.rlkern.gigpo_advantages_out.default,
        (s, s * 2, torch.arange(10) % 3, torch.arange(10) % 2, 1.0, modes.mean_norm,
         modes.std_norm, 1e-6, torch.empty(10), torch.empty(10), torch.empty(10)))
    torch.library.opcheck(torch.ops.rlkern.empg_modulate_out.default,
                          (s, s.abs(), s.abs(), 1.0, 1.0, 0.1, torch.empty(10)))
    torch.library.opcheck(torch.ops.rlkern.masked_whiten_out.default,
                          (x, mask.float(), False, torch.empty_like(x)))


@pytest.mark.parametrize("backend", OPS_BACKENDS)
def test_opcheck_helper_ops(backend):
    x = torch.randn(6, 5)
    mask = torch.rand(6, 5) > 0.3
    ids = torch.tensor([4, 4, 1, 1, 1, 9])
    torch.library.opcheck(torch.ops.rlkern.discounted_returns.default, (x, mask, 0.9, backend))
    torch.library.opcheck(torch.ops.rlkern.position_baseline.default,
                          (x, mask, ids, 0, backend))
    torch.library.opcheck(torch.ops.rlkern.gtpo_weights.default,
                          (x.abs(), mask, None, 2, 1e-6, backend))
    s = torch.randn(10)
    std_norm = codes().gigpo_mode.std_norm
    torch.library.opcheck(torch.ops.rlkern.gigpo_advantages.default,
                          (s, s * 2, torch.arange(10) % 3, torch.arange(10) % 2, 1.0, std_norm,
                           std_norm, 1e-6, backend))
    torch.library.opcheck(torch.ops.rlkern.empg_modulate.default,
                          (s, s.abs(), s.abs(), 1.0, 1.0, 0.1, backend))


def _compile(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


@pytest.mark.parametrize("estimator", ["grpo", "unlikely", "opo"])
def test_torch_compile_fullgraph_group_advantages(estimator):
    scores, ids, weights, _ = _group_inputs()
    mask = torch.rand(scores.numel(), 4) > 0.2
    old = -torch.rand(scores.numel(), 4)

    def step(rewards, uid, mask, old, lengths):
        kw = {}
        if estimator == "unlikely":
            kw = {"old_logprobs": old}
        if estimator == "opo":
            kw = {"lengths": lengths}
        out = rlkern.group_advantages(rewards, group_ids=uid, estimator=estimator, mask=mask,
                                      **kw)
        return out.advantages * 2.0, out.zero_variance_mask

    args = (scores, ids, mask, old, weights)
    got = _compile(step)(*args)
    want = step(*args)
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1])


def test_torch_compile_fullgraph_inductor_contiguous():
    scores = torch.randint(0, 2, (32,)).float()

    def step(r):
        return rlkern.group_advantages(r, group_size=8, eps=1e-4).advantages.sum()

    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(scores)
    torch.testing.assert_close(got, step(scores))


def test_torch_compile_fullgraph_helpers():
    x = torch.randn(6, 5)
    mask = torch.rand(6, 5) > 0.3
    s = torch.randn(10)

    def step(x, mask, s):
        g = rlkern.discounted_returns(x, gamma=0.9, reset=~mask)
        a = rlkern.position_baseline(g, mask, group_size=3)
        w = rlkern.gtpo_weights(x.abs(), mask, group_size=2).weight
        gi = rlkern.gigpo_advantages(s, s * 2, torch.arange(10) % 3,
                                     group_ids=torch.arange(10) % 2, omega=0.5,
                                     mode="std_norm").advantages
        e = rlkern.empg_modulate(s, s.abs(), s.abs())
        return a + w, gi + e

    got = _compile(step)(x, mask, s)
    want = step(x, mask, s)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        scores = torch.empty(10)
        out = torch.ops.rlkern.group_advantages(scores, None, 5, None, None,
                                                *rlkern.AdvantageConfig().kernel_args(), True,
                                                "cpu")
        assert [t.shape for t in out] == [(10,)] * 4
        assert out[0].dtype == torch.float64 and out[3].dtype == torch.bool
