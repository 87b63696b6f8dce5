"""Reference policy losses (ALGORITHMS.md §3) in plain torch: the ground truth of the tests, and
the ``backend="torch"`` of the ops.

The per-token terms (ratios, the loss of each kind, the add-ons, the metric indicators) are
stated once, in :func:`_terms`, the way a trainer writes them, with autograd providing every
gradient (stop-gradients are ``.detach()``). Two views are built on them:

* :func:`policy_loss_reference` — loss and metrics of :func:`rlkern.policy_loss` from a
  :class:`~rlkern.PolicyLossConfig`, aggregated as a trainer aggregates a per-token loss matrix
  (:func:`agg_loss_reference`); it shares no code with the kernels or with the op layer's
  aggregation;
* :func:`policy_loss_row_stats` — the kernels' per-row statistics (``row_stats``, in the layout
  of ``csrc/include/rlkern/policy_loss.h``), from the kernels' ``flags`` / ``hparams``, so that
  the ops' torch backend is this code differentiated by autograd.

Also :func:`kl_penalty_reference` / :func:`kl_estimate` (the KL estimators) and
:func:`entropy_quantile_threshold_reference`. Computation happens in the dtype of ``logprobs``
promoted to at least float32 (float64 stays float64).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import SimpleNamespace
from typing import NamedTuple

import torch
from torch import Tensor

from rlkern.config.dtypes import acc_dtype
from rlkern.config.layout import layout
from rlkern.config.policy_loss import (
    PolicyLossConfig,
    canonical_kl_estimator,
    decode_kernel_args,
)
from rlkern.reference.rollout_correction import (
    batch_norm_factor_reference,
    rejection_mask_reference,
)

__all__ = [
    "agg_loss_reference",
    "entropy_quantile_threshold_reference",
    "kl_estimate",
    "kl_penalty_reference",
    "policy_loss_reference",
    "policy_loss_row_stats",
    "rollout_weights",
]


def _clamp(x: Tensor, bound: float | None) -> Tensor:
    return x if bound is None else x.clamp(-bound, bound)


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, kind: int, straight_through: bool,
                log_clamp: float = math.inf, value_clamp: float = math.inf) -> Tensor:
    """The KL estimator of code ``kind`` (policy_loss.h's kl_kinds table) per element;
    ``inf`` turns a clamp off. See :func:`kl_penalty_reference`."""
    codes = layout("policy_loss").kl_kinds
    x = logprobs - ref_logprobs
    if kind == codes.k1:
        value = x
    elif kind == codes.k2:
        value = 0.5 * x.square()
    elif kind == codes.abs:
        value = x.abs()
    elif kind == codes.k3:
        y = (ref_logprobs - logprobs).clamp(-log_clamp, log_clamp)
        value = (torch.exp(y) - y - 1).clamp(-value_clamp, value_clamp)
    else:
        raise ValueError(f"unknown KL estimator code {kind}")
    if straight_through:
        value = _ValueWithGradOf.apply(value.detach(), 0.5 * x.square())
    return value


class _ValueWithGradOf(torch.autograd.Function):
    """``value`` with the gradient of ``surrogate`` (the straight-through estimators). Not
    ``surrogate - surrogate.detach() + value``: that is NaN where the surrogate is infinite."""

    @staticmethod
    def forward(value: Tensor, surrogate: Tensor) -> Tensor:
        return value.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor]:
        return None, grad


def kl_penalty_reference(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k3", *,
                         log_clamp: float | None = 20.0,
                         value_clamp: float | None = 10.0) -> Tensor:
    """Per-token KL estimate of π (``logprobs``) from the reference (``ref_logprobs``).

    ``k1 = x``, ``k2 = x²/2``, ``abs = |x|`` with ``x = logp − ref``; ``k3 = eʸ − y − 1`` with
    ``y = ref − logp`` clamped to ±``log_clamp`` and the result to ±``value_clamp``.
    A trailing ``+``: the value of the estimator, the gradient of k2.
    """
    base, straight = canonical_kl_estimator(estimator)
    off = lambda v: math.inf if v is None else float(v)
    return kl_estimate(logprobs, ref_logprobs, layout("policy_loss").kl_kinds[base], straight,
                       off(log_clamp), off(value_clamp))


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


class _Terms(NamedTuple):
    """Per-token (B, T) and per-row (B,) terms of one call; zero at masked tokens."""

    mf: Tensor              # (B, T) the mask as 0 / 1
    lens: Tensor            # (B,) valid tokens
    delta: Tensor           # (B, T) Δ = logp − old
    adv: Tensor             # (B, T) A
    rho: Tensor             # (B, T) the ratio the loss uses (gmpo: the sequence's ρ_i)
    pg: Tensor              # (B, T) per-token loss ℓ (token-level kinds; 0 for gmpo / gvpo)
    mult: Tensor            # (B, T) stop-gradient multipliers of ℓ: rollout w · em · token weight
    pg_row: Tensor          # (B,) Σ m·mult·ℓ; gmpo: the sequence loss ℓ_i·w_i
    seq_r: Tensor           # (B,) sequence log-ratio (sequence ratio modes, gmpo), else 0
    seq_w: Tensor           # (B,) sequence rollout weight (gmpo: geometric mean of w), else 1
    rollout_w: Tensor | None  # (B, T) rollout weights w
    ent_mask: Tensor        # (B, T) em: 1[H ≥ threshold] (1 without a threshold)
    ent: Tensor | None      # (B, T) entropy
    kl: Tensor | None       # (B, T) KL estimate (× ρ with bias correction)
    clipped: Tensor         # (B, T) metric indicators (0 / 1)
    clip_low: Tensor
    clip_high: Tensor
    dual: Tensor
    neg_log_ratio: Tensor   # (B, T) −clamp(Δ, ±log_ratio_clamp)
    non_finite: Tensor      # (B,) bool: a NaN / ±inf input at a valid token (NaN policy)
    phi: Tensor             # (B, T) vespo's gamma weight φ at each valid token (0 otherwise)


def rollout_weights(old: Tensor, rollout_logprobs: Tensor, mask: Tensor,
                    k: SimpleNamespace) -> Tensor:
    """The rollout weights w of policy_loss.h's ``rollout_weight`` for the kernel arguments
    ``k`` (``rollout_level`` not none): ``(B, T)`` in ``old``'s dtype, every token of a row
    carrying the row's weight at the sequence level; values at masked tokens are not zeroed."""
    codes = layout("policy_loss")
    m = mask.bool()
    rollout = torch.where(m, rollout_logprobs.to(old.dtype), 0.0)
    old = torch.where(m, old, 0.0)
    d = torch.nan_to_num(old - rollout, nan=0.0)  # a NaN (unscored) token: no correction
    if k.rollout_level == codes.rollout_levels.sequence:
        d = (d * m.to(d.dtype)).sum(-1, keepdim=True).expand_as(old)
    w = torch.exp(d.clamp(-k.rollout_log_clamp, k.rollout_log_clamp))
    inside = (w >= k.rollout_min) & (w <= k.rollout_max)
    return torch.where(inside, w, 0.0) if k.rollout_mask else w.clamp(k.rollout_min,
                                                                      k.rollout_max)


def _terms(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
           k: SimpleNamespace, opt: dict[str, Tensor | None]) -> _Terms:
    """The per-token formulas of policy_loss.h for the kernel arguments ``k``
    (:func:`~rlkern.config.policy_loss.decode_kernel_args`) and the optional inputs ``opt``
    (by slot name: ref_logprobs, rollout_logprobs, entropy, token_weights,
    entropy_threshold, cov_select)."""
    codes = layout("policy_loss")
    kinds = codes.loss_kinds
    dt = acc_dtype(logprobs.dtype)
    m = mask.bool()
    mf = m.to(dt)
    zero = lambda t: torch.where(m, t.to(dt), 0.0)  # masked entries never matter
    logp, old = zero(logprobs), zero(old_logprobs)
    B, T = logp.shape
    adv = advantages.to(dt)
    adv = zero(adv.reshape(B, 1).expand(B, T) if adv.dim() == 1 or adv.shape[-1] == 1 else adv)
    lens = mf.sum(-1)
    lens1 = lens.clamp(min=1.0)
    delta = logp - old
    lp_sum = (delta * mf).sum(-1)
    lo, hi = k.clip_lo, k.clip_hi
    kind = k.loss_kind
    row = lambda v: torch.full((B,), v, dtype=dt, device=logp.device)
    rows0 = lambda: torch.zeros_like(mf)

    # importance ratio r, ρ = exp(r)
    seq_r = row(0.0)
    if k.ratio_mode == codes.ratio_modes.token:
        r = delta.clamp(-k.log_ratio_clamp, k.log_ratio_clamp)
    elif k.ratio_mode == codes.ratio_modes.seq_detached:  # GSPO-token: ∂r/∂logp_t = 1
        mean = (lp_sum / lens1).detach()
        r = (logp - logp.detach() + mean[:, None]).clamp(max=k.seq_log_ratio_max)
        seq_r = mean.clamp(max=k.seq_log_ratio_max)
    else:  # the exact gradient of the sequence mean (TRL's sequence level)
        seq_r = (lp_sum / lens1).clamp(max=k.seq_log_ratio_max)
        r = seq_r[:, None].expand(B, T)
    rho = torch.exp(r)

    # multipliers of the policy term (all stop-gradient)
    rollout_w, seq_w = None, row(1.0)
    if k.rollout_level != codes.rollout_levels.none:
        w = rollout_weights(old, opt["rollout_logprobs"], m, k)
        rollout_w = (w * mf).detach()
        if k.rollout_level == codes.rollout_levels.sequence:
            seq_w = w[:, 0].detach() if T else row(1.0)
    ent = None if opt["entropy"] is None else zero(opt["entropy"])
    ent_mask = torch.ones_like(mf)
    if opt["entropy_threshold"] is not None:
        thr = torch.as_tensor(opt["entropy_threshold"], dtype=dt, device=logp.device)
        ent_mask = (ent.detach() >= thr).to(dt) * mf
    # vespo folds the rollout weight into its sequence weight instead (below)
    fold = kind == kinds.vespo
    mult = (torch.ones_like(mf) if rollout_w is None or fold else rollout_w) * ent_mask
    if opt["token_weights"] is not None:
        mult = mult * zero(opt["token_weights"]).detach()

    # the policy term and its metric indicators
    pg = clipped = clip_low = clip_high = dual = rows0()
    if kind == kinds.ppo:  # max(−A·min(ρ, δ), −A·clip(ρ, lo, hi)); A < 0: min(ℓ, −A·c)
        rho_d = rho.clamp(max=k.delta)
        l1, l2 = -adv * rho_d, -adv * rho.clamp(lo, hi)
        pg = torch.maximum(l1, l2)
        l3 = -adv * k.dual_clip_c
        dual = ((pg > l3) & (adv < 0)).to(dt)
        pg = torch.where(adv < 0, torch.minimum(pg, l3), pg)
        clipped = (l2 > l1).to(dt)
        clip_low = ((rho_d < lo) & (adv < 0)).to(dt)  # the ratio as the loss sees it
        clip_high = ((rho_d > hi) & (adv > 0)).to(dt)
    elif kind == kinds.cispo:  # −sg[clip(ρ, lo, hi)]·A·logp
        pg = -rho.clamp(lo, hi).detach() * adv * logp
        clipped = ((rho < lo) | (rho > hi)).to(dt)
        clip_low = ((rho < lo) & (adv < 0)).to(dt)
        clip_high = ((rho > hi) & (adv > 0)).to(dt)
    elif kind == kinds.sapo:  # −σ(τ(ρ − 1))·(4/τ)·A
        tau = torch.where(adv > 0, torch.full_like(adv, k.sapo_tau_pos),
                          torch.full_like(adv, k.sapo_tau_neg))
        pg = -torch.sigmoid(tau * (rho - 1)) * (4 / tau) * adv
    elif kind == kinds.reinforce:  # −A·logp
        pg = -adv * logp
    elif kind == kinds.dro:  # −(logp·A − ½β·Δ²), Δ unclamped (verl's dro)
        pg = -(logp * adv - 0.5 * k.dro_beta * delta.square())
    elif kind in (kinds.dppo_tv, kinds.dppo_kl):  # −A·sg[min(ρ, c)]·logp·valid (DPPO)
        p, po = torch.exp(logp.detach()), torch.exp(old)
        pos = adv > 0
        if kind == kinds.dppo_tv:
            valid = torch.where(pos, (p - po) <= hi, (p - po) >= lo)
        else:  # binary KL of (p_old, 1 − p_old) from (p, 1 − p), verl's 1e-8 terms
            b = po * (old - logp.detach()) + (1 - po) * torch.log(
                (1.0 - po + 1e-8) / (1.0 - p + 1e-8))
            valid = torch.where(pos, (b <= hi) | (p <= po), (b <= -lo) | (p >= po))
        vf = valid.to(dt)
        pg = -adv * rho.clamp(max=k.dual_clip_c).detach() * logp * vf
        clipped = 1.0 - vf  # outside the trust region (verl's pg_clipfrac)
        dual = ((rho > k.dual_clip_c) & valid).to(dt)  # truncated (its pg_clipfrac_lower)
    if kind == kinds.clip_cov:  # PPO's max(−A·ρ, −A·clip(ρ)) × (1 − s), s = cov_select
        cov = zero(opt["cov_select"]).detach()
        l1, l2 = -adv * rho.clamp(max=k.delta), -adv * rho.clamp(lo, hi)
        pg = torch.maximum(l1, l2)
        l3 = -adv * k.dual_clip_c
        pg = torch.where(adv < 0, torch.minimum(pg, l3), pg) * (1.0 - cov)
        clipped = (cov > 0).to(dt)  # verl's pg_clipfrac: the selected fraction
    elif kind == kinds.kl_cov:  # −A·ρ + s·k·|Δ|
        cov = zero(opt["cov_select"]).detach()
        pg = -adv * rho + cov * (k.cov_kl_coef * delta.abs())
    phi = rows0()
    if kind == kinds.vespo:  # −sg[φ]·A·logp (TRL's get_gamma_weights)
        s = (delta.clamp(-20.0, 20.0) * mf).sum(-1)
        if rollout_w is not None:  # log of the rollout weight, as TRL folds its IS ratio
            s = s + (torch.log(rollout_w).clamp(math.log(1e-8), 20.0) * mf).sum(-1)
        log_w = s.clamp(math.log(1e-8), 20.0).detach()[:, None]
        nonneg = adv >= 0
        pick = lambda pos, neg: torch.where(nonneg, torch.full_like(adv, pos),
                                            torch.full_like(adv, neg))
        kk = pick(k.vespo_k_pos, k.vespo_k_neg)
        lam = pick(k.vespo_lambda_pos, k.vespo_lambda_neg).clamp(min=1e-4)
        phi = torch.exp(lam + kk * log_w - lam * torch.exp(log_w))
        phi = phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0) * mf
        pg = -phi * adv * logp
        seq_r = log_w[:, 0]
    pg_row = (pg * mult * mf).sum(-1)
    if kind == kinds.gmpo:  # −Ā·exp(Σ m Δc / len), Δc = sgn(A)·min(sgn(A)·Δ, sgn(A)·clip(Δ))
        sgn = torch.sign(adv)
        dclamp = delta.clamp(lo, hi)
        dc = sgn * torch.minimum(sgn * delta, sgn * dclamp)
        seq_r = (dc * mf).sum(-1) / lens1
        rho_seq = torch.exp(seq_r)
        if rollout_w is not None:  # verl's geo_mean: the geometric mean of the weights
            seq_w = torch.exp((torch.log(rollout_w + 1e-10) * mf).sum(-1) / lens1)
        pg_row = -((adv * mf).sum(-1) / lens1) * rho_seq * seq_w
        clipped = ((delta != dclamp) & m).to(dt)
        clip_low, clip_high = clipped * (adv < 0), clipped * (adv > 0)
        rho = rho_seq[:, None].expand(B, T)

    kl = None
    if k.kl_kind != codes.kl_kinds.none:
        kl = kl_estimate(logp, zero(opt["ref_logprobs"]), k.kl_kind, bool(k.kl_straight_through),
                         k.kl_log_clamp, k.kl_value_clamp)
        if k.kl_bias_correction:
            kl = kl * rho
        kl = kl * mf

    # NaN policy: a non-finite input at a valid token makes its row's input sums non-finite.
    check = lp_sum + (adv * mf).sum(-1)
    for name in ("ref_logprobs" if kl is not None else None, "entropy", "token_weights"):
        if name is not None and opt[name] is not None:
            check = check + zero(opt[name]).sum(-1)
    return _Terms(mf=mf, lens=lens, delta=delta * mf, adv=adv, rho=rho, pg=pg * mf,
                  mult=mult * mf, pg_row=pg_row, seq_r=seq_r, seq_w=seq_w,
                  rollout_w=rollout_w, ent_mask=ent_mask, ent=ent, kl=kl,
                  clipped=clipped * mf, clip_low=clip_low * mf, clip_high=clip_high * mf,
                  dual=dual * mf,
                  neg_log_ratio=-delta.clamp(-k.log_ratio_clamp, k.log_ratio_clamp) * mf,
                  non_finite=~torch.isfinite(check), phi=phi)


