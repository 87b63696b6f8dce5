"""Parity with verl's own policy losses (verl.trainer.ppo.core_algos), when importable.

verl's functions are called as its actor calls them: ``compute_policy_loss_<name>(old,
log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)`` with an
``FSDPActorConfig`` (whose ``global_batch_info`` carries dp_size / batch_num_tokens /
global_batch_size / loss_scale_factor), ``agg_loss``, ``kl_penalty``, and
``rollout_corr_helper.compute_rollout_correction_weights``; the actor's total loss is composed
exactly as ``verl.workers.utils.losses.ppo_loss`` composes it (pg − entropy_coeff·agg(H) +
kl_loss_coef·agg(kl)). rlkern gets the same tensors and ``PolicyLossConfig.verl(...)``.
Loss, ∂/∂log_prob, ∂/∂entropy and verl's metrics are compared in float32.

verl is optional, not part of CI: ``pip install -e ".[parity]" && pip install --no-deps verl``
(verl's own pins conflict with this environment); without it these tests skip with that
reason.
"""

from __future__ import annotations

import functools

import pytest
import torch

import rlkern
from rlkern import PolicyLossConfig
from verl_cases import close, fsdp_actor_config, import_verl, masked_batch

core_algos, rollout_corr = import_verl()

pytestmark = pytest.mark.parity

VERL_LOSSES = ["vanilla", "gspo", "cispo", "sapo", "geo_mean", "gpg"]
AGG_MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
             "seq-mean-token-sum-norm", "token-sum"]


_verl_config = fsdp_actor_config
_close = functools.partial(close, rtol=2e-5, atol=2e-6)


def _batch(B=8, T=13, seed=0, spread=0.4):
    g, lp, old, adv, mask = masked_batch(B, T, seed, spread)
    ref = lp + torch.randn(B, T, generator=g) * 0.5
    rollout = old + torch.randn(B, T, generator=g) * 0.2
    entropy = torch.rand(B, T, generator=g) * 2
    return lp, old, adv, mask, ref, rollout, entropy


def _grads(fn, lp, entropy=None):
    x = lp.clone().requires_grad_()
    e = None if entropy is None else entropy.clone().requires_grad_()
    loss, extra = fn(x, e)
    wrt = [x] + ([e] if e is not None else [])
    return loss.detach(), torch.autograd.grad(loss, wrt), extra


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("name", VERL_LOSSES)
def test_policy_losses(name, agg):
    lp, old, adv, mask, *_ = _batch(seed=VERL_LOSSES.index(name) * 10 + AGG_MODES.index(agg))
    vcfg = _verl_config()
    fn = core_algos.get_policy_loss_fn(name)
    theirs, g_theirs, metrics = _grads(
        lambda x, e: fn(old, x, adv, mask, loss_agg_mode=agg, config=vcfg), lp)
    cfg = PolicyLossConfig.verl(policy_loss=name, loss_agg_mode=agg, clip_ratio_low=0.2,
                                clip_ratio_high=0.28)
    ours, g_ours, out = _grads(
        lambda x, e: (lambda o: (o.loss, o.metrics))(
            rlkern.policy_loss(x, old, adv, mask, config=cfg)), lp)
    _close(ours, theirs, f"{name}/{agg} loss")
    _close(g_ours[0], g_theirs[0], f"{name}/{agg} grad")
    if "actor/ppo_kl" in metrics:
        _close(out["approx_kl"], metrics["actor/ppo_kl"], "ppo_kl")
    key = {"vanilla": "clipfrac", "gspo": "clipfrac", "cispo": "clipfrac",
           "geo_mean": "clipfrac_high"}.get(name)
    if key:
        _close(out[key], metrics["actor/pg_clipfrac"], f"{name} pg_clipfrac")
    lower = {"vanilla": "dualclip_frac", "geo_mean": "clipfrac_low"}.get(name)
    if lower:
        _close(out[lower], metrics["actor/pg_clipfrac_lower"], f"{name} pg_clipfrac_lower")


@pytest.mark.parametrize("name", ["vanilla", "gspo", "sapo"])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_global_batch_normalisation(name, agg):
    """dp_size, batch_num_tokens, global_batch_size and loss_scale_factor (data parallel)."""
    lp, old, adv, mask, *_ = _batch(seed=3)
    info = dict(dp_size=4, batch_num_tokens=211, global_batch_size=29, loss_scale_factor=40)
    vcfg = _verl_config(**info)
    fn = core_algos.get_policy_loss_fn(name)
    theirs, g_theirs, _ = _grads(lambda x, e: fn(old, x, adv, mask, loss_agg_mode=agg,
                                                 config=vcfg), lp)
    cfg = PolicyLossConfig.verl(policy_loss=name, loss_agg_mode=agg, clip_ratio_low=0.2,
                                clip_ratio_high=0.28, loss_scale_factor=40, dp_size=4)
    ours, g_ours, _ = _grads(lambda x, e: (rlkern.policy_loss(
        x, old, adv, mask, config=cfg, num_tokens=211, num_seqs=29).loss, None), lp)
    _close(ours, theirs, f"{name}/{agg}")
    _close(g_ours[0], g_theirs[0], f"{name}/{agg} grad")


