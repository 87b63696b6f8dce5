"""dro, dppo_tv and dppo_kl: the formulas written out here by hand (float64, independent of the
reference and the kernels), their options, the verl preset and the errors on bad input.

Every backend against the reference (gradient included) runs through the rows of
``tests/policy_loss_cases.py``; parity with verl's own functions is in
``test_integration_verl_losses.py`` (the ``parity`` extra).
"""

from __future__ import annotations

import math

import pytest
import torch

import rlkern
from rlkern import PolicyLossConfig
from rlkern.config.layout import layout

BACKENDS = ["cpu", "triton", "torch"]


def _inputs(seed: int = 0, B: int = 5, T: int = 9, spread: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2.5
    old = (lp + torch.randn(B, T, generator=g, dtype=torch.float64) * spread).clamp(max=-1e-3)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    adv[0, :3] = 0.0  # A = 0 takes the A <= 0 side of the trust region
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, :3] = True
    mask[1] = False
    return lp, old, adv, mask


def _token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum()


def _run(cfg, lp, old, adv, mask, backend, **kw):
    x = lp.clone().requires_grad_()
    out = rlkern.policy_loss(x, old, adv, mask, config=cfg, backend=backend, **kw)
    (g,) = torch.autograd.grad(out.loss, x)
    return out, torch.where(mask, g, 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dro_formula(backend):
    lp, old, adv, mask = _inputs(1)
    beta = 0.7
    cfg = PolicyLossConfig(policy_loss="dro", dro_beta=beta, log_ratio_clamp=None)
    out, g = _run(cfg, lp, old, adv, mask, backend)
    d = lp - old
    want = _token_mean(-(lp * adv - 0.5 * beta * d**2), mask)
    n = mask.sum()
    torch.testing.assert_close(out.loss, want)
    torch.testing.assert_close(g, torch.where(mask, (beta * d - adv) / n, 0.0))
    torch.testing.assert_close(out.metrics["approx_kl"], _token_mean(-d, mask))  # unclamped
    assert out.metrics["clipfrac"] == 0 and out.metrics["dualclip_frac"] == 0


def _dppo_valid(kind, lp, old, adv, lo, hi):
    p, po = lp.exp(), old.exp()
    if kind == "dppo_tv":
        return torch.where(adv > 0, p - po <= hi, p - po >= -lo)
    b = po * (old - lp) + (1 - po) * torch.log((1 - po + 1e-8) / (1 - p + 1e-8))
    return torch.where(adv > 0, (b <= hi) | (p <= po), (b <= lo) | (p >= po))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["dppo_tv", "dppo_kl"])
def test_dppo_formula(kind, backend):
    lp, old, adv, mask = _inputs(2)
    lo, hi, c = (0.04, 0.08, 1.3) if kind == "dppo_tv" else (0.01, 0.02, 1.3)
    cfg = PolicyLossConfig(policy_loss=kind, clip_ratio_low=lo, clip_ratio_high=hi,
                           clip_ratio_c=c)
    out, g = _run(cfg, lp, old, adv, mask, backend)
    valid = _dppo_valid(kind, lp, old, adv, lo, hi)
    rho = (lp - old).clamp(-20, 20).exp()
    coef = -adv * rho.clamp(max=c) * valid
    n = mask.sum()
    vm = valid[mask]
    assert 0 < vm.sum() < vm.numel()  # both sides of the region are exercised
    assert ((rho > c) & valid)[mask].any()  # and the truncation
    torch.testing.assert_close(out.loss, _token_mean(coef * lp, mask))
    torch.testing.assert_close(g, torch.where(mask, coef / n, 0.0))
    torch.testing.assert_close(out.metrics["clipfrac"], _token_mean((~valid).double(), mask))
    torch.testing.assert_close(out.metrics["dualclip_frac"],
                               _token_mean(((rho > c) & valid).double(), mask))
    torch.testing.assert_close(out.metrics["approx_kl"], _token_mean(-(lp - old), mask))


