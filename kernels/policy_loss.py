"""Triton kernels of the policy-loss family (ALGORITHMS.md §3): one pass forward, one backward.

They mirror ``csrc/include/rlkern/policy_loss.h`` token for token (the formulas, the
torch-style gradient conventions — clamp passes its gradient on the closed interval, max/min
split it on ties — and the per-row statistics layout). One program handles one sequence (row)
in BLOCK_T chunks:

* forward: [prefix loop: Σ m, Σ m·Δ, Σ m·(old − rollout) when a sequence quantity needs them]
  then one loop computing the per-token loss, KL and entropy terms and reducing them to the
  row's statistics ``row_stats[k, row]`` (``(20, B)`` float64, statistic-major);
* backward: given one coefficient per row for each differentiable statistic
  (``grad_rows (4, B)``), ∂loss/∂logp (and ∂loss/∂entropy) per token; the sequence-ratio
  mode with the exact gradient of the mean (TRL's sequence level) makes a first loop for
  Σ_t m·∂ℓ/∂r.

Structure is compile-time (the loss kind, ratio mode, KL estimator, which add-ons are present:
a handful of constexpr flags); every float hyperparameter is read at run time from a small
``hparams`` tensor (DESIGN rule 7), in the compute dtype (fp32, or fp64 for fp64 inputs).
This module imports only triton. ``AOT_SPECS`` lists the default configurations for
ahead-of-time compilation (``rlkern aot-report``).
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

__all__ = ["AOT_SPECS", "block_t", "kl_penalty", "policy_loss_bwd", "policy_loss_fwd"]

# Indices of the hparams vector (policy_loss.h struct HParams order).
_CLIP_LO = tl.constexpr(0)
_CLIP_HI = tl.constexpr(1)
_DUAL_C = tl.constexpr(2)
_DELTA = tl.constexpr(3)
_LR_CLAMP = tl.constexpr(4)
_SEQ_MAX = tl.constexpr(5)
_TAU_POS = tl.constexpr(6)
_TAU_NEG = tl.constexpr(7)
_KL_LC = tl.constexpr(8)
_KL_VC = tl.constexpr(9)
_ROLL_LC = tl.constexpr(10)
_ROLL_MIN = tl.constexpr(11)
_ROLL_MAX = tl.constexpr(12)

# Loss kinds, ratio modes, KL estimators, rollout levels (policy_loss.h enums).
_PPO = tl.constexpr(0)
_CISPO = tl.constexpr(1)
_SAPO = tl.constexpr(2)
_REINFORCE = tl.constexpr(3)
_GMPO = tl.constexpr(4)
_GVPO = tl.constexpr(5)
_RATIO_TOKEN = tl.constexpr(0)
_RATIO_SEQ_FULL = tl.constexpr(2)
_K1 = tl.constexpr(1)
_K2 = tl.constexpr(2)
_ABS = tl.constexpr(4)
_ROLL_TOKEN = tl.constexpr(1)
_ROLL_SEQ = tl.constexpr(2)

# Row statistics (policy_loss.h enum RowStat).
_S_LEN = tl.constexpr(0)
_S_PG = tl.constexpr(1)
_S_KL = tl.constexpr(2)
_S_ENT = tl.constexpr(3)
_S_LP = tl.constexpr(4)
_S_ENT_COUNT = tl.constexpr(5)
_S_SEQ_R = tl.constexpr(6)
_S_SEQ_W = tl.constexpr(7)
_S_ADV = tl.constexpr(8)
_S_CLIP = tl.constexpr(9)
_S_CLIP_LOW = tl.constexpr(10)
_S_CLIP_HIGH = tl.constexpr(11)
_S_DUAL = tl.constexpr(12)
_S_NEG_LR = tl.constexpr(13)
_S_RATIO_SUM = tl.constexpr(14)
_S_RATIO_MIN = tl.constexpr(15)
_S_RATIO_MAX = tl.constexpr(16)
_S_ENT_VALID = tl.constexpr(17)
_S_ROLL_W = tl.constexpr(18)
_S_BAD = tl.constexpr(19)


# ---------------------------------------------------------------------------------------------
# Per-token formulas (policy_loss.h)


@triton.jit
def _clampv(x, lo, hi):
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def _in_closed(x, lo, hi):
    return (x >= lo) & (x <= hi)


@triton.jit
def _s64(x):
    return tl.sum(x, axis=0).to(tl.float64)


@triton.jit
def _one(c, like):
    return tl.where(c, 1.0, 0.0).to(like.dtype)


@triton.jit
def _token_loss(KIND: tl.constexpr, rho, a, lp, lo, hi, delta, c, tau_pos, tau_neg):
    """(ℓ, ∂ℓ/∂r, direct ∂ℓ/∂logp, clipped, clip_low, clip_high, dual) of one token kind."""
    zero = tl.zeros_like(rho)
    if KIND == _CISPO:
        coef = -_clampv(rho, lo, hi) * a
        loss = coef * lp
        d_r = zero
        d_lp = coef
        clipped = _one((rho < lo) | (rho > hi), rho)
        clip_low = _one((rho < lo) & (a < 0.0), rho)
        clip_high = _one((rho > hi) & (a > 0.0), rho)
        dual = zero
    elif KIND == _SAPO:
        tau = tl.where(a > 0.0, tau_pos, tau_neg)
        s = 1.0 / (1.0 + tl.exp(-(tau * (rho - 1.0))))
        loss = -(s * (4.0 / tau)) * a
        d_r = -4.0 * a * s * (1.0 - s) * rho
        d_lp = zero
        clipped = zero
        clip_low = zero
        clip_high = zero
        dual = zero
    elif KIND == _REINFORCE:
        loss = -a * lp
        d_r = zero
        d_lp = -a
        clipped = zero
        clip_low = zero
        clip_high = zero
        dual = zero
    elif KIND == _GVPO:
        loss = zero
        d_r = zero
        d_lp = zero
        clipped = zero
        clip_low = zero
        clip_high = zero
        dual = zero
    else:  # PPO: max(−A·min(ρ, δ), −A·clip(ρ, lo, hi)), dual clip for A < 0
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
        clip_low = _one((rho < lo) & neg, rho)
        clip_high = _one((rho > hi) & (a > 0.0), rho)
        dual = _one(is_dual, rho)
    return loss, d_r, d_lp, clipped, clip_low, clip_high, dual


@triton.jit
def _gmpo_clip(d, a, lo, hi):
    """(Δc, ∂Δc/∂Δ, clipped) of GMPO's sign-aware log-ratio clip."""
    sg = tl.where(a > 0.0, 1.0, tl.where(a < 0.0, -1.0, 0.0)).to(d.dtype)
    c = _clampv(d, lo, hi)
    x = sg * d
    y = sg * c
    dc = sg * tl.where(x < y, x, y)
    dd = tl.where((x < y) | _in_closed(d, lo, hi), sg * sg, 0.0)
    return dc, dd, _one(d != c, d)