@pytest.mark.parametrize("agg", AGG_MODES)
def test_agg_loss_every_mode(agg):
    """agg_loss itself, through rlkern's reinforce loss with A = −x and logp = 1 (ℓ = x)."""
    lp, old, _adv, mask, *_ = _batch(seed=4)
    x = torch.randn(lp.shape, generator=torch.Generator().manual_seed(5))
    theirs = core_algos.agg_loss(x, mask, agg)
    ours = rlkern.policy_loss(torch.ones_like(x), old, -x, mask, policy_loss="reinforce",
                              loss_agg_mode=agg).loss
    _close(ours, theirs, agg)


@pytest.mark.parametrize("estimator", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3",
                                       "k1+", "abs+", "k2+", "k3+", "low_var_kl+"])
def test_kl_penalty(estimator):
    lp, _, _, _, ref, *_ = _batch(seed=6)
    ref = ref + torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)) * 4
    x1, x2 = lp.clone().requires_grad_(), lp.clone().requires_grad_()
    theirs = core_algos.kl_penalty(x1, ref, estimator)
    ours = rlkern.kl_penalty(x2, ref, estimator=estimator)
    _close(ours, theirs, estimator)
    w = torch.randn(lp.shape)
    _close(torch.autograd.grad((ours * w).sum(), x2)[0],
           torch.autograd.grad((theirs * w).sum(), x1)[0], f"{estimator} grad")
    # the drop-in with verl's signature (positional name) is the same function
    from rlkern.integrations.verl import kl_penalty

    assert torch.equal(kl_penalty(lp, ref, estimator), ours.detach())


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("threshold", [2.0, 1.1, "0.9_1.2"])
@pytest.mark.parametrize("name", ["vanilla", "gspo", "geo_mean"])
def test_rollout_correction(level, threshold, name):
    lp, old, adv, mask, _, rollout, _ = _batch(seed=7, spread=0.2)
    weights, _ = rollout_corr.compute_rollout_correction_weights(
        old - rollout, mask, rollout_is=level, rollout_is_threshold=threshold)
    fn = core_algos.get_policy_loss_fn(name)
    vcfg = _verl_config()
    theirs, g_theirs, _ = _grads(lambda x, e: fn(old, x, adv, mask, loss_agg_mode="token-mean",
                                                 config=vcfg, rollout_is_weights=weights), lp)
    cfg = PolicyLossConfig.verl(policy_loss=name, clip_ratio_low=0.2, clip_ratio_high=0.28,
                                rollout_is=level, rollout_is_threshold=threshold)
    ours, g_ours, _ = _grads(lambda x, e: (rlkern.policy_loss(
        x, old, adv, mask, config=cfg, rollout_logprobs=rollout).loss, None), lp)
    _close(ours, theirs, f"{name} {level} {threshold}")
    _close(g_ours[0], g_theirs[0], f"{name} {level} {threshold} grad")


@pytest.mark.parametrize("name", ["vanilla", "gspo", "sapo", "geo_mean"])
@pytest.mark.parametrize("kl_type", ["low_var_kl", "k3+", "k2", "abs"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_actor_loss_with_kl_and_entropy(name, kl_type, agg):
    """verl.workers.utils.losses.ppo_loss's composition: pg − entropy_coeff·agg(entropy)
    + kl_loss_coef·agg(kl_penalty), every term with verl's own functions."""
    lp, old, adv, mask, ref, _, entropy = _batch(seed=8)
    vcfg = _verl_config()
    fn = core_algos.get_policy_loss_fn(name)

    def verl_loss(x, e):
        pg, _ = fn(old, x, adv, mask, loss_agg_mode=agg, config=vcfg)
        ent = core_algos.agg_loss(e, mask, agg)
        kld = core_algos.kl_penalty(x, ref, kl_type)
        kl = core_algos.agg_loss(kld, mask, agg)
        return pg - 0.01 * ent + kl * 0.05, None

    theirs, g_theirs, _ = _grads(verl_loss, lp, entropy)
    cfg = PolicyLossConfig.verl(policy_loss=name, loss_agg_mode=agg, clip_ratio_low=0.2,
                                clip_ratio_high=0.28, use_kl_loss=True, kl_loss_coef=0.05,
                                kl_loss_type=kl_type, entropy_coeff=0.01)
    ours, g_ours, _ = _grads(lambda x, e: (rlkern.policy_loss(
        x, old, adv, mask, config=cfg, ref_logprobs=ref, entropy=e).loss, None), lp, entropy)
    _close(ours, theirs, f"{name} {kl_type}")
    _close(g_ours[0], g_theirs[0], f"{name} {kl_type} ∂/∂logp")
    _close(g_ours[1], g_theirs[1], f"{name} {kl_type} ∂/∂entropy")