def policy_loss_row_stats(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor,
                          mask: Tensor, inputs: Sequence[Tensor | None], flags: list[int],
                          hparams: list[float]) -> Tensor:
    """The kernels' per-row statistics: ``(len(row_stats), B)`` in the row order of
    ``layout("policy_loss").row_stats``, in the compute dtype; the ``row_grads`` rows (pg_sum,
    kl_sum, ent_sum, lp_sum) are differentiable wrt ``logprobs`` and the entropy.

    ``inputs``: the optional inputs by slot of ``layout("policy_loss").inputs``;
    ``flags`` / ``hparams``: the kernels' codes and hyperparameters
    (:meth:`~rlkern.PolicyLossConfig.kernel_args`). Sums are over each row's valid tokens.
    """
    lay = layout("policy_loss")
    opt = {slot.name: inputs[slot] for slot in lay.inputs}
    t = _terms(logprobs, old_logprobs, advantages, mask, decode_kernel_args(flags, hparams), opt)
    rsum = lambda x: x.sum(-1)
    B, T = t.mf.shape
    zeros = torch.zeros(B, dtype=t.mf.dtype, device=t.mf.device)
    valid = t.mf > 0
    rho = t.rho.detach()
    em = t.ent_mask * t.mf
    stats = {
        "len": t.lens,
        "pg_sum": t.pg_row,
        "kl_sum": zeros if t.kl is None else rsum(t.kl),
        "ent_sum": zeros if t.ent is None else rsum(t.ent * em),
        "lp_sum": rsum(t.delta),
        "ent_count": zeros if t.ent is None else rsum(em),
        "seq_log_ratio": t.seq_r.detach(),
        "seq_weight": t.seq_w,
        "adv_sum": rsum(t.adv),
        "clip": rsum(t.clipped),
        "clip_low": rsum(t.clip_low),
        "clip_high": rsum(t.clip_high),
        "dual_clip": rsum(t.dual),
        "neg_log_ratio": rsum(t.neg_log_ratio),
        "ratio_sum": rsum(rho * t.mf),
        "ratio_min": torch.where(valid, rho, math.inf).amin(-1) if T else zeros + math.inf,
        "ratio_max": torch.where(valid, rho, -math.inf).amax(-1) if T else zeros - math.inf,
        "entropy_valid": zeros if t.ent is None else rsum(t.ent),
        "rollout_w_sum": zeros if t.rollout_w is None else rsum(t.rollout_w),
        "non_finite": t.non_finite.to(t.mf.dtype),
        "phi_sum": rsum(t.phi),
    }
    return torch.stack([stats[s.name] for s in lay.row_stats])


