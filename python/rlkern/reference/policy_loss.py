"""Reference policy losses (ALGORITHMS.md §3) in plain torch: the ground truth of the tests.

The loss is built the way a trainer writes it — a per-token loss matrix, add-ons, then an
aggregation — with autograd providing the gradient (stop-gradients are ``.detach()``). It
shares no code with the kernels or with the op layer's aggregation. Computation happens in
the dtype of ``logprobs`` promoted to at least float32 (float64 stays float64).

Functions:

* :func:`policy_loss_reference` — loss and metrics of :func:`rlkern.policy_loss`;
* :func:`kl_penalty_reference` — the per-token KL estimators of :func:`rlkern.kl_penalty`;
* :func:`agg_loss_reference` — the aggregation modes;
* :func:`entropy_quantile_threshold_reference` — the (1 − q) quantile of the valid entropies.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlkern.ops.policy_loss_config import PolicyLossConfig, canonical_kl_estimator

__all__ = [
    "agg_loss_reference",
    "entropy_quantile_threshold_reference",
    "kl_penalty_reference",
    "policy_loss_reference",
]


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _clamp(x: Tensor, bound: float | None) -> Tensor:
    return x if bound is None else x.clamp(-bound, bound)


def kl_penalty_reference(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k3", *,
                         log_clamp: float | None = 20.0,
                         value_clamp: float | None = 10.0) -> Tensor:
    """Per-token KL estimate of π (``logprobs``) from the reference (``ref_logprobs``).

    ``k1 = x``, ``k2 = x²/2``, ``abs = |x|`` with ``x = logp − ref``; ``k3 = eʸ − y − 1`` with
    ``y = ref − logp`` clamped to ±``log_clamp`` and the result to ±``value_clamp``.
    A trailing ``+``: the value of the estimator, the gradient of k2.
    """
    base, straight = canonical_kl_estimator(estimator)
    x = logprobs - ref_logprobs
    if base == "k1":
        value = x
    elif base == "k2":
        value = 0.5 * x.square()
    elif base == "abs":
        value = x.abs()
    else:
        y = _clamp(ref_logprobs - logprobs, log_clamp)
        value = _clamp(torch.exp(y) - y - 1, value_clamp)
    if straight:
        k2 = 0.5 * x.square()
        value = k2 - k2.detach() + value.detach()
    return value


def entropy_quantile_threshold_reference(entropy: Tensor, mask: Tensor, q: float) -> Tensor:
    """The (1 − q) quantile (linear interpolation, torch.quantile) of the valid entropies."""
    valid = entropy.detach()[mask.bool()].float()
    if valid.numel() == 0:
        return torch.tensor(math.inf)
    return torch.quantile(valid, 1.0 - q)


def agg_loss_reference(loss_mat: Tensor, mask: Tensor, mode: str, *,
                       num_tokens: float | Tensor | None = None,
                       num_seqs: float | Tensor | None = None,
                       count_empty_seqs: bool = False, max_len: int | None = None) -> Tensor:
    """ALGORITHMS.md §3 aggregation of a (B, T) per-token loss over the tokens of ``mask``."""
    m = mask.to(loss_mat.dtype)
    lens = m.sum(-1)
    seq_sums = (loss_mat * m).sum(-1)
    if mode == "token-mean":
        n = lens.sum().clamp(min=1.0) if num_tokens is None else num_tokens
        return seq_sums.sum() / n
    if mode in ("sum", "token-sum"):
        return seq_sums.sum()
    if num_seqs is not None:
        d = num_seqs
    elif count_empty_seqs:
        d = float(max(loss_mat.shape[0], 1))
    else:
        d = (lens > 0).sum().clamp(min=1).to(loss_mat.dtype)
    if mode == "seq-mean-token-mean":
        per_seq = torch.where(lens > 0, seq_sums / lens.clamp(min=1.0), 0.0)
        return per_seq.sum() / d
    if mode == "seq-mean-token-sum":
        return seq_sums.sum() / d
    if mode == "seq-mean-token-sum-norm":
        horizon = loss_mat.shape[-1] if max_len is None else max_len
        return seq_sums.sum() / d / horizon
    raise ValueError(f"unknown aggregation mode {mode!r}")


def policy_loss_reference(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    config: PolicyLossConfig,
    *,
    ref_logprobs: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
    token_weights: Tensor | None = None,
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
    entropy_threshold: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss (differentiable wrt ``logprobs`` and ``entropy``) and metrics of ALGORITHMS.md §3."""
    cfg = config
    dt = _acc(logprobs)
    m = mask.bool()
    mf = m.to(dt)
    zero = lambda t: torch.where(m, t.to(dt), 0.0)  # masked entries never matter
    logp, old = zero(logprobs), zero(old_logprobs)
    B, T = logp.shape
    adv = advantages.to(dt)
    adv = adv.reshape(B, 1).expand(B, T) if adv.dim() == 1 or adv.shape[-1] == 1 else adv
    adv = zero(adv)
    lens = mf.sum(-1)
    lens1 = lens.clamp(min=1.0)
    delta = logp - old
    lo, hi = cfg.clip_bounds()
    kind = cfg.policy_loss

    # importance ratio
    if kind == "gspo":
        seq = ((delta * mf).sum(-1) / lens1).detach()
        r = logp - logp.detach() + seq[:, None]
        r = r if cfg.seq_log_ratio_max is None else r.clamp(max=cfg.seq_log_ratio_max)
    elif cfg.importance_sampling_level == "sequence":
        seq = (delta * mf).sum(-1) / lens1
        seq = seq if cfg.seq_log_ratio_max is None else seq.clamp(max=cfg.seq_log_ratio_max)
        r = seq[:, None].expand(B, T)
    else:
        r = _clamp(delta, cfg.log_ratio_clamp)
    rho = torch.exp(r)

    # multipliers of the policy term (all stop-gradient)
    mult = torch.ones_like(logp)
    rollout_w = None
    if rollout_logprobs is not None and cfg.rollout_correction is not None:
        level, mode = cfg.rollout_correction.split("_")
        d = torch.nan_to_num(zero(old_logprobs) - torch.where(m, rollout_logprobs.to(dt), 0.0),
                             nan=0.0)
        if level == "sequence":
            d = (d * mf).sum(-1, keepdim=True).expand(B, T)
        w = torch.exp(_clamp(d, cfg.rollout_log_clamp))
        rmin = -math.inf if cfg.rollout_min is None else cfg.rollout_min
        rmax = math.inf if cfg.rollout_max is None else cfg.rollout_max
        w = w.clamp(rmin, rmax) if mode == "truncate" else torch.where(
            (w >= rmin) & (w <= rmax), w, 0.0)
        rollout_w = w.detach()
        mult = mult * rollout_w
    ent_mask = torch.ones_like(logp)
    if cfg.top_entropy_quantile < 1.0:
        assert entropy is not None
        thr = entropy_threshold
        if thr is None:
            thr = entropy_quantile_threshold_reference(entropy, m, cfg.top_entropy_quantile)
        thr = torch.as_tensor(thr, dtype=dt)
        ent_mask = ((entropy.detach().to(dt) * mf) >= thr).to(dt) * mf
        mult = mult * ent_mask
    if token_weights is not None:
        mult = mult * zero(token_weights).detach()

    # the policy term
    tau = None
    if kind in ("ppo", "gspo"):
        rho_d = rho if cfg.delta is None else rho.clamp(max=cfg.delta)
        l1 = -adv * rho_d
        l2 = -adv * rho.clamp(lo, hi)
        pg = torch.maximum(l1, l2)
        clipped = l2 > l1
        dual = torch.zeros_like(clipped)
        if cfg.clip_ratio_c is not None:
            l3 = -adv * cfg.clip_ratio_c
            dual = (pg > l3) & (adv < 0)
            pg = torch.where(adv < 0, torch.minimum(pg, l3), pg)
    elif kind == "cispo":
        pg = -rho.clamp(lo, hi).detach() * adv * logp
        clipped = (rho < lo) | (rho > hi)
        dual = torch.zeros_like(clipped)
    elif kind == "sapo":
        tau = torch.where(adv > 0, torch.full_like(adv, cfg.sapo_tau_pos),
                          torch.full_like(adv, cfg.sapo_tau_neg))
        pg = -torch.sigmoid(tau * (rho - 1)) * (4 / tau) * adv
        clipped = dual = torch.zeros_like(m)
    elif kind == "reinforce":
        pg = -adv * logp
        clipped = dual = torch.zeros_like(m)
    clip_low = (rho < lo) & (adv < 0) & (kind in ("ppo", "gspo", "cispo"))
    clip_high = (rho > hi) & (adv > 0) & (kind in ("ppo", "gspo", "cispo"))

    if kind == "gmpo":
        sgn = torch.sign(adv)
        dclamp = delta.clamp(lo, hi)
        dc = sgn * torch.minimum(sgn * delta, sgn * dclamp)
        seq_r = (dc * mf).sum(-1) / lens1
        abar = (adv * mf).sum(-1) / lens1
        rho_seq = torch.exp(seq_r)
        pg_seq = -abar * rho_seq
        if rollout_w is not None:
            geo = torch.exp((torch.log(rollout_w + 1e-10) * mf).sum(-1) / lens1)
            pg_seq = pg_seq * geo
        d = float(B if cfg.loss_agg_mode not in ("sum", "token-sum") else 1)
        pg_loss = pg_seq.sum() / (d if num_seqs is None or d == 1 else num_seqs)
        clipped = delta != dclamp
        clip_low, clip_high = clipped & (adv < 0), clipped & (adv > 0)
        dual = torch.zeros_like(m)
        rho = rho_seq[:, None].expand(B, T)
    elif kind == "gvpo":
        if advantages.dim() != 1:
            raise ValueError("gvpo takes one score per response: advantages of shape (B,)")
        g = cfg.group_size
        reward = cfg.gvpo_beta * (delta * mf).sum(-1)
        score = advantages.to(dt)
        rg, sg_ = reward.view(-1, g), score.view(-1, g)
        e = (rg - rg.mean(-1, keepdim=True)) - (sg_ - sg_.mean(-1, keepdim=True))
        per_seq = 0.5 * e.square().reshape(-1) / (g - 1)
        d = float(B if cfg.loss_agg_mode not in ("sum", "token-sum") else 1)
        pg_loss = per_seq.sum() / (d if num_seqs is None or d == 1 else num_seqs)
        clipped = clip_low = clip_high = dual = torch.zeros_like(m)
        rho = torch.exp(r)
    else:
        pg_loss = agg_loss_reference(pg * mult, m, cfg.loss_agg_mode, num_tokens=num_tokens,
                                     num_seqs=num_seqs, count_empty_seqs=cfg.count_empty_seqs,
                                     max_len=cfg.max_len)

    total = pg_loss
    metrics: dict[str, Tensor] = {}
    n_valid = mf.sum().clamp(min=1.0)
    mean = lambda x: (x.to(dt) * mf).sum() / n_valid
    if ref_logprobs is not None and cfg.kl_coef != 0.0:
        kl = kl_penalty_reference(logp, zero(ref_logprobs), cfg.kl_estimator,
                                  log_clamp=cfg.kl_log_clamp, value_clamp=cfg.kl_value_clamp)
        if cfg.kl_bias_correction:
            kl = kl * rho
        kl_loss = agg_loss_reference(kl, m, cfg.kl_agg(), num_tokens=num_tokens,
                                     num_seqs=num_seqs, count_empty_seqs=cfg.count_empty_seqs,
                                     max_len=cfg.max_len)
        total = total + cfg.kl_coef * kl_loss
        metrics["kl_loss"] = kl_loss.detach()
        metrics["kl"] = mean(kl.detach())
    if entropy is not None:
        ent = zero(entropy)
        eff = m & (ent_mask > 0)
        glob = cfg.entropy_global_norm
        ent_loss = agg_loss_reference(ent, eff, cfg.entropy_agg(),
                                      num_tokens=num_tokens if glob else None,
                                      num_seqs=num_seqs if glob else None,
                                      count_empty_seqs=cfg.count_empty_seqs, max_len=cfg.max_len)
        total = total - cfg.entropy_coef * ent_loss
        metrics["entropy_loss"] = ent_loss.detach()
        metrics["entropy_mean"] = mean(ent.detach())
    total = total * cfg.loss_scale

    rho_d = rho.detach()
    inf = torch.tensor(math.inf, dtype=dt)
    nan = torch.tensor(math.nan, dtype=dt)
    metrics.update(
        pg_loss=pg_loss.detach(),
        clipfrac=mean(clipped),
        clipfrac_low=mean(clip_low),
        clipfrac_high=mean(clip_high),
        dualclip_frac=mean(dual),
        approx_kl=mean(-_clamp(delta, cfg.log_ratio_clamp).detach()),
        ratio_mean=mean(rho_d),
        ratio_min=torch.where(m, rho_d, inf).min() if m.any() else nan,
        ratio_max=torch.where(m, rho_d, -inf).max() if m.any() else nan,
    )
    if rollout_w is not None:
        metrics["rollout_weight_mean"] = mean(rollout_w)
    return total.to(dt), metrics
