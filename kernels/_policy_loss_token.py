"""Per-token formulas of the policy-loss Triton kernels (csrc/include/rlkern/policy_loss.h's
``token_loss`` and its helpers): the loss of each token kind, its derivatives and its metric
indicators. Imported by ``kernels/policy_loss.py``; imports only triton."""

from __future__ import annotations

import triton
import triton.language as tl

__all__: list[str] = []


@triton.jit
def _clampv(x, lo, hi):
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def _in_closed(x, lo, hi):
    return (x >= lo) & (x <= hi)


@triton.jit
def _one(c, like):
    return tl.where(c, 1.0, 0.0).to(like.dtype)


@triton.jit
def _hp(hp_ptr, FIELD: tl.constexpr):
    """One hyperparameter (policy_loss.h struct HParams field index FIELD)."""
    return tl.load(hp_ptr + FIELD)


@triton.jit
def _dppo_valid(BINARY_KL: tl.constexpr, a, lp, old, lo, hi):
    """DPPO's trust region (policy_loss.h dppo_valid): p = e^logp, p_old = e^old; TV:
    A > 0 ? p − p_old ≤ hi : p − p_old ≥ lo; KL: the binary KL b of verl (its 1e-8 terms),
    A > 0 ? (b ≤ hi or p ≤ p_old) : (b ≤ −lo or p ≥ p_old)."""
    p = tl.exp(lp)
    po = tl.exp(old)
    pos = a > 0.0
    if BINARY_KL:
        b = po * (old - lp) + (1.0 - po) * tl.log((1.0 - po + 1e-8) / (1.0 - p + 1e-8))
        valid = tl.where(pos, (b <= hi) | (p <= po), (b <= -lo) | (p >= po))
    else:
        diff = p - po
        valid = tl.where(pos, diff <= hi, diff >= lo)
    return valid


@triton.jit
def _token_loss(KIND: tl.constexpr, rho, a, lp, old, cov, lo, hi, hp_ptr, LAY: tl.constexpr):
    """(ℓ, ∂ℓ/∂r, direct ∂ℓ/∂logp, clipped, clip_low, clip_high, dual) of one token kind;
    ``old``: the old log-probability (dro, dppo, kl_cov read it); ``cov``: the cov_select
    value (clip_cov / kl_cov)."""
    K: tl.constexpr = LAY.loss_kinds
    zero = tl.zeros_like(rho)
    if KIND == K.kl_cov:  # −A·ρ + s·k·|Δ|; ∂|Δ|/∂logp = sign(Δ)
        k = _hp(hp_ptr, LAY.hparams.cov_kl_coef)
        d = lp - old
        loss = -a * rho + cov * (k * tl.where(d < 0.0, -d, d))
        d_r = -a * rho
        d_lp = cov * k * tl.where(d > 0.0, 1.0, tl.where(d < 0.0, -1.0, 0.0))
        clipped = zero
        clip_low = zero
        clip_high = zero
        dual = zero
    elif KIND == K.dro:  # −(logp·A − ½β·Δ²), Δ unclamped; ∂/∂logp = β·Δ − A
        half_beta = 0.5 * _hp(hp_ptr, LAY.hparams.dro_beta)
        d = lp - old
        loss = -(lp * a - half_beta * (d * d))
        d_r = zero
        d_lp = 2.0 * half_beta * d - a
        clipped = zero
        clip_low = zero
        clip_high = zero
        dual = zero
    elif (KIND == K.dppo_tv) or (KIND == K.dppo_kl):  # −A·sg[min(ρ, c)]·logp·valid
        c = _hp(hp_ptr, LAY.hparams.dual_clip_c)
        valid = _dppo_valid(KIND == K.dppo_kl, a, lp, old, lo, hi)
        vf = _one(valid, rho)
        coef = -a * tl.where(rho > c, c, rho)
        loss = coef * lp * vf
        d_r = zero
        d_lp = coef * vf
        clipped = 1.0 - vf
        clip_low = zero
        clip_high = zero
        dual = _one((rho > c) & valid, rho)
    elif KIND == K.cispo:
        coef = -_clampv(rho, lo, hi) * a
        loss = coef * lp
        d_r = zero
        d_lp = coef
        clipped = _one((rho < lo) | (rho > hi), rho)
        clip_low = _one((rho < lo) & (a < 0.0), rho)
        clip_high = _one((rho > hi) & (a > 0.0), rho)
        dual = zero
    elif KIND == K.sapo:
        tau = tl.where(a > 0.0, _hp(hp_ptr, LAY.hparams.sapo_tau_pos),
                       _hp(hp_ptr, LAY.hparams.sapo_tau_neg))
        s = 1.0 / (1.0 + tl.exp(-(tau * (rho - 1.0))))
        loss = -(s * (4.0 / tau)) * a
        d_r = -4.0 * a * s * (1.0 - s) * rho
        d_lp = zero
        clipped = zero
        clip_low = zero
        clip_high = zero
        dual = zero
    elif (KIND == K.reinforce) or (KIND == K.vespo):  # vespo: scaled by φ (_vespo_phis)
        loss = -a * lp
        d_r = zero
        d_lp = -a
        clipped = zero
        clip_low = zero
        clip_high = zero
        dual = zero
    elif KIND == K.gvpo:
        loss = zero
        d_r = zero
        d_lp = zero
        clipped = zero
        clip_low = zero
        clip_high = zero
        dual = zero
    else:  # PPO (also clip_cov): max(−A·min(ρ, δ), −A·clip(ρ, lo, hi)), dual clip for A < 0
        delta = _hp(hp_ptr, LAY.hparams.delta)
        c = _hp(hp_ptr, LAY.hparams.dual_clip_c)
        rho_d = tl.where(rho > delta, delta, rho)
        g1 = tl.where(rho <= delta, rho, 0.0)
        g2 = tl.where(_in_closed(rho, lo, hi), rho, 0.0)
        l1 = -a * rho_d
        l2 = -a * _clampv(rho, lo, hi)
        loss = tl.where(l1 >= l2, l1, l2)
        d_r = tl.where(l1 > l2, -a * g1, tl.where(l1 < l2, -a * g2, -0.5 * a * (g1 + g2)))
        l3 = -a * c
        neg = a < 0.0
        is_dual = neg & (loss > l3)
        d_r = tl.where(neg, tl.where(loss > l3, 0.0, tl.where(loss == l3, 0.5 * d_r, d_r)), d_r)
        loss = tl.where(is_dual, l3, loss)
        d_lp = zero
        clipped = _one(l2 > l1, rho)
        clip_low = _one((rho_d < lo) & neg, rho)  # the ratio as the loss sees it
        clip_high = _one((rho_d > hi) & (a > 0.0), rho)
        dual = _one(is_dual, rho)
        if KIND == K.clip_cov:  # PPO × (1 − s); clipped: the selected tokens
            loss = loss * (1.0 - cov)
            d_r = d_r * (1.0 - cov)
            clipped = _one(cov > 0.0, rho)
            clip_low = zero
            clip_high = zero
            dual = zero
    return loss, d_r, d_lp, clipped, clip_low, clip_high, dual
