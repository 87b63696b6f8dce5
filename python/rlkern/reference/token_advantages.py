"""Reference for the token-, step- and turn-level helpers of ALGORITHMS.md §2.1 (float64).

* discounted returns with resets:  G[t] = r[t] + γ·G[t+1], the carry dropped where reset[t]
  (position t ends a segment: a turn end, the end of a response) and where γ = 0, whatever
  it holds (±inf, NaN);
* GAE with verl's carry over masked tokens: δ_t = r_t + γ·nv − V_t, g = δ_t + γλ·lg, and
  where mask_t: nv ← V_t, lg ← g (carried unchanged elsewhere); A_t = lg, R_t = A_t + V_t;
* position-wise group baseline (IGPO):  A[i,t] = G[i,t] − mean_{j∈g, m[j,t]} G[j,t];
* GTPO entropy weights [reading]:  w[i,t] = H[i,t] / Σ_{k∈g, m[k,t]} H[k,t], and the inverse
  weights with h = 1 / max(H, eps) in place of H;
* GiGPO:  A = A_episode + ω·A_step, each group-normalised (singleton groups → 0);
* EMPG:  A_mod = g(H_s)·A + ζ·f(H_{s+1}), Ĥ min–max normalised over the batch,
  g = e^{−kĤ}/mean(e^{−kĤ}), f = e^{−k_f Ĥ} [reading for f].
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlkern.reference.advantages import dense_group_index, spread_divide


def discounted_returns_reference(rewards: Tensor, *, gamma: float,
                                 reset: Tensor | None = None) -> Tensor:
    """``(N, T)`` returns of ``(N, T)`` rewards, scanning each row from its end."""
    r = rewards.to(torch.float64)
    out = torch.zeros_like(r)
    carry = torch.zeros(r.shape[0], dtype=torch.float64, device=r.device)
    for t in range(r.shape[1] - 1, -1, -1):
        a = torch.full_like(carry, gamma)
        if reset is not None:
            a = torch.where(reset[:, t].bool(), 0.0, a)
        # A zero discount (a reset, or γ = 0) drops the carry, also a ±inf / NaN one.
        carry = r[:, t] + torch.where(a == 0, 0.0, a * carry)
        out[:, t] = carry
    return out


def _drop_zero(a: float, x: Tensor) -> Tensor:
    """a·x, exactly 0 where a = 0 or x = 0 (a zero discount drops even a ±inf / NaN carry)."""
    return torch.where((x == 0) | (a == 0), 0.0, a * x)


def gae_reference(rewards: Tensor, values: Tensor | None, mask: Tensor, *, gamma: float,
                  lam: float) -> tuple[Tensor, Tensor]:
    """``(advantages, returns)``, each ``(N, T)`` float64, scanning each row from its end.

    Masked positions (mask 0: observation tokens, padding) leave both carries unchanged and
    take the advantage of the next valid position after them (0 after the last one)."""
    r = rewards.to(torch.float64)
    v = torch.zeros_like(r) if values is None else values.to(torch.float64)
    valid = mask.bool()
    adv = torch.zeros_like(r)
    next_value = torch.zeros(r.shape[0], dtype=torch.float64, device=r.device)
    last_gae = torch.zeros_like(next_value)
    for t in range(r.shape[1] - 1, -1, -1):
        g = (r[:, t] + _drop_zero(gamma, next_value) - v[:, t]) + _drop_zero(gamma * lam,
                                                                               last_gae)
        next_value = torch.where(valid[:, t], v[:, t], next_value)
        last_gae = torch.where(valid[:, t], g, last_gae)
        adv[:, t] = last_gae
    return adv, adv + v


def _position_sums(x: Tensor, valid: Tensor, gidx: Tensor) -> tuple[Tensor, Tensor]:
    """Per group and position: Σ x over valid rows, and the count; gathered back per row."""
    num_groups = int(gidx.max()) + 1 if gidx.numel() else 0
    sums = torch.zeros(num_groups, x.shape[1], dtype=torch.float64, device=x.device)
    counts = torch.zeros_like(sums)
    sums.index_add_(0, gidx, torch.where(valid, x, 0.0))
    counts.index_add_(0, gidx, valid.to(torch.float64))
    return sums[gidx], counts[gidx]


def position_baseline_reference(returns: Tensor, mask: Tensor, *, group_ids: Tensor | None = None,
                                group_size: int | None = None) -> Tensor:
    """``(N, T)`` position-wise advantages; 0 at padding."""
    x = returns.to(torch.float64)
    valid = mask.bool()
    gidx = dense_group_index(group_ids, group_size, x.shape[0])
    sums, counts = _position_sums(x, valid, gidx)
    return torch.where(valid, x - sums / counts.clamp_min(1.0), 0.0)


def gtpo_weights_reference(entropy: Tensor, mask: Tensor, *, group_ids: Tensor | None = None,
                           group_size: int | None = None,
                           eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """``(weight, inverse_weight)``, each ``(N, T)``; 0 at padding and for a zero denominator."""
    h = entropy.to(torch.float64)
    valid = mask.bool()
    gidx = dense_group_index(group_ids, group_size, h.shape[0])
    total, _ = _position_sums(h, valid, gidx)
    inv = 1.0 / h.clamp_min(eps)
    total_inv, _ = _position_sums(inv, valid, gidx)
    weight = torch.where(valid & (total != 0), h / torch.where(total != 0, total, 1.0), 0.0)
    inverse = torch.where(valid, inv / torch.where(valid, total_inv, 1.0), 0.0)
    return weight, inverse


def _normalise_in_groups(x: Tensor, gidx: Tensor, divide: bool, eps: float) -> Tensor:
    """Per group of ``gidx``: ``(x − mean) / (σ + eps)`` (σ unbiased) or ``x − mean``; 0 in a
    singleton group (no relative signal) and in a group whose values are all equal (zero
    variance: exactly 0). Statistics by ``index_add_`` / ``scatter_reduce_`` over all groups
    at once, so that 10^5 groups cost one pass, not one mask a group."""
    if x.numel() == 0:
        return torch.zeros_like(x)
    k = int(gidx.max()) + 1
    zeros = torch.zeros(k, dtype=torch.float64, device=x.device)
    count = zeros.clone().index_add_(0, gidx, torch.ones_like(x))
    mean = zeros.clone().index_add_(0, gidx, x) / count.clamp_min(1.0)
    d = x - mean[gidx]
    var = zeros.clone().index_add_(0, gidx, d * d) / (count - 1.0).clamp_min(1.0)
    lo = zeros.clone().scatter_reduce_(0, gidx, x, "amin", include_self=False)
    hi = zeros.clone().scatter_reduce_(0, gidx, x, "amax", include_self=False)
    signal = (count >= 2) & ~(lo == hi)  # a NaN makes lo != hi, and the NaN flows through
    out = spread_divide(d, var.sqrt()[gidx] + eps) if divide else d
    return torch.where(signal[gidx], out, 0.0)


def gigpo_advantages_reference(episode_returns: Tensor, step_returns: Tensor, state_keys: Tensor,
                               *, group_ids: Tensor, omega: float = 1.0,
                               mode: str = "std_norm", step_mode: str = "std_norm",
                               eps: float = 1e-6) -> dict[str, Tensor]:
    """GiGPO per step: episode part within prompt groups, step part within the step groups
    (equal (group id, state key) pairs); returns ``advantages``, ``episode_advantages``,
    ``step_advantages``."""
    ep = episode_returns.to(torch.float64)
    st = step_returns.to(torch.float64)
    prompt = torch.unique(group_ids, return_inverse=True)[1]
    pairs = torch.stack([group_ids.to(torch.int64), state_keys.to(torch.int64)], dim=1)
    state = torch.unique(pairs, dim=0, return_inverse=True)[1]
    a_ep = _normalise_in_groups(ep, prompt, mode == "std_norm", eps)
    a_st = _normalise_in_groups(st, state, step_mode == "std_norm", eps)
    return {"advantages": a_ep + omega * a_st, "episode_advantages": a_ep,
            "step_advantages": a_st}


def empg_modulate_reference(advantages: Tensor, step_entropy: Tensor, next_step_entropy: Tensor,
                            *, k: float = 1.0, k_f: float = 1.0, zeta: float = 0.1) -> Tensor:
    """EMPG's modulated step advantages; a NaN next-step entropy (no next step) gives f = 0."""
    a = advantages.to(torch.float64)
    h = step_entropy.to(torch.float64)
    hn = next_step_entropy.to(torch.float64)
    if h.numel() == 0:
        return a.clone()
    lo, hi = float(h.min()), float(h.max())
    scale = 1.0 / (hi - lo) if hi > lo else 0.0
    g = torch.exp(-k * (h - lo) * scale)
    g = g / g.mean()
    f = torch.where(torch.isnan(hn), 0.0, torch.exp(-k_f * (hn - lo) * scale))
    return g * a + zeta * f
