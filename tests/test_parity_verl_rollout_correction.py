"""Parity with verl's rollout correction (``verl.trainer.ppo.rollout_corr_helper``) and its
``bypass_mode`` policy loss (``core_algos.compute_policy_loss_bypass_mode``), when importable.

* :func:`rlkern.rollout_correction` against ``compute_rollout_correction_and_rejection_mask``
  for every rejection-sampling option and threshold form, every importance-weight level and
  threshold form, with and without batch normalisation: weights, mask and every metric;
* :func:`rlkern.policy_loss` with ``PolicyLossConfig.verl(rollout_is=..., rollout_rs=...)``
  against verl's trainer pipeline (the correction replaces ``response_mask`` and adds the
  weights; the actor's loss, KL and entropy terms then use them): loss and gradients;
* ``rlkern_bypass_mode`` against verl's ``bypass_mode`` (``ppo_clip`` / ``reinforce``):
  loss, gradient and metrics.

Ragged masks with an empty response; no uuids involved. verl is optional (the ``parity``
extra): without it these tests skip with the reason.
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

_close = functools.partial(close, rtol=2e-5, atol=2e-6)
RS_OPTIONS = sorted(rollout_corr.SUPPORTED_ROLLOUT_RS_OPTIONS)
# thresholds that reject some but not all tokens / rows of _batch's inputs
_RS_THRESHOLDS = {"token_k1": ["0.8_1.25", 1.3], "token_k2": [0.02], "token_k3": [0.02],
                  "seq_sum_k1": ["0.5_1.8", 1.6], "seq_sum_k2": [0.08], "seq_sum_k3": [0.08],
                  "seq_mean_k1": ["0.9_1.1", 1.05], "seq_mean_k2": [0.01],
                  "seq_mean_k3": [0.01], "seq_max_k2": [0.025], "seq_max_k3": [0.03]}
RS_CASES = [(o, t) for o in RS_OPTIONS for t in _RS_THRESHOLDS[o]]
IS_CASES = [(level, t, norm) for level in ("token", "sequence")
            for t in (2.0, "1.1", "0.8_1.3") for norm in (False, True)]


def _batch(B=8, T=13, seed=0, spread=0.15):
    g, lp, old, adv, mask = masked_batch(B, T, seed, 0.3)
    rollout = old + torch.randn(B, T, generator=g) * spread
    ref = lp + torch.randn(B, T, generator=g) * 0.5
    entropy = torch.rand(B, T, generator=g) * 2
    return lp, old, adv, mask, rollout, ref, entropy


def _compare_standalone(kwargs, mask_dtype=torch.bool, seed=0, spread=0.15):
    _, old, _, mask, rollout, *_ = _batch(seed=seed, spread=spread)
    mask = mask.to(mask_dtype)
    theirs_w, theirs_mask, theirs = rollout_corr.compute_rollout_correction_and_rejection_mask(
        old, rollout, mask, **kwargs)
    ours = rlkern.rollout_correction(old, rollout, mask, **kwargs)
    if theirs_w is None:
        assert ours.weights is None
    else:
        _close(ours.weights, theirs_w.batch["rollout_is_weights"], f"{kwargs} weights")
    assert ours.mask.dtype == theirs_mask.dtype and torch.equal(ours.mask, theirs_mask), kwargs
    assert set(ours.metrics) == set(theirs), set(ours.metrics) ^ set(theirs)
    for key, value in theirs.items():
        close(ours.metrics[key], value, f"{kwargs} {key}", rtol=1e-4, atol=1e-5)
    return ours


@pytest.mark.parametrize("kwargs", [
    {},
    dict(rollout_is="token", rollout_is_threshold="0.7_1.4", rollout_is_batch_normalize=True),
    dict(rollout_is="sequence", rollout_rs="seq_sum_k2", rollout_rs_threshold=0.08),
    dict(rollout_rs="token_k1", rollout_rs_threshold="0.8_1.25"),
])
def test_verl_signature_drop_in(kwargs):
    """``verl_rollout.compute_rollout_correction_and_rejection_mask``: verl's triple (the
    weights in a DataProto, None without rollout_is), with rlkern's values."""
    from rlkern.integrations.verl_rollout import compute_rollout_correction_and_rejection_mask

    _, old, _, mask, rollout, *_ = _batch(seed=2)
    theirs_w, theirs_mask, theirs = rollout_corr.compute_rollout_correction_and_rejection_mask(
        old, rollout, mask, **kwargs)
    ours_w, ours_mask, ours = compute_rollout_correction_and_rejection_mask(old, rollout, mask,
                                                                           **kwargs)
    if theirs_w is None:
        assert ours_w is None
    else:
        assert type(ours_w) is type(theirs_w)
        _close(ours_w.batch["rollout_is_weights"], theirs_w.batch["rollout_is_weights"],
               f"{kwargs} weights")
    assert ours_mask.dtype == theirs_mask.dtype and torch.equal(ours_mask, theirs_mask)
    assert set(ours) == set(theirs)
    assert all(type(v) is float for v in ours.values())
    for key, value in theirs.items():
        close(ours[key], value, f"{kwargs} {key}", rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("option,threshold", RS_CASES)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_rejection_options(option, threshold, mask_dtype):
    out = _compare_standalone(dict(rollout_rs=option, rollout_rs_threshold=threshold),
                              mask_dtype)
    kept = out.metrics["rollout_corr/rollout_rs_masked_fraction"]
    assert 0.0 < kept < 1.0, f"{option} {threshold} rejects {kept}"


@pytest.mark.parametrize("level,threshold,normalize", IS_CASES)
def test_importance_weights(level, threshold, normalize):
    _compare_standalone(dict(rollout_is=level, rollout_is_threshold=threshold,
                             rollout_is_batch_normalize=normalize),
                        spread=0.15 if level == "token" else 0.03)


def test_weights_and_chained_rejection():
    _compare_standalone(dict(rollout_is="token", rollout_is_threshold="0.7_1.4",
                             rollout_is_batch_normalize=True,
                             rollout_rs="token_k1,seq_mean_k3,seq_max_k2,token_k1",
                             rollout_rs_threshold="0.8_1.3,0.02,0.1"), seed=3)
    _compare_standalone(dict(rollout_is="sequence", rollout_rs="seq_sum_k2,seq_mean_k1",
                             rollout_rs_threshold="0.1,0.95_1.05"),
                        mask_dtype=torch.float32, seed=4, spread=0.03)


@pytest.mark.parametrize("kwargs", [
    dict(rollout_rs="token_k4", rollout_rs_threshold=1.0),
    dict(rollout_rs="token_k2,seq_sum_k2", rollout_rs_threshold="1,2,3"),
    dict(rollout_rs="seq_max_k3", rollout_rs_threshold="0.1_1"),
    dict(rollout_rs="token_k1", rollout_rs_threshold="2_1"),
    dict(rollout_rs="token_k2"),
    dict(rollout_is="tokens"),
    dict(rollout_is="token", rollout_is_threshold="3_2"),
])
def test_bad_options_raise_what_verl_raises(kwargs):
    _, old, _, mask, rollout, *_ = _batch()
    with pytest.raises((ValueError, TypeError)) as theirs:
        rollout_corr.compute_rollout_correction_and_rejection_mask(old, rollout, mask, **kwargs)
    with pytest.raises(theirs.type) as ours:
        rlkern.rollout_correction(old, rollout, mask, **kwargs)
    if "Must be one of {" not in str(theirs.value):  # a set's order varies between runs
        assert str(ours.value) == str(theirs.value)


def _grads(fn, lp, entropy):
    x, e = lp.clone().requires_grad_(), entropy.clone().requires_grad_()
    loss = fn(x, e)
    return (loss.detach(), *torch.autograd.grad(loss, [x, e], allow_unused=True))


@pytest.mark.parametrize("option,threshold", [(o, _RS_THRESHOLDS[o][0]) for o in RS_OPTIONS])
@pytest.mark.parametrize("name,agg", [("vanilla", "token-mean"),
                                      ("gpg", "seq-mean-token-mean")])
def test_fused_loss_with_rejection(option, threshold, name, agg):
    """verl's trainer pipeline (rejection replaces response_mask, token IS weights) then the
    actor's loss with KL and entropy, against one rlkern.policy_loss call."""
    lp, old, adv, mask, rollout, ref, entropy = _batch(seed=RS_OPTIONS.index(option))
    rc = dict(rollout_is="token", rollout_is_threshold=1.2, rollout_rs=option,
              rollout_rs_threshold=threshold, rollout_is_batch_normalize=True)
    w, new_mask, verl_metrics = rollout_corr.compute_rollout_correction_and_rejection_mask(
        old, rollout, mask, **rc)
    fn = core_algos.get_policy_loss_fn(name)
    vcfg = fsdp_actor_config()

    def verl_loss(x, e):
        pg, _ = fn(old, x, adv, new_mask, loss_agg_mode=agg, config=vcfg,
                   rollout_is_weights=w.batch["rollout_is_weights"])
        kl = core_algos.agg_loss(core_algos.kl_penalty(x, ref, "low_var_kl"), new_mask, agg)
        return pg - 0.01 * core_algos.agg_loss(e, new_mask, agg) + 0.05 * kl

    cfg = PolicyLossConfig.verl(policy_loss=name, loss_agg_mode=agg, clip_ratio_low=0.2,
                                clip_ratio_high=0.28, use_kl_loss=True, kl_loss_coef=0.05,
                                entropy_coeff=0.01, **rc)
    theirs = _grads(verl_loss, lp, entropy)
    ours = _grads(lambda x, e: rlkern.policy_loss(x, old, adv, mask, config=cfg,
                                                  rollout_logprobs=rollout, ref_logprobs=ref,
                                                  entropy=e).loss, lp, entropy)
    for a, b, what in zip(ours, theirs, ("loss", "∂/∂logp", "∂/∂entropy"), strict=True):
        _close(a, b, f"{option} {name} {what}")
    metrics = rlkern.policy_loss(lp, old, adv, mask, config=cfg, rollout_logprobs=rollout,
                                 ref_logprobs=ref, entropy=entropy).metrics
    _close(metrics["rollout_rs_masked_fraction"],
           verl_metrics["rollout_corr/rollout_rs_masked_fraction"], "masked fraction")


@pytest.mark.parametrize("level,threshold,normalize", IS_CASES)
def test_fused_loss_with_weights(level, threshold, normalize):
    lp, old, adv, mask, rollout, *_ = _batch(seed=11, spread=0.15 if level == "token" else 0.03)
    rc = dict(rollout_is=level, rollout_is_threshold=threshold,
              rollout_is_batch_normalize=normalize)
    w, _, _ = rollout_corr.compute_rollout_correction_and_rejection_mask(old, rollout, mask,
                                                                         **rc)
    fn = core_algos.get_policy_loss_fn("vanilla")
    vcfg = fsdp_actor_config()
    theirs = _grads(lambda x, e: fn(old, x, adv, mask, loss_agg_mode="token-mean", config=vcfg,
                                    rollout_is_weights=w.batch["rollout_is_weights"])[0]
                    + 0 * e.sum(), lp, torch.zeros_like(lp))
    cfg = PolicyLossConfig.verl(clip_ratio_low=0.2, clip_ratio_high=0.28, **rc)
    ours = _grads(lambda x, e: rlkern.policy_loss(x, old, adv, mask, config=cfg,
                                                  rollout_logprobs=rollout).loss + 0 * e.sum(),
                  lp, torch.zeros_like(lp))
    _close(ours[0], theirs[0], f"{rc} loss")
    _close(ours[1], theirs[1], f"{rc} grad")


BYPASS_CONFIGS = [
    {},
    dict(rollout_is=None),
    dict(rollout_is="token", rollout_is_threshold=1.5),
    dict(rollout_is="token", rollout_is_threshold="0.8_1.25", rollout_is_batch_normalize=True,
         rollout_rs="token_k1", rollout_rs_threshold=1.3),
    dict(rollout_is="sequence", rollout_is_threshold=3.0, rollout_rs="seq_mean_k2,seq_max_k3",
         rollout_rs_threshold="0.05,0.2"),
]


@pytest.mark.parametrize("rc", BYPASS_CONFIGS)
@pytest.mark.parametrize("loss_type", ["ppo_clip", "reinforce"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum"])
def test_bypass_mode(rc, loss_type, agg):
    from verl.trainer.config.algorithm import RolloutCorrectionConfig
    from verl.workers.config.actor import PolicyLossConfig as VerlPolicyLossConfig

    import rlkern.integrations.verl as rv

    lp, old, adv, mask, *_ = _batch(seed=BYPASS_CONFIGS.index(rc), spread=0.1)
    policy = VerlPolicyLossConfig(loss_mode="bypass_mode", rollout_correction=(
        RolloutCorrectionConfig(loss_type=loss_type, **rc)))
    vcfg = fsdp_actor_config(fields={"policy_loss": policy})
    results = []
    for fn in (core_algos.compute_policy_loss_bypass_mode,
               rv.POLICY_LOSSES["rlkern_bypass_mode"]):
        x = lp.clone().requires_grad_()
        loss, metrics = fn(old, x, adv, mask, loss_agg_mode=agg, config=vcfg)
        results.append((loss.detach(), torch.autograd.grad(loss, x)[0], metrics))
    (ours, g_ours, m_ours), (theirs, g_theirs, m_theirs) = results[1], results[0]
    _close(ours, theirs, f"{loss_type} {rc} loss")
    _close(g_ours, g_theirs, f"{loss_type} {rc} grad")
    assert set(m_ours) == set(m_theirs), set(m_ours) ^ set(m_theirs)
    for key, value in m_theirs.items():
        close(m_ours[key], value, f"{loss_type} {rc} {key}", rtol=1e-4, atol=1e-5)


def test_bypass_mode_errors_and_registration():
    from verl.trainer.config.algorithm import RolloutCorrectionConfig
    from verl.workers.config.actor import PolicyLossConfig as VerlPolicyLossConfig

    import rlkern.integrations.verl as rv

    fn = rv.POLICY_LOSSES["rlkern_bypass_mode"]
    lp, old, adv, mask, *_ = _batch()
    with pytest.raises(ValueError, match="config is required"):
        fn(old, lp, adv, mask)
    policy = VerlPolicyLossConfig(rollout_correction=RolloutCorrectionConfig(loss_type="ppo"))
    with pytest.raises(ValueError, match=r"Invalid loss_type: ppo\. Must be 'reinforce' or "
                                         r"'ppo_clip'\."):
        fn(old, lp, adv, mask, config=fsdp_actor_config(fields={"policy_loss": policy}))
    rv.register()
    try:
        assert core_algos.get_policy_loss_fn("rlkern_bypass_mode") is fn
    finally:
        rv.unregister()