def policy_loss_reference(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor,
                          mask: Tensor, config: PolicyLossConfig, *,
                          num_tokens: float | Tensor | None = None,
                          num_seqs: float | Tensor | None = None,
                          **inputs: Tensor | float | None) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss (differentiable wrt ``logprobs`` and ``entropy``) and metrics of ALGORITHMS.md §3.

    ``inputs``: the optional inputs of :func:`rlkern.policy_loss` by slot name
    (``layout("policy_loss").inputs``: ref_logprobs, rollout_logprobs, entropy,
    token_weights, entropy_threshold)."""
    opt = {slot.name: inputs.pop(slot.name, None) for slot in layout("policy_loss").inputs}
    if inputs:
        raise TypeError(f"policy_loss_reference: unknown inputs {sorted(inputs)}")
    cfg = config
    m = mask.bool()
    with_kl = opt["ref_logprobs"] is not None and cfg.kl_coef != 0.0
    with_rollout = opt["rollout_logprobs"] is not None and cfg.rollout_correction is not None
    pg_scale = 1.0
    if with_rollout and cfg.rollout_batch_normalize:  # over the mask before rejection
        k = decode_kernel_args(*cfg.kernel_args(with_kl=with_kl, with_rollout=True))
        w = rollout_weights(old_logprobs.double(), opt["rollout_logprobs"], m, k)
        pg_scale = 1.0 / batch_norm_factor_reference(w, m, cfg.rollout_correction.split("_")[0])
    if opt["rollout_logprobs"] is not None and cfg.rollout_rs is not None:
        m = rejection_mask_reference(old_logprobs, opt["rollout_logprobs"], m, cfg.rejection())
        mask = m
    if cfg.top_entropy_quantile < 1.0:
        assert opt["entropy"] is not None
        if opt["entropy_threshold"] is None:
            opt["entropy_threshold"] = entropy_quantile_threshold_reference(
                opt["entropy"], m, cfg.top_entropy_quantile)
    else:
        opt["entropy_threshold"] = None
    if cfg.policy_loss == "gvpo" and advantages.dim() != 1:
        raise ValueError("gvpo takes one score per response: advantages of shape (B,)")
    flags, hparams = cfg.kernel_args(with_kl=with_kl, with_rollout=with_rollout)
    t = _terms(logprobs, old_logprobs, advantages, mask, decode_kernel_args(flags, hparams), opt)
    dt = t.mf.dtype
    B = t.mf.shape[0]
    agg = lambda x, mode, msk=m, glob=True: agg_loss_reference(
        x, msk, mode, num_tokens=num_tokens if glob else None,
        num_seqs=num_seqs if glob else None, count_empty_seqs=cfg.count_empty_seqs,
        max_len=cfg.max_len)
    # gmpo and gvpo average per sequence over all rows (or sum)
    d = float(B if cfg.loss_agg_mode not in ("sum", "token-sum") else 1)
    seq_denominator = d if num_seqs is None or d == 1 else num_seqs
    if cfg.policy_loss == "gmpo":
        pg_loss = t.pg_row.sum() / seq_denominator
    elif cfg.policy_loss == "gvpo":
        g = cfg.group_size
        reward = cfg.gvpo_beta * t.delta.sum(-1)
        rg, sg = reward.view(-1, g), advantages.to(dt).view(-1, g)
        e = (rg - rg.mean(-1, keepdim=True)) - (sg - sg.mean(-1, keepdim=True))
        pg_loss = (0.5 * e.square().reshape(-1) / (g - 1)).sum() / seq_denominator
    else:
        pg_loss = agg(t.pg * t.mult, cfg.loss_agg_mode)
    pg_loss = pg_loss * pg_scale

    total = pg_loss
    metrics: dict[str, Tensor] = {}
    n_valid = t.mf.sum().clamp(min=1.0)
    mean = lambda x: (x.detach() * t.mf).sum() / n_valid
    if t.kl is not None:
        kl_loss = agg(t.kl, cfg.kl_agg())
        total = total + cfg.kl_coef * kl_loss
        metrics["kl_loss"] = kl_loss.detach()
        metrics["kl"] = mean(t.kl)
    if t.ent is not None:
        ent_loss = agg(t.ent, cfg.entropy_agg(), m & (t.ent_mask > 0), cfg.entropy_global_norm)
        total = total - cfg.entropy_coef * ent_loss
        metrics["entropy_loss"] = ent_loss.detach()
        metrics["entropy_mean"] = mean(t.ent)
    total = total * cfg.loss_scale

    rho = t.rho.detach()
    nan = torch.tensor(math.nan, dtype=dt)
    metrics.update(
        pg_loss=pg_loss.detach(),
        clipfrac=mean(t.clipped),
        clipfrac_low=mean(t.clip_low),
        clipfrac_high=mean(t.clip_high),
        dualclip_frac=mean(t.dual),
        approx_kl=mean(t.neg_log_ratio),
        ratio_mean=mean(rho),
        ratio_min=torch.where(m, rho, math.inf).min() if m.any() else nan,
        ratio_max=torch.where(m, rho, -math.inf).max() if m.any() else nan,
    )
    if t.rollout_w is not None:
        metrics["rollout_weight_mean"] = mean(t.rollout_w)
    if cfg.policy_loss == "vespo":
        metrics["vespo_phi_mean"] = mean(t.phi)
    return total.to(dt), metrics
