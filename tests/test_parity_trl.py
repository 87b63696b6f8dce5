"""Parity with TRL's own functions (trl.trainer.utils), when trl is importable.

TRL computes ``selective_log_softmax(logits, ids, temperature)`` and
``entropy_from_logits(logits / T)`` on CPU in the logits' dtype; rlkern must give the same
numbers (tight for float32 inputs, within bf16 rounding for bfloat16 inputs, where TRL's own
result is rounded to bf16 and rlkern's is not).
"""

from __future__ import annotations

import pytest
import torch

import rlkern
import rlkern.reference

trl_utils = pytest.importorskip("trl.trainer.utils", reason="trl is not installed")


def _trl_outputs(logits, ids, temperature):
    # TRL's training step: logits[:, :-1] against the next tokens.
    shifted, targets = logits[:, :-1, :], ids[:, 1:]
    lp = trl_utils.selective_log_softmax(shifted, targets, temperature)
    ent = trl_utils.entropy_from_logits(shifted / temperature)
    out = rlkern.token_logprobs(shifted, targets, temperature=temperature, return_entropy=True)
    return out, lp.double(), ent.double(), shifted, targets


@pytest.mark.parity
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_trl_float32(temperature):
    logits = torch.randn(2, 7, 5003) * 3
    ids = torch.randint(0, 5003, (2, 7))
    out, lp, ent, _, _ = _trl_outputs(logits, ids, temperature)
    torch.testing.assert_close(out.logprobs.double(), lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy.double(), ent, rtol=1e-5, atol=1e-5)


@pytest.mark.parity
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_bf16_agrees_with_trl_and_is_closer_to_the_truth(temperature):
    """TRL computes bf16 inputs in bf16 (8 significant bits, plus a rounding of logits / T);
    rlkern accumulates in fp32. Both must agree to bf16 resolution, and rlkern's error against
    the float64 truth must not exceed TRL's."""
    logits = (torch.randn(2, 7, 5003) * 3).bfloat16()
    ids = torch.randint(0, 5003, (2, 7))
    out, lp, ent, shifted, targets = _trl_outputs(logits, ids, temperature)
    truth = rlkern.reference.token_logprobs_reference(shifted.double(), targets,
                                                      temperature=temperature)
    for ours, theirs, key in ((out.logprobs, lp, "logprobs"), (out.entropy, ent, "entropy")):
        ours = ours.double()
        torch.testing.assert_close(ours, theirs, rtol=0.05, atol=0.05)
        our_err = (ours - truth[key]).abs().max()
        their_err = (theirs - truth[key]).abs().max()
        assert our_err <= their_err + 1e-6, (key, our_err, their_err)


@pytest.mark.parity
def test_gradient_matches_trl():
    logits = torch.randn(3, 9, 1001)
    ids = torch.randint(0, 1001, (3, 9))
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    loss_trl = (trl_utils.selective_log_softmax(a, ids, 0.9).sum()
                + trl_utils.entropy_from_logits(a / 0.9).sum())
    out = rlkern.token_logprobs(b, ids, temperature=0.9, return_entropy=True)
    loss_rl = out.logprobs.sum() + out.entropy.sum()
    loss_trl.backward()
    loss_rl.backward()
    torch.testing.assert_close(loss_rl, loss_trl, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6)
