"""verl's rejection sampling and batch-normalised rollout weights in :func:`rlkern.policy_loss`
(``PolicyLossConfig.rollout_rs`` / ``rollout_rs_threshold`` / ``rollout_batch_normalize``).

* Rejection sampling removes tokens (or whole rows) from the loss's mask before the kernels
  run: one elementwise pre-pass over ``old − rollout`` with per-row reductions for the
  sequence options (:func:`rlkern.ops.rollout_correction.rejection_keep`). Every term (policy,
  KL, entropy) and every normaliser then sees the reduced mask, as verl's trainer replaces
  ``response_mask`` with ``compute_rollout_correction_and_rejection_mask``'s.
* Batch normalisation divides the policy term by the weights' batch mean ``c`` (the weights
  are a stop-gradient factor of a term linear in them, so ``agg(ℓ·w/c) = agg(ℓ·w)/c``). ``c``
  comes from the loss's own row statistics (``rollout_w_sum``, ``len``); with rejection
  sampling verl averages the weights over the mask *before* rejection, which the kernels no
  longer see, so the pre-pass forms ``c`` from the weights at the original mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlkern.config.layout import layout
from rlkern.config.policy_loss import decode_kernel_args
from rlkern.ops.policy_loss.inputs import Prepared
from rlkern.ops.rollout_correction import batch_norm_factor, rejection_keep, rs_estimators
from rlkern.reference.policy_loss import rollout_weights

__all__ = ["apply_rejection", "norm_scale", "norm_scaled"]


def _level(p: Prepared) -> str:
    return (p.cfg.rollout_correction or "none").split("_")[0]


def apply_rejection(p: Prepared) -> tuple[Prepared, Tensor | None]:
    """``p`` with its mask reduced by the config's rejection sampling, and (with batch
    normalisation) the divisor ``c`` over the original mask; ``(p, None)`` when neither
    applies (no ``rollout_rs``, or no rollout log-probabilities given)."""
    rollout = p.get("rollout_logprobs")
    if rollout is None or p.cfg.rollout_rs is None:
        return p, None
    with torch.no_grad():
        m = p.mask.bool()
        lens = m.sum(1).to(torch.float64)
        est = rs_estimators((p.old - rollout).double())
        keep = m
        for opt in p.cfg.rejection():
            keep = keep & rejection_keep(opt, est, m, lens)[0]
        factor = None
        if p.cfg.rollout_batch_normalize:
            k = decode_kernel_args(p.flags, p.hparams)
            w = rollout_weights(p.old.double(), rollout, m, k)
            w_rows = torch.where(m, w, 0.0).sum(1)
            factor = batch_norm_factor(_level(p), w_rows, lens, lens > 0)
    return p._replace(mask=keep), factor


def norm_scaled(p: Prepared) -> bool:
    """Whether batch normalisation scales the policy term (:func:`norm_scale` is not None)."""
    return p.cfg.rollout_batch_normalize and p.get("rollout_logprobs") is not None


def norm_scale(p: Prepared, row_stats: Tensor, factor: Tensor | None) -> Tensor | None:
    """The policy term's multiplier ``1/c`` of batch normalisation (None: off); ``c`` from
    ``factor`` (:func:`apply_rejection`) or the row statistics; 1 where ``c ≤ 1e-8``, as verl
    leaves the weights then."""
    if not norm_scaled(p):
        return None
    if factor is None:
        S = layout("policy_loss").row_stats
        rs = row_stats.detach()
        lens = rs[S.len]
        factor = batch_norm_factor(_level(p), rs[S.rollout_w_sum], lens, lens > 0)
    return torch.where(factor > 1e-8, 1.0 / factor, 1.0)
