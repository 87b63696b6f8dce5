"""Float64 reference of verl's rejection sampling and batch-normalised rollout weights as
:func:`rlkern.policy_loss` applies them (``PolicyLossConfig.rollout_rs`` /
``rollout_batch_normalize``), written from verl 0.9.1's ``compute_rollout_rejection_mask`` /
``compute_rollout_correction_weights`` token by token."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlkern.config.rollout_correction import SAFETY_BOUND, RejectionOption

__all__ = ["batch_norm_factor_reference", "rejection_mask_reference"]


def rejection_mask_reference(old: Tensor, rollout: Tensor, mask: Tensor,
                             options: tuple[RejectionOption, ...]) -> Tensor:
    """``(B, T)`` bool: the valid tokens every option keeps. Per token, with
    ``x = clamp(old − rollout, ±20)``: k1 = −x, k2 = x²/2, k3 = eˣ − 1 − x; a sequence option
    reduces the valid tokens' values by sum / mean (÷ (len + 1e-8)) / max (0 for a row
    without valid tokens) and keeps or rejects the whole row."""
    m = mask.bool()
    x = torch.where(m, old.double() - rollout.double(), 0.0).clamp(-SAFETY_BOUND, SAFETY_BOUND)
    values = {"k1": -x, "k2": 0.5 * x * x, "k3": torch.exp(x) - 1.0 - x}
    keep = m.clone()
    for opt in options:
        v = values[opt.estimator]
        if opt.level != "token":
            rows = []
            for b in range(v.shape[0]):
                vals = v[b][m[b]]
                if opt.level == "sum":
                    rows.append(vals.sum())
                elif opt.level == "mean":
                    rows.append(vals.sum() / (vals.numel() + 1e-8))
                else:
                    rows.append(vals.max() if vals.numel() else v.new_zeros(()))
            v = torch.stack(rows)[:, None].expand_as(x) if rows else x
        lo = -math.inf if opt.lower is None else opt.lower
        keep &= (v >= lo) & (v <= opt.upper)
    return keep


def batch_norm_factor_reference(weights: Tensor, mask: Tensor, level: str) -> Tensor:
    """verl's batch-normalisation divisor of ``(B, T)`` weights over ``mask``: the mean over
    valid tokens (token level) or over rows with a valid token of each row's mean weight
    (sequence level); 1 when it is ≤ 1e-8 (verl leaves the weights then)."""
    m = mask.bool()
    w = torch.where(m, weights.double(), 0.0)
    if level == "token":
        c = w.sum() / (m.sum().double() + 1e-8)
    else:
        lens = m.sum(-1).double()
        rows = w.sum(-1) / (lens + 1e-8)
        valid = lens > 0
        c = rows[valid].sum() / max(int(valid.sum()), 1)
    return c if c > 1e-8 else torch.ones((), dtype=torch.float64)
