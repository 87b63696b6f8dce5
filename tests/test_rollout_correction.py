"""verl's rollout correction in rlkern without verl: the option grammar and its errors, the
rejection sampling and batch normalisation of the fused loss (against the float64 reference
and against the loss on a reduced mask), the standalone :func:`rlkern.rollout_correction`.
Parity with verl's own functions: tests/test_parity_verl_rollout_correction.py."""

from __future__ import annotations

import math

import pytest
import torch

import rlkern
from policy_loss_cases import CASES, call_kwargs, make_inputs
from rlkern import PolicyLossConfig
from rlkern.config.rollout_correction import ROLLOUT_RS_OPTIONS, RolloutCorrection
from rlkern.reference.rollout_correction import rejection_mask_reference

RS_CASES = ["rollout-rs-token", "rollout-rs-seq-addons", "rollout-rs-batch-norm",
            "verl-preset-rs"]


def _batch(B=6, T=11, seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3
    rollout = old + torch.randn(B, T, generator=g) * spread
    mask = torch.rand(B, T, generator=g) < 0.75
    mask[1] = False
    mask[0, 0] = True
    return old, rollout, mask


# ------------------------------------------------------------------------------ the grammar


def test_options_and_thresholds_parse_as_verl():
    rc = RolloutCorrection.from_verl(rollout_rs=" token_k1, seq_max_k3,token_k1",
                                     rollout_rs_threshold="0.5_2.0, 0.1")
    assert [o.name for o in rc.rejection] == ["token_k1", "seq_max_k3"]  # deduplicated
    k1, k3 = rc.rejection
    assert (k1.level, k1.estimator) == ("token", "k1")
    assert k1.lower == pytest.approx(math.log(0.5)) and k1.upper == pytest.approx(math.log(2))
    assert (k3.level, k3.lower, k3.upper) == ("max", None, 0.1)
    # one number for a k1 option: [1/u, u]
    (k1,) = RolloutCorrection.from_verl(rollout_rs="seq_sum_k1",
                                        rollout_rs_threshold=4.0).rejection
    assert (k1.level, k1.lower, k1.upper) == ("sum", pytest.approx(-math.log(4)),
                                              pytest.approx(math.log(4)))
    rc = RolloutCorrection.from_verl(rollout_is="sequence", rollout_is_threshold="0.5_1.5")
    assert (rc.is_level, rc.is_lower, rc.is_upper, rc.icepop) == ("sequence", 0.5, 1.5, True)
    rc = RolloutCorrection.from_verl(rollout_is="token", rollout_is_threshold="3")
    assert (rc.is_upper, rc.icepop) == (3.0, False)
    assert RolloutCorrection.from_verl(rollout_is="token", rollout_is_threshold=None
                                       ).is_level is None  # verl: no weights without one
    assert len(ROLLOUT_RS_OPTIONS) == 11
    cfg = {"rollout_is": "token", "rollout_rs": "token_k2", "rollout_rs_threshold": 0.1}
    assert RolloutCorrection.from_config(cfg).rejection[0].upper == 0.1


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(rollout_rs="token_k4", rollout_rs_threshold=1.0), ValueError,
     r"Invalid rollout_rs option: token_k4\. Must be one of \['seq_max_k2'"),
    (dict(rollout_rs="seq_max_k1", rollout_rs_threshold=1.0), ValueError,
     "Invalid rollout_rs option: seq_max_k1"),
    (dict(rollout_rs=" , ", rollout_rs_threshold=1.0), ValueError,
     "must contain at least one valid option"),
    (dict(rollout_rs="token_k2"), ValueError, "rollout_rs_threshold must be explicitly provided"),
    (dict(rollout_rs="token_k2,token_k3", rollout_rs_threshold="1,2,3"), ValueError,
     "either one threshold shared by all options or exactly 2 thresholds"),
    (dict(rollout_rs="token_k2", rollout_rs_threshold="0.1_1"), ValueError,
     "must provide a single upper bound without '_'"),
    (dict(rollout_rs="token_k2", rollout_rs_threshold="-1"), ValueError,
     "Threshold for option 'token_k2' must be positive"),
    (dict(rollout_rs="token_k1", rollout_rs_threshold="2_1"), ValueError,
     "must be lower <= upper"),
    (dict(rollout_rs="token_k1", rollout_rs_threshold="a_1"), ValueError,
     "Invalid numeric threshold 'a_1' for option 'token_k1'"),
    (dict(rollout_rs="token_k1", rollout_rs_threshold=[1]), TypeError,
     "must be a string or numeric value"),
    (dict(rollout_rs=3, rollout_rs_threshold=1.0), ValueError, "must be a non-empty string"),
    (dict(rollout_is="tokens"), ValueError, "Invalid rollout_is: tokens"),
    (dict(rollout_is="token", rollout_is_threshold=True), TypeError, "not a boolean"),
    (dict(rollout_is="token", rollout_is_threshold=""), ValueError, "must not be an empty"),
    (dict(rollout_is="token", rollout_is_threshold="x"), ValueError,
     "Invalid rollout_is_threshold 'x'"),
    (dict(rollout_is="token", rollout_is_threshold=0.0), ValueError, "upper bound must be "
     "positive"),
    (dict(rollout_is="token", rollout_is_threshold="3_2"), ValueError, "lower bound must be <="),
    (dict(rollout_is="token", rollout_is_batch_normalize=1), TypeError, "must be a bool"),
])
def test_bad_options_raise_verls_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        RolloutCorrection.from_verl(**kwargs)
    with pytest.raises(error, match=match):  # the standalone op checks before any work
        rlkern.rollout_correction(*_batch(), **kwargs)


