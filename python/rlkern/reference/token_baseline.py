"""Reference for verl's optimal token baseline (OTB) and its multi-turn variant (float64).

Per row (valid tokens only)::

    G[i,t] = Σ_{s≥t, valid} r[i,s]                          reward-to-go ("returns")
    w[i,t] = (1 − 2·exp(logp[i,t]) + Σπ²[i,t]) · ρ[i,t]²     ρ: rollout IS weights (1 if absent)
    W[i,t] = Σ_{s≤t, valid} w[i,s]

Per group and aligned index k (k = t for OTB; for TIR-OTB k = the rank of t among the row's
valid tokens, and rows without valid tokens belong to no group)::

    B[k] = Σ_{j∈g, valid} G·W / (Σ_{j∈g, valid} W + eps)     (0 for a group of one row)
    A[i,t] = G[i,t] − B[k(t)] at valid tokens, 0 elsewhere

``zero_tail`` (verl's ``handle_zero_tail``): when exactly one row of a group has the longest
length L_max (number of valid tokens) and L_max exceeds the next length L_2nd, that row's
``B[k ≥ L_2nd] = 0``. Vectorised (no loop over groups), so it runs on any device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlkern.reference.advantages import dense_group_index


def optimal_token_baseline_reference(
    rewards: Tensor, mask: Tensor, logprobs: Tensor, sum_pi_squared: Tensor, *,
    group_ids: Tensor | None = None, group_size: int | None = None,
    rollout_is_weights: Tensor | None = None, multi_turn: bool = False,
    zero_tail: bool = True, eps: float = 1e-8,
) -> tuple[Tensor, Tensor]:
    """``(advantages, returns)``, each ``(N, T)`` float64, of ``(N, T)`` inputs."""
    valid = mask.bool()
    n, t_len = rewards.shape
    r = torch.where(valid, rewards.to(torch.float64), 0.0)  # padding never read (NaN included)
    returns = r.flip(-1).cumsum(-1).flip(-1)
    w = 1.0 - 2.0 * logprobs.to(torch.float64).exp() + sum_pi_squared.to(torch.float64)
    if rollout_is_weights is not None:
        w = w * rollout_is_weights.to(torch.float64) ** 2
    cum_w = (torch.where(valid, w, 0.0)).cumsum(-1)
    lengths = valid.sum(-1)
    # aligned index of each valid token, and the rows that belong to a group
    k = (valid.cumsum(-1) - 1) if multi_turn else torch.arange(t_len, device=r.device).expand(n, -1)
    member = lengths > 0 if multi_turn else torch.ones(n, dtype=torch.bool, device=r.device)
    gidx = dense_group_index(group_ids, group_size, n).to(r.device)
    num_groups = int(gidx.max()) + 1 if n else 0
    size = torch.zeros(num_groups, dtype=torch.int64, device=r.device).index_add_(
        0, gidx, member.to(torch.int64))
    # group sums at (group, k) over the members' valid tokens
    take = valid & member[:, None]
    flat = (gidx[:, None] * t_len + k)[take]
    num = torch.zeros(num_groups * t_len, dtype=torch.float64, device=r.device)
    den = torch.zeros_like(num)
    num.index_add_(0, flat, (returns * cum_w)[take])
    den.index_add_(0, flat, cum_w[take])
    baseline = (num / (den + eps)).view(num_groups, t_len)
    b = baseline[gidx[:, None].expand(n, t_len), k.clamp_min(0)]
    has_baseline = member & (size[gidx] >= 2)
    if zero_tail and n:
        length = torch.where(member, lengths, -1)
        longest = torch.full((num_groups,), -1, dtype=torch.int64, device=r.device)
        longest.scatter_reduce_(0, gidx, length, "amax")
        at_longest = length == longest[gidx]
        ties = torch.zeros(num_groups, dtype=torch.int64, device=r.device).index_add_(
            0, gidx, at_longest.to(torch.int64))
        second = torch.full((num_groups,), -1, dtype=torch.int64, device=r.device)
        second.scatter_reduce_(0, gidx, torch.where(at_longest, -1, length), "amax")
        tail_row = at_longest & member & (ties[gidx] == 1) & (size[gidx] >= 2)
        tail = tail_row[:, None] & (k >= second[gidx][:, None])
        b = torch.where(tail, 0.0, b)
    b = torch.where(has_baseline[:, None], b, 0.0)
    advantages = torch.where(valid, returns - b, 0.0)
    return advantages, returns