@triton.jit
def _kl_term(KIND: tl.constexpr, ST: tl.constexpr, lp, ref, log_clamp, value_clamp):
    """(value, ∂value/∂logp) of a KL estimator; ST: the gradient of k2 instead."""
    x = lp - ref
    if KIND == _K1:
        value = x
        d = tl.full(x.shape, 1.0, x.dtype)
    elif KIND == _K2:
        value = 0.5 * (x * x)
        d = x
    elif KIND == _ABS:
        value = tl.where(x < 0.0, -x, x)
        d = tl.where(x > 0.0, 1.0, tl.where(x < 0.0, -1.0, 0.0)).to(x.dtype)
    else:  # k3
        y = ref - lp
        yc = _clampv(y, -log_clamp, log_clamp)
        e = tl.exp(yc)
        v0 = e - yc - 1.0
        value = _clampv(v0, -value_clamp, value_clamp)
        d = tl.where(_in_closed(y, -log_clamp, log_clamp)
                     & _in_closed(v0, -value_clamp, value_clamp), 1.0 - e, 0.0)
    if ST:
        d = x
    return value, d


@triton.jit
def _rollout_weight(d, log_clamp, wmin, wmax, MASK_MODE: tl.constexpr):
    d = tl.where(d != d, 0.0, d)  # a NaN (unscored) token: no correction
    w = tl.exp(_clampv(d, -log_clamp, log_clamp))
    if MASK_MODE:
        w = tl.where(_in_closed(w, wmin, wmax), w, 0.0)
    else:
        w = _clampv(w, wmin, wmax)
    return w


@triton.jit
def _row_prefix(lp_row, old_row, roll_row, mask_row, T, BLOCK_T: tl.constexpr,
                WANT_ROLL: tl.constexpr):
    """Σ m, Σ m·(logp − old), Σ m·(old − rollout) of a row (float64)."""
    n = tl.zeros((), tl.float64)
    lps = tl.zeros((), tl.float64)
    rs = tl.zeros((), tl.float64)
    for t0 in range(0, T, BLOCK_T):
        offs = t0 + tl.arange(0, BLOCK_T)
        inb = offs < T
        v = (tl.load(mask_row + offs, mask=inb, other=0) != 0) & inb
        lp = tl.load(lp_row + offs, mask=v, other=0.0)
        old = tl.load(old_row + offs, mask=v, other=0.0)
        n += tl.sum(tl.where(v, 1.0, 0.0).to(tl.float64), axis=0)
        lps += tl.sum(tl.where(v, lp - old, 0.0), axis=0).to(tl.float64)
        if WANT_ROLL:
            roll = tl.load(roll_row + offs, mask=v, other=0.0)
            d = old - roll
            rs += tl.sum(tl.where(v & (d == d), d, 0.0), axis=0).to(tl.float64)
    return n, lps, rs