def test_config_refuses_what_the_fused_loss_cannot_do():
    with pytest.raises(ValueError, match="Invalid rollout_rs option"):
        PolicyLossConfig(rollout_rs="k9", rollout_rs_threshold=1.0)
    with pytest.raises(ValueError, match="sequence-level rollout_correction with a token-level"):
        PolicyLossConfig(rollout_correction="sequence_truncate", rollout_rs="token_k2",
                         rollout_rs_threshold=0.1)
    with pytest.raises(ValueError, match="needs a rollout_correction"):
        PolicyLossConfig(rollout_batch_normalize=True)
    with pytest.raises(ValueError, match="not 'vespo'"):
        PolicyLossConfig(policy_loss="vespo", rollout_correction="token_truncate",
                         rollout_batch_normalize=True)
    with pytest.raises(TypeError, match="rollout_batch_normalize must be a bool"):
        PolicyLossConfig(rollout_correction="token_truncate", rollout_batch_normalize="yes")
    with pytest.raises(ValueError, match="entropy quantile"):
        PolicyLossConfig(rollout_rs="token_k2", rollout_rs_threshold=0.1,
                         top_entropy_quantile=0.5)
    # the verl preset drops the normalisation without weights, as verl does
    assert not PolicyLossConfig.verl(rollout_is_batch_normalize=True).rollout_batch_normalize
    cfg = PolicyLossConfig.verl(rollout_is="token", rollout_rs="token_k2",
                                rollout_rs_threshold=0.1)
    with pytest.raises(ValueError, match="needs whole batches"):
        cfg.to_args()
    norm = PolicyLossConfig(rollout_correction="token_truncate", rollout_batch_normalize=True)
    assert PolicyLossConfig.from_args(*norm.to_args()) == norm


def test_chunked_loss_refuses_rejection_and_batch_normalisation():
    inp = make_inputs(4, 6, torch.float32)
    for name in ("rollout-rs-token", "rollout-batch-norm-seq"):
        args, kw = call_kwargs(CASES[name], inp)
        with pytest.raises(ValueError, match="need the whole batch"):
            rlkern.ops.policy_loss.policy_loss_chunk(*args, config=CASES[name].config,
                                                     num_tokens=10.0, num_seqs=4.0, **kw)


# ------------------------------------------------------------------------------ the fused loss


