"""The token selection of clip_cov / kl_cov (verl's ``compute_policy_loss_clip_cov`` /
``_kl_cov``, adapted from PRIME-RL/Entropy-Mechanism-of-RL): which tokens the fused loss
treats differently, handed to it as the per-token ``cov_select`` input (1 = selected).

Per valid token the covariance term ``c = (A − Ā)·(logp − l̄ogp)`` (Ā, l̄ogp: means over the
batch's valid tokens, verl's ``masked_mean``: ``Σ m·x / (Σ m + 1e-8)``):

* clip_cov: among the valid tokens the PPO clip leaves unclipped
  (``−A·clip(ρ, lo, hi) ≤ −A·ρ``, ``ρ = exp(logp − old)`` unclamped) with
  ``cov_lb < c < cov_ub``, ``max(⌊cov_ratio·N⌋, 1)`` chosen at random: ``torch.randperm`` on
  the global CPU generator, drawn exactly as verl draws it, so a seeded run selects verl's tokens;
* kl_cov: the ``max(1, ⌊N·cov_ratio⌋)`` valid tokens of largest ``c`` (``torch.topk``; the
  means over the valid tokens as plain means, as verl computes them on the CPU).

A data-dependent subset of a whole batch: a few torch reductions and a selection over ``N``
valid tokens, outside the fused kernels, which then read one value per token. Computed without
gradient; the result is ``(B, T)`` in the dtype of ``logprobs``, 0 at masked tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlkern.config.policy_loss import PolicyLossConfig

__all__ = ["cov_selection"]


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """verl's ``masked_mean`` over all elements: ``Σ where(m, x, 0)·m / (Σ m + 1e-8)``."""
    return (torch.where(mask.bool(), x, 0.0) * mask).sum() / (mask.sum() + 1e-8)


@torch.no_grad()
def cov_selection(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                  config: PolicyLossConfig) -> Tensor:
    """The ``cov_select`` input of clip_cov / kl_cov for ``config`` (its ``cov_ratio``,
    ``cov_lb``, ``cov_ub`` and clip bounds).

    Args:
        logprobs / old_logprobs: ``(B, T)``.
        advantages: ``(B,)`` or ``(B, T)`` (broadcast over the row).
        mask: ``(B, T)`` valid tokens.
        config: a clip_cov or kl_cov :class:`~rlkern.PolicyLossConfig`.

    Returns:
        ``(B, T)`` 0 / 1 in the dtype of ``logprobs``.
    """
    if config.policy_loss not in ("clip_cov", "kl_cov"):
        raise ValueError(f"cov_selection is for clip_cov / kl_cov, not {config.policy_loss!r}")
    lp = logprobs.detach()
    B, T = lp.shape
    adv = advantages.detach()
    adv = adv.reshape(B, 1).expand(B, T) if adv.dim() == 1 or adv.shape[-1] == 1 else adv
    adv = adv.to(lp.dtype)
    valid = mask.bool()
    m = valid.to(lp.dtype)
    select = torch.zeros(B, T, dtype=lp.dtype, device=lp.device)
    if config.policy_loss == "clip_cov":
        ratio = torch.exp(lp - old_logprobs.detach().to(lp.dtype))
        lo, hi = config.clip_bounds()
        clipped = (-adv * ratio.clamp(lo, hi) > -adv * ratio) & valid
        cov = (adv - _masked_mean(adv, m)) * (lp - _masked_mean(lp, m))
        pick = (cov < config.cov_ub) & (cov > config.cov_lb) & valid & ~clipped
        idx = torch.nonzero(pick)
        num = max(int(config.cov_ratio * m.sum().item()), 1)
        if len(idx) > 0:
            idx = idx[torch.randperm(len(idx))[: min(num, len(idx))]]
        select[idx[:, 0], idx[:, 1]] = 1.0
        return select
    flat = torch.nonzero(valid.reshape(-1), as_tuple=True)[0]
    if len(flat) == 0:
        return select
    a_v = adv[valid].reshape(-1).cpu()
    lp_v = lp[valid].reshape(-1).cpu()
    cov = (a_v - a_v.mean()) * (lp_v - lp_v.mean())
    top = torch.topk(cov, max(1, int(len(cov) * config.cov_ratio)), largest=True).indices
    select.view(-1)[flat[top.to(flat.device)]] = 1.0
    return select
