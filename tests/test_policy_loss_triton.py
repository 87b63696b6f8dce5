"""The Triton policy-loss kernels (kernels/policy_loss.py) in Triton's interpreter, against the
float64 reference: every case of policy_loss_cases in float64 (tight) and a selection in
float32, plus kl_penalty. Small shapes: the interpreter runs the real kernel code, slowly."""

from __future__ import annotations

import pytest
import torch

import rlkern
from conftest import stable_seed
from policy_loss_cases import CASES, make_inputs
from rlkern.reference.policy_loss import kl_penalty_reference
from test_policy_loss import _check, _reference, _run

pytest.importorskip("triton")
# The interpreter evaluates masked-off lanes too (NaN garbage at masked positions, discarded
# by the kernels' selects), and numpy reports those lanes' invalid operations.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
if torch.cuda.is_available():  # pragma: no cover - GPU machines run the device suite instead
    pytest.skip("the interpreter tests run on CPU-only machines", allow_module_level=True)


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_case_float64(name):
    case = CASES[name]
    inp = make_inputs(6, 11, torch.float64, seed=stable_seed(name) % 1000)
    out, grads = _run(case, inp, "triton")
    _check(out, grads, _reference(case, inp), torch.float64, f"{name}/triton")


@pytest.mark.parametrize("name", ["ppo-clip-higher-dual", "all-addons", "trl-preset", "gmpo",
                                  "gvpo", "sapo-seq", "kl-bias-gspo"])
@pytest.mark.parametrize("B,T", [(1, 1), (3, 300), (5, 17)])
def test_float32(name, B, T):
    case = CASES[name]
    if case.config.policy_loss == "gvpo" and B % case.config.group_size:
        B = case.config.group_size
    inp = make_inputs(B, T, torch.float32, seed=B + T)
    out, grads = _run(case, inp, "triton")
    _check(out, grads, _reference(case, inp), torch.float32, f"{name}/triton fp32")


def test_matches_cpu_kernels_fp32():
    inp = make_inputs(7, 40, torch.float32, seed=8)
    for name in ("all-addons", "trl-preset", "verl-preset"):
        a, ga = _run(CASES[name], inp, "triton")
        b, gb = _run(CASES[name], inp, "cpu")
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ga[0], gb[0], rtol=1e-5, atol=1e-7)


def test_kl_penalty():
    g = torch.Generator().manual_seed(1)
    lp = -torch.rand(3, 9, generator=g, dtype=torch.float64) * 3
    ref = lp + torch.randn(3, 9, generator=g, dtype=torch.float64) * 2
    for est in ("k1", "k2", "k3", "abs", "k3+"):
        x = lp.clone().requires_grad_()
        v = rlkern.kl_penalty(x, ref, estimator=est, backend="triton")
        x2 = lp.clone().requires_grad_()
        v2 = kl_penalty_reference(x2, ref, est)
        torch.testing.assert_close(v, v2)
        w = torch.randn_like(v)
        torch.testing.assert_close(torch.autograd.grad((v * w).sum(), x)[0],
                                   torch.autograd.grad((v2 * w).sum(), x2)[0])