@pytest.mark.parametrize("name", RS_CASES)
def test_rejection_cases_reject_some_tokens_but_not_all(name):
    """The policy_loss_cases rows (every backend checks them against the reference) do
    exercise the rejection: some valid tokens go, some stay."""
    inp = make_inputs(6, 11, torch.float64, seed=0)
    cfg = CASES[name].config
    keep = rejection_mask_reference(inp["old_logprobs"], inp["rollout_logprobs"], inp["mask"],
                                    cfg.rejection())
    assert 0 < int(keep.sum()) < int(inp["mask"].sum())


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_rejection_equals_the_loss_on_the_reduced_mask(backend):
    """Rejection sampling = the same loss (every term, every metric) on the mask with the
    rejected tokens removed, and the gradient is 0 at rejected tokens."""
    inp = make_inputs(8, 12, torch.float64, seed=5)
    base = PolicyLossConfig(rollout_correction="token_truncate", rollout_max=1.2, kl_coef=0.1,
                            entropy_coef=0.01, loss_agg_mode="seq-mean-token-mean")
    cfg = base.replace(rollout_rs="seq_mean_k2,token_k1", rollout_rs_threshold="0.01,0.8_1.25")
    keep = rejection_mask_reference(inp["old_logprobs"], inp["rollout_logprobs"], inp["mask"],
                                    cfg.rejection())
    assert 0 < int(keep.sum()) < int(inp["mask"].sum())
    lp = inp["logprobs"].clone().requires_grad_()
    kw = dict(rollout_logprobs=inp["rollout_logprobs"], ref_logprobs=inp["ref_logprobs"],
              entropy=inp["entropy"], backend=backend)
    ours = rlkern.policy_loss(lp, inp["old_logprobs"], inp["advantages"], inp["mask"],
                              config=cfg, **kw)
    lp2 = inp["logprobs"].clone().requires_grad_()
    want = rlkern.policy_loss(lp2, inp["old_logprobs"], inp["advantages"], keep, config=base,
                              **kw)
    torch.testing.assert_close(ours.loss, want.loss)
    for k in want.metrics:
        torch.testing.assert_close(ours.metrics[k], want.metrics[k], msg=k)
    # the one metric rejection adds: verl's rollout_rs_masked_fraction, from the row counts
    assert set(ours.metrics) - set(want.metrics) == {"rollout_rs_masked_fraction"}
    verl_like = rlkern.rollout_correction(inp["old_logprobs"], inp["rollout_logprobs"],
                                          inp["mask"], rollout_rs=cfg.rollout_rs,
                                          rollout_rs_threshold=cfg.rollout_rs_threshold)
    assert float(ours.metrics["rollout_rs_masked_fraction"]) == pytest.approx(
        verl_like.metrics["rollout_corr/rollout_rs_masked_fraction"], rel=1e-12)
    assert torch.equal(verl_like.mask, keep)
    g, g2 = torch.autograd.grad(ours.loss, lp)[0], torch.autograd.grad(want.loss, lp2)[0]
    torch.testing.assert_close(g, g2)
    assert (g[inp["mask"] & ~keep] == 0).all()


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_batch_normalisation_divides_the_policy_term(level):
    inp = make_inputs(8, 12, torch.float64, seed=6)
    base = PolicyLossConfig(rollout_correction=f"{level}_truncate", rollout_max=1.3,
                            kl_coef=0.1)
    args = (inp["old_logprobs"], inp["advantages"], inp["mask"])
    kw = dict(rollout_logprobs=inp["rollout_logprobs"], ref_logprobs=inp["ref_logprobs"])
    lp = inp["logprobs"]
    plain = rlkern.policy_loss(lp, *args, config=base, **kw)
    normed = rlkern.policy_loss(lp, *args, config=base.replace(rollout_batch_normalize=True),
                                **kw)
    w = rlkern.rollout_correction(inp["old_logprobs"], inp["rollout_logprobs"], inp["mask"],
                                  rollout_is=level, rollout_is_threshold=1.3).weights
    m = inp["mask"]
    if level == "token":
        c = w[m].sum() / (m.sum() + 1e-8)
    else:
        lens = m.sum(1)
        c = (w.sum(1) / (lens + 1e-8))[lens > 0].mean()
    assert not math.isclose(float(c), 1.0, rel_tol=1e-3)
    torch.testing.assert_close(normed.metrics["pg_loss"], plain.metrics["pg_loss"] / c)
    torch.testing.assert_close(normed.metrics["kl_loss"], plain.metrics["kl_loss"])


# ------------------------------------------------------------------------------ standalone


def test_standalone_outputs():
    old, rollout, mask = _batch()
    out = rlkern.rollout_correction(old, rollout, mask.float(), rollout_is="sequence",
                                    rollout_is_threshold="0.5_2",
                                    rollout_rs="token_k3,seq_sum_k2",
                                    rollout_rs_threshold="0.05,0.5")
    assert out.weights.dtype == old.dtype and out.mask.dtype == torch.float32
    assert (out.weights[~mask] == 0).all()
    assert ((out.mask == 0) | mask).all() and 0 < out.mask.sum() < mask.sum()
    for key in ("rollout_corr/rollout_is_mean", "rollout_corr/rollout_is_oob_ratio",
                "rollout_corr/rollout_rs_token_k3_masked_fraction",
                "rollout_corr/rollout_rs_seq_sum_k2_seq_max", "rollout_corr/chi2_seq",
                "rollout_corr/rollout_rs_masked_fraction", "rollout_corr/training_ppl"):
        assert isinstance(out.metrics[key], float), key
    none = rlkern.rollout_correction(old, rollout, mask)
    assert none.weights is None and torch.equal(none.mask, mask)
    assert none.mask is not mask
    assert not any("rollout_is" in k or "rollout_rs" in k for k in none.metrics)


def test_standalone_bad_inputs():
    old, rollout, mask = _batch()
    with pytest.raises(ValueError, match="at least one valid token"):
        rlkern.rollout_correction(old, rollout, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="does not match rollout_log_prob shape"):
        rlkern.rollout_correction(old, rollout[:, 1:], mask)
    with pytest.raises(ValueError, match="does not match response_mask shape"):
        rlkern.rollout_correction(old, rollout, mask[:, 1:])
    with pytest.raises(TypeError, match="floating-point"):
        rlkern.rollout_correction(old.long(), rollout, mask)


@pytest.mark.parametrize("B,T,masked", [(0, 5, False), (3, 0, False), (3, 4, True)])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_fused_loss_on_empty_inputs(B, T, masked, backend):
    """No rows, no tokens or no valid token: loss 0, zero gradient, nothing rejected."""
    cfg = PolicyLossConfig(rollout_correction="token_truncate", rollout_batch_normalize=True,
                           rollout_rs="seq_max_k2,seq_mean_k1,token_k3",
                           rollout_rs_threshold="0.1,2,0.1")
    lp = torch.randn(B, T).requires_grad_()
    mask = torch.full((B, T), not masked)
    out = rlkern.policy_loss(lp, lp.detach(), torch.randn(B), mask, config=cfg,
                             rollout_logprobs=lp.detach() + 0.01, backend=backend)
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0 and not lp.grad.any()
    assert float(out.metrics["rollout_rs_masked_fraction"]) == 0.0
