"""A trainer's precomputed importance-sampling ratio in the form vespo folds it.

TRL and Liger hand vLLM's importance-sampling correction over as a ratio ``r`` (already
truncated or masked); every loss but vespo multiplies its per-token term by it (rlkern:
``token_weights``), while vespo adds ``Σ_t clamp(log r_t, log 1e-8, 20)`` to its sequence
log-weight. rlkern's vespo folds the rollout weight of its ``rollout_logprobs`` input that way,
so the ratio travels as ``rollout_logprobs = old − log r`` with an unbounded token-level
truncation: the kernels' rollout weight ``exp(old − rollout)`` is then ``r`` again (up to the
rounding of log / exp), and ``r = 0`` gives ``−inf`` → ``log 1e-8`` as in TRL.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlkern.config.policy_loss import PolicyLossConfig

__all__ = ["fold_is_ratio"]


def fold_is_ratio(config: PolicyLossConfig, old: Tensor, ratio: Tensor
                  ) -> tuple[PolicyLossConfig, Tensor]:
    """``(config, rollout_logprobs)`` carrying the ``(B, T)`` ratio ``ratio`` to a vespo
    ``config`` (``old``: the ``(B, T)`` old log-probabilities the ratio corrects)."""
    if ratio.shape != old.shape:
        raise ValueError(f"vespo folds a per-token importance-sampling ratio of shape "
                         f"{tuple(old.shape)}, got {tuple(ratio.shape)} (a sequence-level ratio "
                         "is refused by TRL for vespo: use a token_* mode)")
    config = config.replace(rollout_correction="token_truncate", rollout_min=None,
                            rollout_max=None, rollout_log_clamp=None)
    rollout = old.detach() - torch.log(ratio.detach().to(old.dtype))
    return config, rollout
