"""clip_cov and kl_cov: the covariance token selection (``cov_selection``) and the fused loss
with its ``cov_select`` input, against formulas written out here by hand (float64); options and
errors. Every backend against the reference runs through ``tests/policy_loss_cases.py``;
parity with verl's own functions is in ``test_integration_verl_losses.py`` (``parity`` extra).
"""

from __future__ import annotations

import pytest
import torch

import rlkern
from rlkern import PolicyLossConfig
from rlkern.ops.policy_loss.api import policy_loss_chunk
from rlkern.ops.policy_loss.cov_select import cov_selection

BACKENDS = ["cpu", "triton", "torch"]


def _inputs(seed: int = 0, B: int = 8, T: int = 16):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(B, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[2] = False
    return lp, old, adv, mask


def _cov(lp, adv, mask):
    """(A − Ā)·(logp − l̄ogp) over the valid tokens (means over them)."""
    a = adv[:, None].expand_as(lp)
    return (a - a[mask].mean()) * (lp - lp[mask].mean())


def test_kl_cov_selects_the_top_covariance_tokens():
    lp, old, adv, mask = _inputs(1)
    cfg = PolicyLossConfig(policy_loss="kl_cov", cov_ratio=0.1)
    sel = cov_selection(lp, old, adv, mask, cfg)
    n = int(mask.sum())
    k = max(1, int(n * 0.1))
    cov = torch.where(mask, _cov(lp, adv, mask), -torch.inf)
    want = torch.zeros_like(lp)
    want.view(-1)[cov.reshape(-1).topk(k).indices] = 1.0
    assert torch.equal(sel, want) and int(sel.sum()) == k > 1


def test_clip_cov_selects_at_random_among_the_candidates():
    lp, old, adv, mask = _inputs(2)
    cfg = PolicyLossConfig(policy_loss="clip_cov", cov_ratio=0.05, cov_lb=-0.5, cov_ub=2.0)
    ratio = (lp - old).exp()
    clipped = -adv[:, None] * ratio.clamp(0.8, 1.2) > -adv[:, None] * ratio
    cov = _cov(lp, adv, mask)
    candidates = mask & ~clipped & (cov > -0.5) & (cov < 2.0)
    k = max(int(0.05 * int(mask.sum())), 1)
    draws = []
    for seed in range(3):
        torch.manual_seed(seed)
        sel = cov_selection(lp, old, adv, mask, cfg)
        assert int(sel.sum()) == min(k, int(candidates.sum())) and k > 1
        assert not (sel.bool() & ~candidates).any()
        torch.manual_seed(seed)
        assert torch.equal(cov_selection(lp, old, adv, mask, cfg), sel)  # the same draw
        draws.append(sel)
    assert not all(torch.equal(draws[0], d) for d in draws[1:])  # the draw matters


def test_clip_cov_without_candidates_selects_nothing():
    lp, old, adv, mask = _inputs(3)
    cfg = PolicyLossConfig(policy_loss="clip_cov", cov_lb=100.0, cov_ub=200.0)
    assert not cov_selection(lp, old, adv, mask, cfg).any()
    empty = torch.zeros_like(mask)
    assert not cov_selection(lp, old, adv, empty, cfg.replace(policy_loss="kl_cov")).any()


def _run(cfg, lp, old, adv, mask, backend, **kw):
    x = lp.clone().requires_grad_()
    out = rlkern.policy_loss(x, old, adv, mask, config=cfg, backend=backend, **kw)
    (g,) = torch.autograd.grad(out.loss, x)
    return out, torch.where(mask, g, 0.0)


def _token_mean(x, mask):
    return torch.where(mask, x, 0.0).sum() / mask.sum()


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_cov_formula(backend):
    lp, old, adv, mask = _inputs(4)
    s = (torch.rand(lp.shape, generator=torch.Generator().manual_seed(9)) < 0.3).double()
    cfg = PolicyLossConfig(policy_loss="kl_cov", cov_kl_coef=0.6, log_ratio_clamp=None)
    out, g = _run(cfg, lp, old, adv, mask, backend, cov_select=s)
    d = lp - old
    a = adv[:, None]
    torch.testing.assert_close(out.loss, _token_mean(-a * d.exp() + s * 0.6 * d.abs(), mask))
    want = -a * d.exp() + s * 0.6 * d.sign()
    torch.testing.assert_close(g, torch.where(mask, want, 0.0) / mask.sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_cov_formula_and_default_selection(backend):
    lp, old, adv, mask = _inputs(5)
    cfg = PolicyLossConfig(policy_loss="clip_cov", cov_ratio=0.1, cov_lb=-1.0, cov_ub=3.0,
                           log_ratio_clamp=None)
    torch.manual_seed(7)
    out, g = _run(cfg, lp, old, adv, mask, backend)  # the selection drawn inside
    torch.manual_seed(7)
    s = cov_selection(lp, old, adv, mask, cfg)
    rho, a = (lp - old).exp(), adv[:, None]
    ppo = torch.maximum(-a * rho, -a * rho.clamp(0.8, 1.2))
    torch.testing.assert_close(out.loss, _token_mean(ppo * (1 - s), mask))
    torch.testing.assert_close(out.metrics["clipfrac"], _token_mean(s, mask))
    torch.testing.assert_close(out.metrics["approx_kl"], _token_mean(old - lp, mask))
    given, g2 = _run(cfg, lp, old, adv, mask, backend, cov_select=s)
    torch.testing.assert_close(given.loss, out.loss)
    torch.testing.assert_close(g2, g)


def test_verl_preset():
    cfg = PolicyLossConfig.verl(policy_loss="clip_cov", cov_ratio=0.01, cov_lb=0.5, cov_ub=4.0)
    assert (cfg.policy_loss, cfg.cov_ratio, cfg.cov_lb, cfg.cov_ub) == ("clip_cov", 0.01, 0.5,
                                                                        4.0)
    assert cfg.clip_ratio_c is None and cfg.log_ratio_clamp is None
    kl = PolicyLossConfig.verl(policy_loss="kl_cov", ppo_kl_coef=0.3)
    assert (kl.policy_loss, kl.cov_ratio, kl.cov_kl_coef) == ("kl_cov", 0.0002, 0.3)


def test_bad_input_is_refused():
    lp, old, adv, mask = _inputs(6)
    with pytest.raises(ValueError, match="cov_select applies to clip_cov / kl_cov"):
        rlkern.policy_loss(lp, old, adv, mask, cov_select=torch.zeros_like(lp))
    with pytest.raises(ValueError, match="cov_selection is for clip_cov / kl_cov"):
        cov_selection(lp, old, adv, mask, PolicyLossConfig())
    with pytest.raises(ValueError, match="cov_select must have shape"):
        rlkern.policy_loss(lp, old, adv, mask, policy_loss="kl_cov",
                           cov_select=torch.zeros(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="whole batch"):
        policy_loss_chunk(lp, old, adv, mask, policy_loss="kl_cov", num_tokens=10.0)
    for bad, match in ((dict(cov_ratio=0.0), "cov_ratio must be finite and > 0"),
                       (dict(cov_lb=2.0, cov_ub=1.0), "cov_lb must be <= cov_ub"),
                       (dict(cov_kl_coef=float("inf")), "cov_kl_coef must be finite"),
                       (dict(importance_sampling_level="sequence"), "importance_sampling"),
                       (dict(ratio_max=2.0, policy_loss="kl_cov"), "do not apply")):
        with pytest.raises(ValueError, match=match):
            PolicyLossConfig(**{"policy_loss": "clip_cov", **bad})
