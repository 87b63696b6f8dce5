"""Property tests of rlkern.policy_loss (hypothesis): random configurations and shapes agree
with the float64 reference; on-policy identities; row permutations; scaling."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rlkern
from conftest import bits
from policy_loss_cases import make_inputs
from rlkern import PolicyLossConfig
from rlkern.reference.policy_loss import policy_loss_reference

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def configs(draw):
    loss = draw(st.sampled_from(["ppo", "gspo", "cispo", "sapo", "gmpo", "reinforce"]))
    level = "token"
    if loss in ("ppo", "cispo", "sapo"):
        level = draw(st.sampled_from(["token", "sequence"]))
    opt = lambda s: draw(st.one_of(st.none(), s))
    kw = dict(
        policy_loss=loss,
        importance_sampling_level=level,
        loss_agg_mode=draw(st.sampled_from(["token-mean", "seq-mean-token-mean",
                                            "seq-mean-token-sum", "seq-mean-token-sum-norm",
                                            "sum"])),
        clip_ratio_low=draw(st.floats(0.0, 0.5)),
        clip_ratio_high=opt(st.floats(0.0, 0.6)),
        log_ratio_clamp=opt(st.floats(0.05, 20.0)),
        seq_log_ratio_max=opt(st.floats(-0.1, 10.0)),
        kl_coef=draw(st.sampled_from([0.0, 0.1])),
        kl_estimator=draw(st.sampled_from(["k1", "k2", "k3", "abs", "k3+", "k1+"])),
        kl_log_clamp=opt(st.floats(0.1, 20.0)),
        kl_value_clamp=opt(st.floats(0.01, 10.0)),
        entropy_coef=draw(st.sampled_from([0.0, 0.05])),
        count_empty_seqs=draw(st.booleans()),
        loss_scale=draw(st.floats(0.1, 4.0)),
    )
    if loss == "ppo":
        kw["clip_ratio_c"] = opt(st.floats(1.01, 5.0))
        kw["delta"] = opt(st.floats(0.5, 3.0))
    if loss not in ("gmpo",):
        kw["kl_bias_correction"] = draw(st.booleans())
        kw["top_entropy_quantile"] = draw(st.sampled_from([1.0, 0.3, 0.8]))
    kw["rollout_correction"] = draw(st.sampled_from(
        [None, "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]))
    lo = draw(st.floats(0.3, 1.0))
    kw["rollout_min"] = lo
    kw["rollout_max"] = lo + draw(st.floats(0.0, 2.0))
    return PolicyLossConfig(**kw)


@SETTINGS
@given(cfg=configs(), B=st.integers(1, 7), T=st.integers(1, 23), seed=st.integers(0, 10_000),
       adv_tok=st.booleans(), spread=st.sampled_from([0.05, 0.3, 2.0]),
       backend=st.sampled_from(["cpu", "torch"]))
def test_random_configs_match_the_reference(cfg, B, T, seed, adv_tok, spread, backend):
    inp = make_inputs(B, T, torch.float64, seed=seed, spread=spread)
    adv = inp["adv_per_token"] if adv_tok else inp["advantages"]
    kw = {"entropy": inp["entropy"].clone().requires_grad_()}
    if cfg.kl_coef:
        kw["ref_logprobs"] = inp["ref_logprobs"]
    if cfg.rollout_correction:
        kw["rollout_logprobs"] = inp["rollout_logprobs"]
    if cfg.policy_loss != "gmpo":
        kw["token_weights"] = inp["token_weights"]
    lp = inp["logprobs"].clone().requires_grad_()
    out = rlkern.policy_loss(lp, inp["old_logprobs"], adv, inp["mask"], config=cfg,
                             backend=backend, **kw)
    g = torch.autograd.grad(out.loss, (lp, kw["entropy"]), allow_unused=True)
    lp2 = inp["logprobs"].clone().requires_grad_()
    kw2 = dict(kw, entropy=inp["entropy"].clone().requires_grad_())
    ref, metrics = policy_loss_reference(lp2, inp["old_logprobs"], adv, inp["mask"], cfg, **kw2)
    g2 = torch.autograd.grad(ref, (lp2, kw2["entropy"]), allow_unused=True)
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(g, g2, strict=True):
        a = torch.zeros_like(lp) if a is None else a
        b = torch.zeros_like(lp) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for key, value in metrics.items():
        torch.testing.assert_close(out.metrics[key], value, rtol=1e-10, atol=1e-12,
                                   equal_nan=True)


@SETTINGS
@given(B=st.integers(1, 6), T=st.integers(1, 20), seed=st.integers(0, 10_000),
       eps_low=st.floats(0.0, 0.5), eps_high=st.floats(0.0, 0.5))
def test_on_policy_ppo_is_the_policy_gradient(B, T, seed, eps_low, eps_high):
    """logp = old ⇒ ρ = 1: loss = −mean(A) over tokens, ∂/∂logp = −A/N (any clip range)."""
    inp = make_inputs(B, T, torch.float32, seed=seed)
    lp = inp["logprobs"].clone().requires_grad_()
    out = rlkern.policy_loss(lp, inp["logprobs"], inp["advantages"], inp["mask"],
                             clip_ratio_low=eps_low, clip_ratio_high=eps_high,
                             clip_ratio_c=3.0)
    (g,) = torch.autograd.grad(out.loss, lp)
    m = inp["mask"].float()
    n = m.sum().clamp(min=1)
    adv = inp["advantages"][:, None] * m
    torch.testing.assert_close(out.loss, -(adv.sum() / n), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, -adv / n, rtol=1e-5, atol=1e-7)
    assert out.metrics["clipfrac"].item() == 0.0
    if m.sum() > 0:
        assert out.metrics["ratio_min"].item() == 1.0 == out.metrics["ratio_max"].item()


@SETTINGS
@given(B=st.integers(2, 7), T=st.integers(1, 15), seed=st.integers(0, 10_000),
       mode=st.sampled_from(["token-mean", "seq-mean-token-mean", "sum"]),
       loss=st.sampled_from(["ppo", "gspo", "sapo", "gmpo"]))
def test_row_permutation_equivariance(B, T, seed, mode, loss):
    inp = make_inputs(B, T, torch.float64, seed=seed)
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(seed))
    cfg = PolicyLossConfig(policy_loss=loss, loss_agg_mode=mode, kl_coef=0.1)

    def run(idx):
        lp = inp["logprobs"][idx].clone().requires_grad_()
        out = rlkern.policy_loss(lp, inp["old_logprobs"][idx], inp["advantages"][idx],
                                 inp["mask"][idx], ref_logprobs=inp["ref_logprobs"][idx],
                                 config=cfg)
        return out.loss, torch.autograd.grad(out.loss, lp)[0]

    l1, g1 = run(torch.arange(B))
    l2, g2 = run(perm)
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g1[perm], g2, rtol=1e-12, atol=1e-14)


@SETTINGS
@given(B=st.integers(1, 6), T=st.integers(1, 15), seed=st.integers(0, 10_000),
       scale=st.floats(0.01, 100.0))
def test_sum_is_token_mean_times_count_and_scale_is_linear(B, T, seed, scale):
    inp = make_inputs(B, T, torch.float64, seed=seed)
    args = (inp["logprobs"], inp["old_logprobs"], inp["advantages"], inp["mask"])
    n = max(float(inp["mask"].sum()), 1.0)
    a = rlkern.policy_loss(*args, loss_agg_mode="sum").loss
    b = rlkern.policy_loss(*args, loss_agg_mode="token-mean").loss
    c = rlkern.policy_loss(*args, loss_agg_mode="token-mean", loss_scale=scale).loss
    d = rlkern.policy_loss(*args, loss_agg_mode="token-mean", num_tokens=n / scale).loss
    torch.testing.assert_close(a, b * n)
    torch.testing.assert_close(c, b * scale)
    torch.testing.assert_close(d, c)
    assert math.isfinite(a.item())


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), B=st.integers(1, 8), T=st.integers(1, 90),
       f64=st.booleans(), dual=st.booleans(), delta=st.booleans(), spread=st.sampled_from(
           [0.05, 0.5, 3.0]), grad=st.booleans())
def test_one_advantage_per_response_gives_the_per_token_bits(seed, B, T, f64, dual, delta,
                                                              spread, grad):
    """PPO's CPU token loops know a row's advantage sign when there is one advantage per
    response and skip the comparisons it decides (ppo_loss's SIGN). The same values as a
    (B, T) tensor take the generic path: the loss, every metric and the gradient have the same
    bits, for positive, negative, zero (±0) and NaN advantages (checks off)."""
    dtype = torch.float64 if f64 else torch.float32
    inp = make_inputs(B, T, dtype, seed=seed, spread=spread)
    adv = inp["advantages"].clone()
    specials = [0.0, -0.0, math.nan, 1e-30, -1e-30]
    for i in range(min(B, len(specials))):
        if (seed + i) % 3 == 0:
            adv[i] = specials[i]
    cfg = PolicyLossConfig(clip_ratio_c=3.0 if dual else None, delta=1.4 if delta else None,
                           log_ratio_clamp=None if delta else 20.0)
    outs = []
    rlkern.set_checks(False)
    try:
        for a in (adv, adv[:, None].expand(B, T).contiguous()):
            lp = inp["logprobs"].clone().requires_grad_(grad)
            out = rlkern.policy_loss(lp, inp["old_logprobs"], a, inp["mask"], config=cfg,
                                     backend="cpu")
            g = torch.autograd.grad(out.loss, lp)[0] if grad else None
            outs.append((out, g))
    finally:
        rlkern.set_checks(True)
    (o1, g1), (o2, g2) = outs
    assert torch.equal(bits(o1.loss), bits(o2.loss))
    for k in o1.metrics:
        assert torch.equal(bits(o1.metrics[k]), bits(o2.metrics[k])), k
    if grad:
        assert torch.equal(bits(g1), bits(g2))