@triton.jit
def _seq_quantities(n, lps, rs, hp_ptr, ROLL: tl.constexpr, ROLL_MASK: tl.constexpr):
    """The row's sequence log-ratio, whether its clamp passes the gradient, its rollout weight
    (float64, as the C++ kernels compute them)."""
    seq_max = tl.load(hp_ptr + _SEQ_MAX).to(tl.float64)
    mean = lps / tl.maximum(n, 1.0)
    passes = mean <= seq_max
    r_seq = tl.where(mean > seq_max, seq_max, mean)
    seq_w = tl.full((), 1.0, tl.float64)
    if ROLL == _ROLL_SEQ:
        seq_w = _rollout_weight(rs, tl.load(hp_ptr + _ROLL_LC).to(tl.float64),
                                tl.load(hp_ptr + _ROLL_MIN).to(tl.float64),
                                tl.load(hp_ptr + _ROLL_MAX).to(tl.float64), ROLL_MASK)
    return r_seq, passes, seq_w


@triton.jit
def _multiplier(old, roll_row, ent_row, tw_row, offs, v, thr, seq_w, hp_ptr,
                ROLL: tl.constexpr, ROLL_MASK: tl.constexpr, HAS_ENT: tl.constexpr,
                HAS_THR: tl.constexpr, HAS_TW: tl.constexpr):
    """(rollout weight w, entropy mask em, entropy H, token weight) of a block (0 at masked)."""
    one = tl.full(old.shape, 1.0, old.dtype)
    w = one
    if ROLL == _ROLL_TOKEN:
        roll = tl.load(roll_row + offs, mask=v, other=0.0)
        w = _rollout_weight(tl.where(v, old - roll, 0.0), tl.load(hp_ptr + _ROLL_LC),
                            tl.load(hp_ptr + _ROLL_MIN), tl.load(hp_ptr + _ROLL_MAX), ROLL_MASK)
    if ROLL == _ROLL_SEQ:
        w = one * seq_w.to(old.dtype)
    h = tl.zeros_like(old)
    em = one
    if HAS_ENT:
        h = tl.load(ent_row + offs, mask=v, other=0.0)
        if HAS_THR:
            em = tl.where(h >= thr, 1.0, 0.0).to(old.dtype)
    wt = one
    if HAS_TW:
        wt = tl.load(tw_row + offs, mask=v, other=0.0)
    return w, em, h, wt


