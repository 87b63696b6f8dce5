"""verl's ``bypass_mode`` policy loss (``core_algos.compute_policy_loss_bypass_mode``) through
rlkern: the rollout correction of ``config.policy_loss.rollout_correction`` by
:func:`rlkern.rollout_correction`, the loss by :func:`rlkern.policy_loss`.

In bypass mode verl's trainer sets ``old_log_prob = rollout_log_prob`` (no recomputation of
the old policy), so the importance weights and the rejection mask compare the *current*
policy with the rollout engine (``log r = log_prob − old_log_prob``, without gradient), and
``loss_type`` picks the loss:

* ``"ppo_clip"`` (verl's default): verl's vanilla PPO loss on the rejection-masked tokens;
  the PPO ratio is already π/π_rollout, so the weights are not applied;
* ``"reinforce"``: ``−sg[w]·A·log π`` (rlkern's ``reinforce`` with the weights as
  ``token_weights``) on the rejection-masked tokens; ``actor/ppo_kl`` is the mean of
  ``old − log_prob``.

The ``rollout_corr/*`` metrics are merged into the loss's metrics, as verl does.

:func:`compute_rollout_correction_and_rejection_mask` is verl's function of that name
(``verl.trainer.ppo.rollout_corr_helper``) computed by :func:`rlkern.rollout_correction`: verl's
signature and return value, the weights wrapped in a ``DataProto`` as verl wraps them.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from rlkern.ops.rollout_correction import RolloutCorrectionOutput, rollout_correction

__all__ = ["compute_policy_loss_rlkern_bypass_mode",
           "compute_rollout_correction_and_rejection_mask"]

# loss_type → (the rlkern_<name> loss that computes it, verl's metric key → rlkern metric)
_BYPASS_LOSSES = {
    "ppo_clip": ("vanilla", None),
    "reinforce": ("gpg", {"actor/ppo_kl": "approx_kl"}),
}


def compute_policy_loss_rlkern_bypass_mode(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: Tensor | None = None,
    *,
    backend: str = "auto",
) -> tuple[Tensor, dict[str, Any]]:
    """verl's ``bypass_mode`` policy loss computed by rlkern (the fused loss on ``backend``).

    Inputs ``(bs, response_length)``: ``old_log_prob`` is the rollout engine's log-probs (the
    trainer's bypass substitution), ``log_prob`` the current policy's (differentiable).
    ``config``: verl's actor config; ``config.policy_loss.rollout_correction`` holds
    ``loss_type`` (``"ppo_clip"`` / ``"reinforce"``), ``rollout_is``,
    ``rollout_is_threshold``, ``rollout_is_batch_normalize``, ``rollout_rs``,
    ``rollout_rs_threshold``, read with verl's defaults. ``rollout_is_weights`` is ignored
    (computed here), as in verl. Returns ``(pg_loss, pg_metrics)``: the 0-dim loss and verl's
    metrics (``actor/*`` and ``rollout_corr/*``) as Python floats.
    """
    from rlkern.integrations.verl import _pg_loss  # verl.py registers this function

    if config is None:
        raise ValueError("config is required for bypass_mode loss")
    policy = getattr(config, "policy_loss", None) if hasattr(config, "policy_loss") else None
    rc = policy.get("rollout_correction", None) if policy is not None else None
    if rc is None:
        raise ValueError("rollout_correction config not found in policy_loss. When using "
                         "loss_mode='bypass_mode', ensure rollout_correction config is passed.")
    loss_type = rc.get("loss_type", "ppo_clip")
    if loss_type not in _BYPASS_LOSSES:
        raise ValueError(f"Invalid loss_type: {loss_type}. Must be 'reinforce' or 'ppo_clip'.")
    # π_current / π_rollout: the current policy plays verl's "old" here, without gradient
    corr = rollout_correction(
        log_prob.detach(), old_log_prob, response_mask,
        rollout_is=rc.get("rollout_is", None),
        rollout_is_threshold=rc.get("rollout_is_threshold", 2.0),
        rollout_is_batch_normalize=rc.get("rollout_is_batch_normalize", False),
        rollout_rs=rc.get("rollout_rs", None),
        rollout_rs_threshold=rc.get("rollout_rs_threshold", None))
    name, spec = _BYPASS_LOSSES[loss_type]
    weights = corr.weights if loss_type == "reinforce" else None
    loss, metrics = _pg_loss(name, old_log_prob, log_prob, advantages, corr.mask, loss_agg_mode,
                             config, weights, backend, spec=spec)
    metrics.update(corr.metrics)
    return loss, metrics


def compute_rollout_correction_and_rejection_mask(
    old_log_prob: Tensor,
    rollout_log_prob: Tensor,
    response_mask: Tensor,
    rollout_is: str | None = None,
    rollout_is_threshold: str | float | None = 2.0,
    rollout_is_batch_normalize: bool = False,
    rollout_rs: str | None = None,
    rollout_rs_threshold: str | float | None = None,
) -> tuple[Any, Tensor, dict[str, float]]:
    """verl's ``compute_rollout_correction_and_rejection_mask``, by
    :func:`rlkern.rollout_correction`.

    Inputs ``(bs, response_length)``; the options are verl's (see
    :func:`rlkern.rollout_correction`). Returns verl's triple: the weights as a
    ``verl.protocol.DataProto`` with the tensor ``rollout_is_weights`` (``None`` without
    ``rollout_is``), the response mask with rejected tokens zeroed, and the
    ``rollout_corr/*`` metrics as Python floats. Needs verl (for ``DataProto``).
    """
    from verl.protocol import DataProto

    out: RolloutCorrectionOutput = rollout_correction(
        old_log_prob, rollout_log_prob, response_mask, rollout_is=rollout_is,
        rollout_is_threshold=rollout_is_threshold,
        rollout_is_batch_normalize=rollout_is_batch_normalize, rollout_rs=rollout_rs,
        rollout_rs_threshold=rollout_rs_threshold)
    weights = (None if out.weights is None
               else DataProto.from_dict(tensors={"rollout_is_weights": out.weights}))
    return weights, out.mask, out.metrics