@pytest.mark.parametrize("kind", ["dppo_tv", "dppo_kl"])
def test_dppo_without_truncation(kind):
    """clip_ratio_c=None: the stop-gradient ratio is not truncated."""
    lp, old, adv, mask = _inputs(3, spread=1.5)
    a = PolicyLossConfig(policy_loss=kind, clip_ratio_c=None)
    b = a.replace(clip_ratio_c=1.01)
    assert _run(a, lp, old, adv, mask, "cpu")[0].metrics["dualclip_frac"] == 0
    assert not torch.equal(_run(a, lp, old, adv, mask, "cpu")[1],
                           _run(b, lp, old, adv, mask, "cpu")[1])


def test_kernel_args_of_the_new_kinds():
    lay = layout("policy_loss")
    flags, hp = PolicyLossConfig(policy_loss="dro", dro_beta=0.25).kernel_args(
        with_kl=False, with_rollout=False)
    assert flags[lay.flags.loss_kind] == lay.loss_kinds.dro
    assert hp[lay.hparams.dro_beta] == 0.25
    flags, hp = PolicyLossConfig(policy_loss="dppo_kl", clip_ratio_low=0.1, clip_ratio_high=0.3,
                                 clip_ratio_c=5.0).kernel_args(with_kl=False, with_rollout=False)
    assert flags[lay.flags.loss_kind] == lay.loss_kinds.dppo_kl
    # the thresholds travel as [−ε_low, ε_high], the truncation as dual_clip_c
    assert (hp[lay.hparams.clip_lo], hp[lay.hparams.clip_hi]) == (-0.1, 0.3)
    assert hp[lay.hparams.dual_clip_c] == 5.0
    cfg = PolicyLossConfig(policy_loss="dro", dro_beta=1.5)
    assert PolicyLossConfig.from_args(*cfg.to_args()) == cfg
    assert PolicyLossConfig.from_args(*PolicyLossConfig().to_args()).dro_beta is None


def test_verl_preset():
    dppo = PolicyLossConfig.verl(policy_loss="dppo_tv", clip_ratio=0.1, clip_ratio_high=0.3)
    assert (dppo.policy_loss, dppo.clip_ratio_c, dppo.log_ratio_clamp) == ("dppo_tv", 20.0, 20.0)
    assert dppo.clip_bounds() == (-0.1, 0.3)
    assert PolicyLossConfig.verl(policy_loss="dppo_kl", clip_ratio_c=3.0).clip_ratio_c == 3.0
    assert PolicyLossConfig.verl().clip_ratio_c == 3.0  # vanilla's dual clip is unchanged
    dro = PolicyLossConfig.verl(policy_loss="dro", dro_beta=0.5)
    assert (dro.policy_loss, dro.dro_beta, dro.log_ratio_clamp) == ("dro", 0.5, None)
    assert dro.clip_ratio_c is None


@pytest.mark.parametrize("beta", [None, 0.0, -0.5])
def test_dro_needs_a_positive_beta(beta):
    with pytest.raises(ValueError, match=r"policy_loss\.dro_beta must be a positive value"):
        PolicyLossConfig.verl(policy_loss="dro", dro_beta=beta)
    with pytest.raises(ValueError, match=r"policy_loss\.dro_beta must be a positive value"):
        PolicyLossConfig(policy_loss="dro", dro_beta=beta)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="dro_beta must be a positive"):
        PolicyLossConfig(policy_loss="dro", dro_beta=math.inf)
    with pytest.raises(ValueError, match="dro_beta applies to policy_loss='dro' only"):
        PolicyLossConfig(policy_loss="ppo", dro_beta=1.0)
    with pytest.raises(TypeError, match="dro_beta must be a float"):
        PolicyLossConfig(policy_loss="dro", dro_beta="1")
    with pytest.raises(ValueError, match="dppo's ratio truncation"):
        PolicyLossConfig(policy_loss="dppo_tv", clip_ratio_c=0.0)
    for name in ("dro", "dppo_tv", "dppo_kl"):
        extra = {"dro_beta": 1.0} if name == "dro" else {}
        with pytest.raises(ValueError, match="importance_sampling_level"):
            PolicyLossConfig(policy_loss=name, importance_sampling_level="sequence", **extra)
        with pytest.raises(ValueError, match="ratio_min / ratio_max do not apply"):
            PolicyLossConfig(policy_loss=name, ratio_max=2.0, **extra)
    with pytest.raises(ValueError, match="policy_loss \\(verl\\)"):
        PolicyLossConfig.verl(policy_loss="dppo")