# ---------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _policy_loss_fwd_kernel(
    lp_ptr, old_ptr, adv_ptr, mask_ptr,  # (B, T) compute dtype (adv: (B,) or (B, T)), mask bool
    ref_ptr, roll_ptr, ent_ptr, tw_ptr,  # (B, T) optional inputs (placeholders when absent)
    thr_ptr,  # one value: the entropy-mask threshold (read when HAS_THR)
    hp_ptr,  # (13,) hyperparameters, compute dtype
    stats_ptr,  # (20, B) float64 output
    B, T,
    stride_lp, stride_old, stride_adv, stride_mask, stride_ref, stride_roll, stride_ent,
    stride_tw,
    LOSS: tl.constexpr, RATIO: tl.constexpr, KL: tl.constexpr, KL_BIAS: tl.constexpr,
    ROLL: tl.constexpr, ROLL_MASK: tl.constexpr, HAS_ENT: tl.constexpr, HAS_THR: tl.constexpr,
    HAS_TW: tl.constexpr, ADV_TOKEN: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    lp_row = lp_ptr + row * stride_lp
    old_row = old_ptr + row * stride_old
    mask_row = mask_ptr + row * stride_mask
    ref_row = ref_ptr + row * stride_ref
    roll_row = roll_ptr + row * stride_roll
    ent_row = ent_ptr + row * stride_ent
    tw_row = tw_ptr + row * stride_tw
    dt = lp_ptr.dtype.element_ty
    lo = tl.load(hp_ptr + _CLIP_LO)
    hi = tl.load(hp_ptr + _CLIP_HI)
    C = tl.load(hp_ptr + _LR_CLAMP)
    thr = tl.zeros((), dt)
    if HAS_THR:
        thr = tl.load(thr_ptr)
    adv0 = tl.zeros((), dt)
    if not ADV_TOKEN:
        adv0 = tl.load(adv_ptr + row)

    n, lps, rs = _row_prefix(lp_row, old_row, roll_row, mask_row, T, BLOCK_T, ROLL == _ROLL_SEQ)
    r_seq, _passes, seq_w = _seq_quantities(n, lps, rs, hp_ptr, ROLL, ROLL_MASK)
    r_seq_t = r_seq.to(dt)

    zero = tl.zeros((BLOCK_T,), dt)
    acc_pg = zero
    acc_kl = zero
    acc_ent = zero
    acc_ent_n = zero
    acc_ent_valid = zero
    acc_clip = zero
    acc_clo = zero
    acc_chi = zero
    acc_dual = zero
    acc_nlr = zero
    acc_rs = zero
    acc_adv = zero
    acc_w = zero
    acc_check = zero  # Σ of the other inputs: the NaN policy reads only row sums
    acc_dc = zero
    acc_logw = tl.zeros((BLOCK_T,), tl.float64)
    rmin = tl.full((BLOCK_T,), float("inf"), dt)
    rmax = tl.full((BLOCK_T,), float("-inf"), dt)
    for t0 in range(0, T, BLOCK_T):
        offs = t0 + tl.arange(0, BLOCK_T)
        inb = offs < T
        v = (tl.load(mask_row + offs, mask=inb, other=0) != 0) & inb
        lp_raw = tl.load(lp_row + offs, mask=inb, other=0.0)
        old_raw = tl.load(old_row + offs, mask=inb, other=0.0)
        if ADV_TOKEN:
            a_raw = tl.load(adv_ptr + row * stride_adv + offs, mask=inb, other=0.0)
        else:
            a_raw = zero + adv0
        lp = tl.where(v, lp_raw, 0.0)
        old = tl.where(v, old_raw, 0.0)
        a = tl.where(v, a_raw, 0.0)
        d = lp - old
        dc = _clampv(d, -C, C)
        w, em, h, wt = _multiplier(old, roll_row, ent_row, tw_row, offs, v, thr, seq_w, hp_ptr,
                                   ROLL, ROLL_MASK, HAS_ENT, HAS_THR, HAS_TW)
        mult = tl.where(v, w * em * wt, 0.0)
        if LOSS == _GMPO:
            gdc, _gd, gclip = _gmpo_clip(d, a, lo, hi)
            acc_dc += gdc
            acc_clip += tl.where(v, gclip, 0.0)
            acc_clo += tl.where(v & (a < 0.0), gclip, 0.0)
            acc_chi += tl.where(v & (a > 0.0), gclip, 0.0)
            if ROLL != 0:
                acc_logw += tl.where(v, tl.log(w.to(tl.float64) + 1e-10), 0.0)
            rho = zero + 1.0  # the KL bias correction does not apply to gmpo
        else:
            if RATIO == _RATIO_TOKEN:
                rho = tl.exp(dc)
            else:
                rho = zero + tl.exp(r_seq_t)
            loss, _dr, _dl, clipped, clo, chi, dual = _token_loss(
                LOSS, rho, a, lp, lo, hi, tl.load(hp_ptr + _DELTA), tl.load(hp_ptr + _DUAL_C),
                tl.load(hp_ptr + _TAU_POS), tl.load(hp_ptr + _TAU_NEG))
            acc_pg += tl.where(v, mult * loss, 0.0)
            acc_clip += tl.where(v, clipped, 0.0)
            acc_clo += tl.where(v, clo, 0.0)
            acc_chi += tl.where(v, chi, 0.0)
            acc_dual += tl.where(v, dual, 0.0)
            acc_rs += tl.where(v, rho, 0.0)
            rmin = tl.minimum(rmin, tl.where(v, rho, float("inf")))
            rmax = tl.maximum(rmax, tl.where(v, rho, float("-inf")))
        if KL != 0:
            ref_raw = tl.load(ref_row + offs, mask=inb, other=0.0)
            kv, _kd = _kl_term(KL, False, lp, tl.where(v, ref_raw, 0.0),
                               tl.load(hp_ptr + _KL_LC), tl.load(hp_ptr + _KL_VC))
            if KL_BIAS:
                kv = kv * rho
            acc_kl += tl.where(v, kv, 0.0)
            acc_check += tl.where(v, ref_raw, 0.0)
        if HAS_ENT:
            acc_ent += tl.where(v, em * h, 0.0)
            acc_ent_n += tl.where(v, em, 0.0)
            acc_ent_valid += tl.where(v, h, 0.0)
        if HAS_TW:
            acc_check += tl.where(v, wt, 0.0)
        acc_w += tl.where(v, w, 0.0)
        acc_nlr -= dc
        acc_adv += a

    pg = _s64(acc_pg)
    if RATIO != _RATIO_TOKEN:
        seq_r_out = r_seq
    else:
        seq_r_out = tl.zeros((), tl.float64)
    seq_w_out = seq_w
    ratio_sum = _s64(acc_rs)
    ratio_min = tl.min(rmin, axis=0).to(tl.float64)
    ratio_max = tl.max(rmax, axis=0).to(tl.float64)
    adv_sum = _s64(acc_adv)
    if LOSS == _GMPO:
        len1 = tl.maximum(n, 1.0)
        seq_r_out = _s64(acc_dc) / len1
        rho_i = tl.exp(seq_r_out)
        if ROLL != 0:
            seq_w_out = tl.exp(tl.sum(acc_logw, axis=0) / len1)
        else:
            seq_w_out = tl.full((), 1.0, tl.float64)
        pg = -(adv_sum / len1) * rho_i * seq_w_out
        ratio_sum = n * rho_i
        ratio_min = tl.where(n > 0, rho_i, float("inf"))
        ratio_max = tl.where(n > 0, rho_i, float("-inf"))
    out = stats_ptr + row
    tl.store(out + _S_LEN * B, n)
    tl.store(out + _S_PG * B, pg)
    tl.store(out + _S_KL * B, _s64(acc_kl))
    tl.store(out + _S_ENT * B, _s64(acc_ent))
    tl.store(out + _S_LP * B, lps)
    tl.store(out + _S_ENT_COUNT * B, _s64(acc_ent_n))
    tl.store(out + _S_SEQ_R * B, seq_r_out)
    tl.store(out + _S_SEQ_W * B, seq_w_out)
    tl.store(out + _S_ADV * B, adv_sum)
    tl.store(out + _S_CLIP * B, _s64(acc_clip))
    tl.store(out + _S_CLIP_LOW * B, _s64(acc_clo))
    tl.store(out + _S_CLIP_HIGH * B, _s64(acc_chi))
    tl.store(out + _S_DUAL * B, _s64(acc_dual))
    tl.store(out + _S_NEG_LR * B, _s64(acc_nlr))
    tl.store(out + _S_RATIO_SUM * B, ratio_sum)
    tl.store(out + _S_RATIO_MIN * B, ratio_min)
    tl.store(out + _S_RATIO_MAX * B, ratio_max)
    tl.store(out + _S_ENT_VALID * B, _s64(acc_ent_valid))
    if ROLL != 0:
        tl.store(out + _S_ROLL_W * B, _s64(acc_w))
    else:
        tl.store(out + _S_ROLL_W * B, tl.zeros((), tl.float64))
    # NaN policy: a non-finite input at a valid token makes the row's input sums non-finite.
    check = _s64(acc_check) + _s64(acc_ent_valid) + adv_sum + lps
    tl.store(out + _S_BAD * B, tl.where(check - check == 0.0, 0.0, 1.0).to(tl.float64))


# ---------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _policy_loss_bwd_kernel(
    lp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, roll_ptr, ent_ptr, tw_ptr, thr_ptr, hp_ptr,
    stats_ptr,  # (20, B) float64: the forward's row statistics
    grad_rows_ptr,  # (4, B) float64: ∂loss/∂(pg_sum, kl_sum, ent_sum, lp_sum) per row
    grad_lp_ptr,  # (B, T) contiguous, compute dtype
    grad_ent_ptr,  # (B, T) contiguous (written when HAS_GRAD_ENT)
    B, T,
    stride_lp, stride_old, stride_adv, stride_mask, stride_ref, stride_roll, stride_ent,
    stride_tw,
    LOSS: tl.constexpr, RATIO: tl.constexpr, KL: tl.constexpr, KL_ST: tl.constexpr,
    KL_BIAS: tl.constexpr, ROLL: tl.constexpr, ROLL_MASK: tl.constexpr, HAS_ENT: tl.constexpr,
    HAS_THR: tl.constexpr, HAS_TW: tl.constexpr, ADV_TOKEN: tl.constexpr,
    HAS_GRAD_ENT: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    lp_row = lp_ptr + row * stride_lp
    old_row = old_ptr + row * stride_old
    mask_row = mask_ptr + row * stride_mask
    ref_row = ref_ptr + row * stride_ref
    roll_row = roll_ptr + row * stride_roll
    ent_row = ent_ptr + row * stride_ent
    tw_row = tw_ptr + row * stride_tw
    dt = lp_ptr.dtype.element_ty
    lo = tl.load(hp_ptr + _CLIP_LO)
    hi = tl.load(hp_ptr + _CLIP_HI)
    C = tl.load(hp_ptr + _LR_CLAMP)
    thr = tl.zeros((), dt)
    if HAS_THR:
        thr = tl.load(thr_ptr)
    adv0 = tl.zeros((), dt)
    if not ADV_TOKEN:
        adv0 = tl.load(adv_ptr + row)
    g_pg = tl.load(grad_rows_ptr + row).to(dt)
    g_kl = tl.load(grad_rows_ptr + B + row).to(dt)
    g_ent = tl.load(grad_rows_ptr + 2 * B + row).to(dt)
    g_lp = tl.load(grad_rows_ptr + 3 * B + row).to(dt)
    n = tl.load(stats_ptr + _S_LEN * B + row)
    lps = tl.load(stats_ptr + _S_LP * B + row)
    r_seq, passes, _w = _seq_quantities(n, lps, n * 0.0, hp_ptr, 0, ROLL_MASK)
    seq_w = tl.load(stats_ptr + _S_SEQ_W * B + row)  # the forward's sequence rollout weight
    r_seq_t = r_seq.to(dt)
    pass_seq = tl.where(passes, 1.0, 0.0).to(dt)
    len1 = tl.maximum(n, 1.0)
    gmpo_coef = (g_pg.to(tl.float64) * tl.load(stats_ptr + _S_PG * B + row) / len1).to(dt)
    grad_lp_row = grad_lp_ptr + row * T
    grad_ent_row = grad_ent_ptr + row * T

    # Ratio part of the sequence mean's exact gradient: G = Σ_t m·∂(loss terms)/∂r.
    G = tl.zeros((), dt)
    if RATIO == _RATIO_SEQ_FULL:
        accG = tl.zeros((BLOCK_T,), dt)
        for t0 in range(0, T, BLOCK_T):
            offs = t0 + tl.arange(0, BLOCK_T)
            inb = offs < T
            v = (tl.load(mask_row + offs, mask=inb, other=0) != 0) & inb
            lp = tl.load(lp_row + offs, mask=v, other=0.0)
            old = tl.load(old_row + offs, mask=v, other=0.0)
            if ADV_TOKEN:
                a = tl.load(adv_ptr + row * stride_adv + offs, mask=v, other=0.0)
            else:
                a = tl.where(v, adv0, 0.0)
            rho = tl.zeros((BLOCK_T,), dt) + tl.exp(r_seq_t)
            w, em, _h, wt = _multiplier(old, roll_row, ent_row, tw_row, offs, v, thr, seq_w,
                                        hp_ptr, ROLL, ROLL_MASK, HAS_ENT, HAS_THR, HAS_TW)
            _l, d_r, _dl, _c, _clo, _chi, _du = _token_loss(
                LOSS, rho, a, lp, lo, hi, tl.load(hp_ptr + _DELTA), tl.load(hp_ptr + _DUAL_C),
                tl.load(hp_ptr + _TAU_POS), tl.load(hp_ptr + _TAU_NEG))
            gr = g_pg * (w * em * wt) * d_r
            if KL != 0:
                if KL_BIAS:
                    ref = tl.load(ref_row + offs, mask=v, other=0.0)
                    kv, _kd = _kl_term(KL, KL_ST, lp, ref, tl.load(hp_ptr + _KL_LC),
                                       tl.load(hp_ptr + _KL_VC))
                    gr += g_kl * kv * rho
            accG += tl.where(v, gr, 0.0)
        G = tl.sum(accG, axis=0) / len1.to(dt) * pass_seq

    for t0 in range(0, T, BLOCK_T):
        offs = t0 + tl.arange(0, BLOCK_T)
        inb = offs < T
        v = (tl.load(mask_row + offs, mask=inb, other=0) != 0) & inb
        lp = tl.load(lp_row + offs, mask=v, other=0.0)
        old = tl.load(old_row + offs, mask=v, other=0.0)
        if ADV_TOKEN:
            a = tl.load(adv_ptr + row * stride_adv + offs, mask=v, other=0.0)
        else:
            a = tl.where(v, adv0, 0.0)
        d = lp - old
        w, em, _h, wt = _multiplier(old, roll_row, ent_row, tw_row, offs, v, thr, seq_w, hp_ptr,
                                    ROLL, ROLL_MASK, HAS_ENT, HAS_THR, HAS_TW)
        if LOSS == _GMPO:
            _gdc, gd, _gc = _gmpo_clip(d, a, lo, hi)
            g = gmpo_coef * gd
            rho = tl.zeros((BLOCK_T,), dt) + 1.0
            pass_r = tl.zeros((BLOCK_T,), dt)
        else:
            if RATIO == _RATIO_TOKEN:
                rho = tl.exp(_clampv(d, -C, C))
                pass_r = tl.where(_in_closed(d, -C, C), 1.0, 0.0).to(dt)
            else:
                rho = tl.zeros((BLOCK_T,), dt) + tl.exp(r_seq_t)
                pass_r = tl.zeros((BLOCK_T,), dt) + pass_seq
            _l, d_r, d_lp, _c, _clo, _chi, _du = _token_loss(
                LOSS, rho, a, lp, lo, hi, tl.load(hp_ptr + _DELTA), tl.load(hp_ptr + _DUAL_C),
                tl.load(hp_ptr + _TAU_POS), tl.load(hp_ptr + _TAU_NEG))
            wgt = g_pg * (w * em * wt)
            g = wgt * d_lp
            if RATIO != _RATIO_SEQ_FULL:
                g += wgt * d_r * pass_r
        if KL != 0:
            ref = tl.load(ref_row + offs, mask=v, other=0.0)
            kv, kd = _kl_term(KL, KL_ST, lp, ref, tl.load(hp_ptr + _KL_LC),
                              tl.load(hp_ptr + _KL_VC))
            if KL_BIAS:
                g += g_kl * kd * rho
                if RATIO != _RATIO_SEQ_FULL:
                    g += g_kl * kv * rho * pass_r
            else:
                g += g_kl * kd
        g += g_lp + G
        tl.store(grad_lp_row + offs, tl.where(v, g, 0.0), mask=inb)
        if HAS_GRAD_ENT:
            tl.store(grad_ent_row + offs, tl.where(v, g_ent * em, 0.0), mask=inb)


# ---------------------------------------------------------------------------------------------
# KL estimator (elementwise)


@triton.jit
def _kl_penalty_kernel(lp_ptr, ref_ptr, grad_ptr, out_ptr, n, log_clamp_ptr,
                       KIND: tl.constexpr, ST: tl.constexpr, HAS_GRAD: tl.constexpr,
                       BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    lp = tl.load(lp_ptr + offs, mask=inb, other=0.0)
    ref = tl.load(ref_ptr + offs, mask=inb, other=0.0)
    value, d = _kl_term(KIND, ST, lp, ref, tl.load(log_clamp_ptr), tl.load(log_clamp_ptr + 1))
    if HAS_GRAD:
        out = tl.load(grad_ptr + offs, mask=inb, other=0.0) * d
    else:
        out = value
    tl.store(out_ptr + offs, out, mask=inb)


# ---------------------------------------------------------------------------------------------
# Launchers (tensors in, nothing returned; the op layer allocates and validates)


def block_t(T: int) -> int:
    """Tokens per loop iteration: the row length rounded up to a power of two, in [16, 256].
    The forward keeps ~17 per-lane accumulators; 256 tokens over 4 warps is 2 tokens per
    thread, which keeps every configuration far from register spills."""
    return max(16, min(256, triton.next_power_of_2(max(T, 1))))


def _num_warps(bt: int) -> int:
    return 4 if bt >= 256 else (2 if bt >= 64 else 1)


def _common(lp, old, adv, mask, ref, rollout, ent, tw, thr, flags):
    loss, ratio, kl, kl_st, kl_bias, roll, roll_mask = flags
    ph = lambda t: lp if t is None else t
    stride = lambda t: 0 if t is None else t.stride(0)
    args = (lp, old, adv, mask, ph(ref), ph(rollout), ph(ent), ph(tw), ph(thr))
    strides = (lp.stride(0), old.stride(0), adv.stride(0) if adv.dim() == 2 else 0,
               mask.stride(0), stride(ref), stride(rollout), stride(ent), stride(tw))
    meta = dict(LOSS=loss, RATIO=ratio, KL=kl, KL_BIAS=bool(kl_bias), ROLL=roll,
                ROLL_MASK=bool(roll_mask), HAS_ENT=ent is not None, HAS_THR=thr is not None,
                HAS_TW=tw is not None, ADV_TOKEN=adv.dim() == 2)
    return args, strides, meta, bool(kl_st)


def policy_loss_fwd(lp, old, adv, mask, ref, rollout, ent, tw, thr, flags, hparams, row_stats):
    """Fill ``row_stats`` ``(20, B)`` float64. ``hparams``: a ``(13,)`` tensor of the compute
    dtype on the inputs' device; the other arguments as ``rlkern::policy_loss_fwd_out``."""
    B, T = mask.shape
    if B == 0:
        return
    args, strides, meta, _ = _common(lp, old, adv, mask, ref, rollout, ent, tw, thr, flags)
    bt = block_t(T)
    _policy_loss_fwd_kernel[(B,)](*args, hparams, row_stats, B, T, *strides, **meta,
                                  BLOCK_T=bt, num_warps=_num_warps(bt))


def policy_loss_bwd(lp, old, adv, mask, ref, rollout, ent, tw, thr, row_stats, grad_rows, flags,
                    hparams, grad_lp, grad_ent):
    """Fill ``grad_lp`` (and ``grad_ent`` when given), both ``(B, T)`` contiguous."""
    B, T = mask.shape
    if B == 0 or T == 0:
        return
    args, strides, meta, kl_st = _common(lp, old, adv, mask, ref, rollout, ent, tw, thr, flags)
    bt = block_t(T)
    _policy_loss_bwd_kernel[(B,)](
        *args, hparams, row_stats, grad_rows, grad_lp,
        grad_lp if grad_ent is None else grad_ent, B, T, *strides, **meta, KL_ST=kl_st,
        HAS_GRAD_ENT=grad_ent is not None, BLOCK_T=bt, num_warps=_num_warps(bt))


def kl_penalty(lp, ref, grad, out, clamps, *, kind: int, straight_through: bool) -> None:
    """``out = kl(lp, ref)`` or ``grad · ∂kl/∂lp`` (contiguous tensors of n elements);
    ``clamps``: a 2-element tensor (log clamp, value clamp) of the compute dtype."""
    n = lp.numel()
    if n == 0:
        return
    block = 1024
    _kl_penalty_kernel[(triton.cdiv(n, block),)](
        lp, ref, lp if grad is None else grad, out, n, clamps, KIND=kind,
        ST=bool(straight_through), HAS_GRAD=grad is not None, BLOCK=block, num_warps=4)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation specs (rlkern aot-report; tests/test_aot.py)

_AOT_T = (64, 1024)


def _aot_specs() -> list[dict[str, Any]]:
    """The common configurations: PPO / GSPO / TRL-sequence with and without KL and entropy,
    fp32, at T = 64 and 1024 (two block sizes), forward and backward."""
    specs: list[dict[str, Any]] = []
    base = {"B": "i32", "T": "i32", "mask_ptr": "*i1", "hp_ptr": "*fp32", "thr_ptr": "*fp32",
            "stats_ptr": "*fp64", "grad_rows_ptr": "*fp64"}
    for n, name in enumerate(("stride_lp", "stride_old", "stride_adv", "stride_mask",
                              "stride_ref", "stride_roll", "stride_ent", "stride_tw")):
        base[name] = "i64" if n < 4 else "i32"
    configs = {
        "ppo": dict(LOSS=0, RATIO=0, KL=0, KL_BIAS=False, ROLL=0, ROLL_MASK=False, HAS_ENT=False,
                    HAS_THR=False, HAS_TW=False, ADV_TOKEN=False),
        "ppo+k3+entropy": dict(LOSS=0, RATIO=0, KL=3, KL_BIAS=False, ROLL=0, ROLL_MASK=False,
                               HAS_ENT=True, HAS_THR=False, HAS_TW=False, ADV_TOKEN=False),
        "gspo": dict(LOSS=0, RATIO=1, KL=0, KL_BIAS=False, ROLL=0, ROLL_MASK=False,
                     HAS_ENT=False, HAS_THR=False, HAS_TW=False, ADV_TOKEN=False),
        "trl-seq+k3bias+rollout": dict(LOSS=0, RATIO=2, KL=3, KL_BIAS=True, ROLL=2,
                                       ROLL_MASK=True, HAS_ENT=True, HAS_THR=True, HAS_TW=False,
                                       ADV_TOKEN=False),
    }
    for T in _AOT_T:
        bt = block_t(T)
        for label, flags in configs.items():
            for fn in (_policy_loss_fwd_kernel, _policy_loss_bwd_kernel):
                signature = {}
                for arg in fn.arg_names:
                    if arg in base:
                        signature[arg] = base[arg]
                    elif arg.endswith("_ptr"):
                        signature[arg] = "*fp32"
                    elif arg.isupper():
                        signature[arg] = "constexpr"
                    else:
                        raise KeyError(f"no AOT type for {arg!r} of {fn.__name__}")
                constexprs = {k: v for k, v in flags.items() if k in fn.arg_names}
                constexprs["BLOCK_T"] = bt
                if fn is _policy_loss_bwd_kernel:
                    constexprs.update(KL_ST=False, HAS_GRAD_ENT=flags["HAS_ENT"])
                specs.append({
                    "name": f"fp32 T={T} {label} BLOCK_T={bt}",
                    "fn": fn,
                    "signature": signature,
                    "constexprs": constexprs,
                    "num_warps": _num_warps(bt),
                    "divisible_by_16": [a for a in signature if a.endswith("_ptr")],
                })
    return specs


AOT_SPECS: list[dict[str, Any]] = _aot_specs()
