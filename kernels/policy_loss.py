"""Triton kernels of the policy-loss family (ALGORITHMS.md §3): one pass forward, one backward.

They mirror ``csrc/include/rlkern/policy_loss.h`` token for token (the formulas, the
torch-style gradient conventions — clamp passes its gradient on the closed interval, max/min
split it on ties — and the per-row statistics layout). One program handles one sequence (row)
in BLOCK_T chunks:

* forward: [prefix loop: Σ m, Σ m·Δ, Σ m·(old − rollout) when a sequence quantity needs them]
  then one loop computing the per-token loss, KL and entropy terms and reducing them to the
  row's statistics ``row_stats[k, row]`` (float64, statistic-major);
* backward: given one coefficient per row for each differentiable statistic (``grad_rows``),
  ∂loss/∂logp (and ∂loss/∂entropy) per token; the sequence-ratio mode with the exact gradient
  of the mean (TRL's sequence level) makes a first loop for Σ_t m·∂ℓ/∂r.

Every code, index and slot comes from the header's layout tables, which the op layer hands to
the launchers as plain names (``rlkern._C.LAYOUTS["policy_loss"]``: table → entry names in
code order); the kernels receive them as one constexpr named tuple ``LAY``
(``LAY.row_stats.pg_sum``, ``LAY.loss_kinds.cispo``, ``LAY.hparams.clip_lo``, ...; a local alias
must be declared ``S: tl.constexpr = LAY.row_stats``, else compiled code loses its
constexpr-ness). The optional inputs travel as one tuple by slot (``LAY.inputs``), with a
constexpr tuple ``HAS`` saying which are given.

Structure is compile-time (the loss kind, ratio mode, KL estimator, which inputs are present:
a handful of constexpr flags); every float hyperparameter is read at run time from a small
``hparams`` tensor (DESIGN rule 7), in the compute dtype (fp32, or fp64 for fp64 inputs).
This module imports only triton. :func:`aot_specs` lists the default configurations for
ahead-of-time compilation (``rlkern aot-report``).
"""

from __future__ import annotations

import functools
from collections import namedtuple
from typing import Any

import triton
import triton.language as tl

from rlkern.kernels._common import aot_signature, aot_spec
from rlkern.kernels._policy_loss_token import _clampv, _hp, _in_closed, _one, _token_loss

__all__ = ["aot_specs", "block_t", "kl_penalty", "layout_tuple", "policy_loss_bwd",
           "policy_loss_fwd"]


# ---------------------------------------------------------------------------------------------
# Per-token formulas (policy_loss.h)


@triton.jit
def _s64(x):
    return tl.sum(x, axis=0).to(tl.float64)


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
def _kl_term(KIND: tl.constexpr, ST: tl.constexpr, lp, ref, log_clamp, value_clamp,
             KL_KINDS: tl.constexpr):
    """(value, ∂value/∂logp) of a KL estimator; ST: the gradient of k2 instead."""
    x = lp - ref
    if KIND == KL_KINDS.k1:
        value = x
        d = tl.full(x.shape, 1.0, x.dtype)
    elif KIND == KL_KINDS.k2:
        value = 0.5 * (x * x)
        d = x
    elif KIND == KL_KINDS.abs:
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
def _kl_at(KIND: tl.constexpr, ST: tl.constexpr, lp, ref, hp_ptr, LAY: tl.constexpr):
    """_kl_term with the call's clamps."""
    return _kl_term(KIND, ST, lp, ref, _hp(hp_ptr, LAY.hparams.kl_log_clamp),
                    _hp(hp_ptr, LAY.hparams.kl_value_clamp), LAY.kl_kinds)


@triton.jit
def _rollout_weight(d, log_clamp, wmin, wmax, MASK_MODE: tl.constexpr):
    d = tl.where(d != d, 0.0, d)  # a NaN (unscored) token: no correction
    w = tl.exp(_clampv(d, -log_clamp, log_clamp))
    if MASK_MODE:
        w = tl.where(_in_closed(w, wmin, wmax), w, 0.0)
    else:
        w = _clampv(w, wmin, wmax)
    return w


_VESPO_LOG_W_MIN = tl.constexpr(-18.420680743952367)  # log(1e-8), policy_loss.h kVespoLogWMin
_VESPO_LOG_W_MAX = tl.constexpr(20.0)
_VESPO_LOG_RATIO_CLAMP = tl.constexpr(20.0)


@triton.jit
def _vespo_phi(log_w, k, lam):
    """VESPO's gamma weight exp(λ + k·log w − λ·w), λ ≥ 1e-4, NaN / inf → 0 (float64)."""
    lam = tl.maximum(lam, 1e-4)
    phi = tl.exp(lam + k * log_w - lam * tl.exp(log_w))
    return tl.where((phi == phi) & (phi != float("inf")), phi, 0.0)


@triton.jit
def _vespo_phis(s, hp_ptr, LAY: tl.constexpr):
    """(log w, φ_pos, φ_neg) of a row from S (float64; policy_loss.h vespo_phis)."""
    H: tl.constexpr = LAY.hparams
    lw = _clampv(s, _VESPO_LOG_W_MIN, _VESPO_LOG_W_MAX)
    pos = _vespo_phi(lw, _hp(hp_ptr, H.vespo_k_pos).to(tl.float64),
                     _hp(hp_ptr, H.vespo_lambda_pos).to(tl.float64))
    neg = _vespo_phi(lw, _hp(hp_ptr, H.vespo_k_neg).to(tl.float64),
                     _hp(hp_ptr, H.vespo_lambda_neg).to(tl.float64))
    return lw, pos, neg


@triton.jit
def _vespo_log_rollout(d, log_clamp, wmin, wmax, MASK_MODE: tl.constexpr):
    """A token's rollout term of vespo's S: log of _rollout_weight, in log space, clamped to
    [log 1e-8, 20] (policy_loss.h vespo_log_rollout)."""
    d = tl.where(d != d, 0.0, d)
    x = _clampv(d, -log_clamp, log_clamp)
    w = tl.exp(x)
    ninf = float("-inf")
    if MASK_MODE:
        lw = tl.where(_in_closed(w, wmin, wmax), x, ninf)
    else:
        log_lo = tl.where(wmin > 0.0, tl.log(tl.maximum(wmin, 1e-30)), ninf)
        log_hi = tl.where(wmax > 0.0, tl.log(tl.maximum(wmax, 1e-30)), ninf)
        lw = tl.where(w < wmin, log_lo, tl.where(w > wmax, log_hi, x))
    return _clampv(lw, _VESPO_LOG_W_MIN, _VESPO_LOG_W_MAX)


# ---------------------------------------------------------------------------------------------
# Row and tile access, shared by the forward and the backward


@triton.jit
def _opt_row(opt, stride_opt, row, SLOT: tl.constexpr):
    """Row ``row`` of the optional input of slot SLOT."""
    return opt[SLOT] + row * stride_opt[SLOT]


@triton.jit
def _row_setup(lp_ptr, old_ptr, adv_ptr, mask_ptr, opt, stride_lp, stride_old, stride_adv,
               stride_mask, stride_opt, hp_ptr, LAY: tl.constexpr, HAS: tl.constexpr,
               ADV_TOKEN: tl.constexpr):
    """This program's row, its pointers, its advantage (per-response) and the row-independent
    scalars: (row, lp_row, old_row, adv_row, mask_row, ref_row, adv0, lo, hi, C, thr)."""
    row = tl.program_id(0).to(tl.int64)
    dt = lp_ptr.dtype.element_ty
    adv0 = tl.zeros((), dt)
    if ADV_TOKEN:
        adv_row = adv_ptr + row * stride_adv
    else:
        adv_row = adv_ptr + row
        adv0 = tl.load(adv_row)
    thr = tl.zeros((), dt)
    if HAS[LAY.inputs.entropy_threshold]:
        thr = tl.load(opt[LAY.inputs.entropy_threshold])
    return (row, lp_ptr + row * stride_lp, old_ptr + row * stride_old, adv_row,
            mask_ptr + row * stride_mask, _opt_row(opt, stride_opt, row, LAY.inputs.ref_logprobs),
            adv0, _hp(hp_ptr, LAY.hparams.clip_lo),
            _hp(hp_ptr, LAY.hparams.clip_hi), _hp(hp_ptr, LAY.hparams.log_ratio_clamp), thr)


@triton.jit
def _tile(t0, T, lp_row, old_row, adv_row, mask_row, adv0, ADV_TOKEN: tl.constexpr,
          BLOCK_T: tl.constexpr):
    """Tokens [t0, t0 + BLOCK_T) of the row: (offs, inb, v, logp, old, A), the values 0 at
    masked tokens (never read)."""
    offs = t0 + tl.arange(0, BLOCK_T)
    inb = offs < T
    v = (tl.load(mask_row + offs, mask=inb, other=0) != 0) & inb
    lp = tl.load(lp_row + offs, mask=v, other=0.0)
    old = tl.load(old_row + offs, mask=v, other=0.0)
    if ADV_TOKEN:
        a = tl.load(adv_row + offs, mask=v, other=0.0)
    else:
        a = tl.where(v, adv0, 0.0)
    return offs, inb, v, lp, old, a


@triton.jit
def _row_prefix(lp_row, old_row, roll_row, mask_row, T, BLOCK_T: tl.constexpr,
                WANT_ROLL: tl.constexpr):
    """Σ m, Σ m·(logp − old), Σ m·(old − rollout) of a row (float64)."""
    n = tl.zeros((), tl.float64)
    lps = tl.zeros((), tl.float64)
    rs = tl.zeros((), tl.float64)
    for t0 in range(0, T, BLOCK_T):
        offs, _inb, v, lp, old, _a = _tile(t0, T, lp_row, old_row, lp_row, mask_row, 0.0,
                                           False, BLOCK_T)
        n += tl.sum(tl.where(v, 1.0, 0.0).to(tl.float64), axis=0)
        lps += tl.sum(tl.where(v, lp - old, 0.0), axis=0).to(tl.float64)
        if WANT_ROLL:
            roll = tl.load(roll_row + offs, mask=v, other=0.0)
            d = old - roll
            rs += tl.sum(tl.where(v & (d == d), d, 0.0), axis=0).to(tl.float64)
    return n, lps, rs


@triton.jit
def _seq_quantities(n, lps, rs, hp_ptr, LAY: tl.constexpr, ROLL: tl.constexpr,
                    ROLL_MASK: tl.constexpr):
    """The row's sequence log-ratio, whether its clamp passes the gradient, its rollout weight
    (float64, as the C++ kernels compute them)."""
    H: tl.constexpr = LAY.hparams
    seq_max = _hp(hp_ptr, H.seq_log_ratio_max).to(tl.float64)
    mean = lps / tl.maximum(n, 1.0)
    passes = mean <= seq_max
    r_seq = tl.where(mean > seq_max, seq_max, mean)
    seq_w = tl.full((), 1.0, tl.float64)
    if ROLL == LAY.rollout_levels.sequence:
        seq_w = _rollout_weight(rs, _hp(hp_ptr, H.rollout_log_clamp).to(tl.float64),
                                _hp(hp_ptr, H.rollout_min).to(tl.float64),
                                _hp(hp_ptr, H.rollout_max).to(tl.float64), ROLL_MASK)
    return r_seq, passes, seq_w


@triton.jit
def _multiplier(old, opt, stride_opt, row, offs, v, thr, seq_w, hp_ptr, LAY: tl.constexpr,
                LOSS: tl.constexpr, ROLL: tl.constexpr, ROLL_MASK: tl.constexpr,
                HAS: tl.constexpr):
    """(rollout weight w, entropy mask em, entropy H, token weight, vespo's rollout term of S)
    of a block (0 at masked)."""
    S: tl.constexpr = LAY.inputs
    H: tl.constexpr = LAY.hparams
    one = tl.full(old.shape, 1.0, old.dtype)
    w = one
    vlw = tl.zeros_like(old)
    if ROLL == LAY.rollout_levels.token:
        roll = tl.load(_opt_row(opt, stride_opt, row, S.rollout_logprobs) + offs, mask=v,
                       other=0.0)
        d = tl.where(v, old - roll, 0.0)
        w = _rollout_weight(d, _hp(hp_ptr, H.rollout_log_clamp), _hp(hp_ptr, H.rollout_min),
                            _hp(hp_ptr, H.rollout_max), ROLL_MASK)
        if LOSS == LAY.loss_kinds.vespo:
            vlw = _vespo_log_rollout(d, _hp(hp_ptr, H.rollout_log_clamp),
                                     _hp(hp_ptr, H.rollout_min), _hp(hp_ptr, H.rollout_max),
                                     ROLL_MASK)
    if ROLL == LAY.rollout_levels.sequence:
        w = one * seq_w.to(old.dtype)
    h = tl.zeros_like(old)
    em = one
    if HAS[S.entropy]:
        h = tl.load(_opt_row(opt, stride_opt, row, S.entropy) + offs, mask=v, other=0.0)
        if HAS[S.entropy_threshold]:
            em = tl.where(h >= thr, 1.0, 0.0).to(old.dtype)
    wt = one
    if HAS[S.token_weights]:
        wt = tl.load(_opt_row(opt, stride_opt, row, S.token_weights) + offs, mask=v, other=0.0)
    return w, em, h, wt, vlw


@triton.jit
def _cov_at(opt, stride_opt, row, offs, v, like, LOSS: tl.constexpr, LAY: tl.constexpr):
    """The block's cov_select values (clip_cov / kl_cov; 0 for the other kinds, at masked)."""
    K: tl.constexpr = LAY.loss_kinds
    if (LOSS == K.clip_cov) or (LOSS == K.kl_cov):
        cov = tl.load(_opt_row(opt, stride_opt, row, LAY.inputs.cov_select) + offs, mask=v,
                      other=0.0)
    else:
        cov = tl.zeros_like(like)
    return cov


# ---------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _policy_loss_fwd_kernel(
    lp_ptr, old_ptr, adv_ptr, mask_ptr,  # (B, T) compute dtype (adv: (B,) or (B, T)), mask bool
    opt, stride_opt,  # the optional inputs by slot of LAY.inputs (placeholders when absent)
    hp_ptr,  # hyperparameters (LAY.hparams), compute dtype
    stats_ptr,  # (len(LAY.row_stats), B) float64 output
    B, T, stride_lp, stride_old, stride_adv, stride_mask,
    LAY: tl.constexpr, LOSS: tl.constexpr, RATIO: tl.constexpr, KL: tl.constexpr,
    KL_BIAS: tl.constexpr, ROLL: tl.constexpr, ROLL_MASK: tl.constexpr, HAS: tl.constexpr,
    ADV_TOKEN: tl.constexpr, BLOCK_T: tl.constexpr,
):
    S: tl.constexpr = LAY.row_stats
    row, lp_row, old_row, adv_row, mask_row, ref_row, adv0, lo, hi, C, thr = _row_setup(
        lp_ptr, old_ptr, adv_ptr, mask_ptr, opt, stride_lp, stride_old, stride_adv, stride_mask,
        stride_opt, hp_ptr, LAY, HAS, ADV_TOKEN)
    dt = lp_ptr.dtype.element_ty
    roll_row = _opt_row(opt, stride_opt, row, LAY.inputs.rollout_logprobs)
    n, lps, rs = _row_prefix(lp_row, old_row, roll_row, mask_row, T, BLOCK_T,
                             ROLL == LAY.rollout_levels.sequence)
    r_seq, _passes, seq_w = _seq_quantities(n, lps, rs, hp_ptr, LAY, ROLL, ROLL_MASK)
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
    acc_pgn = zero  # vespo: the A < 0 part of the policy term (acc_pg: the A ≥ 0 part)
    acc_npos = zero
    acc_vs = zero  # vespo: S
    acc_logw = tl.zeros((BLOCK_T,), tl.float64)
    rmin = tl.full((BLOCK_T,), float("inf"), dt)
    rmax = tl.full((BLOCK_T,), float("-inf"), dt)
    for t0 in range(0, T, BLOCK_T):
        offs, _inb, v, lp, old, a = _tile(t0, T, lp_row, old_row, adv_row, mask_row, adv0,
                                          ADV_TOKEN, BLOCK_T)
        d = lp - old
        dc = _clampv(d, -C, C)
        w, em, h, wt, vlw = _multiplier(old, opt, stride_opt, row, offs, v, thr, seq_w, hp_ptr,
                                        LAY, LOSS, ROLL, ROLL_MASK, HAS)
        if LOSS == LAY.loss_kinds.vespo:  # the rollout weight is folded into S instead
            mult = tl.where(v, em * wt, 0.0)
        else:
            mult = tl.where(v, w * em * wt, 0.0)
        if LOSS == LAY.loss_kinds.gmpo:
            gdc, _gd, gclip = _gmpo_clip(d, a, lo, hi)
            acc_dc += gdc
            acc_clip += tl.where(v, gclip, 0.0)
            acc_clo += tl.where(v & (a < 0.0), gclip, 0.0)
            acc_chi += tl.where(v & (a > 0.0), gclip, 0.0)
            if ROLL != LAY.rollout_levels.none:
                acc_logw += tl.where(v, tl.log(w.to(tl.float64) + 1e-10), 0.0)
            rho = zero + 1.0  # the KL bias correction does not apply to gmpo
        else:
            if RATIO == LAY.ratio_modes.token:
                rho = tl.exp(dc)
            else:
                rho = zero + tl.exp(r_seq_t)
            loss, _dr, _dl, clipped, clo, chi, dual = _token_loss(LOSS, rho, a, lp, old,
                        _cov_at(opt, stride_opt, row, offs, v, lp, LOSS, LAY), lo, hi,
                                                                  hp_ptr, LAY)
            if LOSS == LAY.loss_kinds.vespo:  # split by the sign of A (NaN: A < 0)
                val = tl.where(v, mult * loss, 0.0)
                pos = a >= 0.0
                acc_pg += tl.where(pos, val, 0.0)
                acc_pgn += tl.where(pos, 0.0, val)
                acc_npos += tl.where(v & pos, 1.0, 0.0)
                acc_vs += tl.where(v, _clampv(d, -_VESPO_LOG_RATIO_CLAMP, _VESPO_LOG_RATIO_CLAMP)
                                   + vlw, 0.0)
            else:
                acc_pg += tl.where(v, mult * loss, 0.0)
            acc_clip += tl.where(v, clipped, 0.0)
            acc_clo += tl.where(v, clo, 0.0)
            acc_chi += tl.where(v, chi, 0.0)
            acc_dual += tl.where(v, dual, 0.0)
            acc_rs += tl.where(v, rho, 0.0)
            rmin = tl.minimum(rmin, tl.where(v, rho, float("inf")))
            rmax = tl.maximum(rmax, tl.where(v, rho, float("-inf")))
        if KL != LAY.kl_kinds.none:
            ref = tl.load(ref_row + offs, mask=v, other=0.0)
            kv, _kd = _kl_at(KL, False, lp, ref, hp_ptr, LAY)
            if KL_BIAS:
                kv = kv * rho
            acc_kl += tl.where(v, kv, 0.0)
            acc_check += ref
        if HAS[LAY.inputs.entropy]:
            acc_ent += tl.where(v, em * h, 0.0)
            acc_ent_n += tl.where(v, em, 0.0)
            acc_ent_valid += h
        if HAS[LAY.inputs.token_weights]:
            acc_check += wt
        acc_w += tl.where(v, w, 0.0)
        acc_nlr -= dc
        acc_adv += a

    pg = _s64(acc_pg)
    if RATIO != LAY.ratio_modes.token:
        seq_r_out = r_seq
    else:
        seq_r_out = tl.zeros((), tl.float64)
    seq_w_out = seq_w
    ratio_sum = _s64(acc_rs)
    ratio_min = tl.min(rmin, axis=0).to(tl.float64)
    ratio_max = tl.max(rmax, axis=0).to(tl.float64)
    adv_sum = _s64(acc_adv)
    if LOSS == LAY.loss_kinds.gmpo:
        len1 = tl.maximum(n, 1.0)
        seq_r_out = _s64(acc_dc) / len1
        rho_i = tl.exp(seq_r_out)
        if ROLL != LAY.rollout_levels.none:
            seq_w_out = tl.exp(tl.sum(acc_logw, axis=0) / len1)
        else:
            seq_w_out = tl.full((), 1.0, tl.float64)
        pg = -(adv_sum / len1) * rho_i * seq_w_out
        ratio_sum = n * rho_i
        ratio_min = tl.where(n > 0, rho_i, float("inf"))
        ratio_max = tl.where(n > 0, rho_i, float("-inf"))
    phi_sum = tl.zeros((), tl.float64)
    if LOSS == LAY.loss_kinds.vespo:
        seq_r_out, phi_pos, phi_neg = _vespo_phis(_s64(acc_vs), hp_ptr, LAY)
        n_pos = _s64(acc_npos)
        pg = phi_pos * pg + phi_neg * _s64(acc_pgn)
        phi_sum = phi_pos * n_pos + phi_neg * (n - n_pos)
    out = stats_ptr + row
    tl.store(out + S.len * B, n)
    tl.store(out + S.pg_sum * B, pg)
    tl.store(out + S.kl_sum * B, _s64(acc_kl))
    tl.store(out + S.ent_sum * B, _s64(acc_ent))
    tl.store(out + S.lp_sum * B, lps)
    tl.store(out + S.ent_count * B, _s64(acc_ent_n))
    tl.store(out + S.seq_log_ratio * B, seq_r_out)
    tl.store(out + S.seq_weight * B, seq_w_out)
    tl.store(out + S.adv_sum * B, adv_sum)
    tl.store(out + S.clip * B, _s64(acc_clip))
    tl.store(out + S.clip_low * B, _s64(acc_clo))
    tl.store(out + S.clip_high * B, _s64(acc_chi))
    tl.store(out + S.dual_clip * B, _s64(acc_dual))
    tl.store(out + S.neg_log_ratio * B, _s64(acc_nlr))
    tl.store(out + S.ratio_sum * B, ratio_sum)
    tl.store(out + S.ratio_min * B, ratio_min)
    tl.store(out + S.ratio_max * B, ratio_max)
    tl.store(out + S.entropy_valid * B, _s64(acc_ent_valid))
    if ROLL != LAY.rollout_levels.none:
        tl.store(out + S.rollout_w_sum * B, _s64(acc_w))
    else:
        tl.store(out + S.rollout_w_sum * B, tl.zeros((), tl.float64))
    # NaN policy: a non-finite input at a valid token makes the row's input sums non-finite.
    check = _s64(acc_check) + _s64(acc_ent_valid) + adv_sum + lps
    tl.store(out + S.non_finite * B, tl.where(check - check == 0.0, 0.0, 1.0).to(tl.float64))
    tl.store(out + S.phi_sum * B, phi_sum)


# ---------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _policy_loss_bwd_kernel(
    lp_ptr, old_ptr, adv_ptr, mask_ptr, opt, stride_opt, hp_ptr,
    stats_ptr,  # (len(LAY.row_stats), B) float64: the forward's row statistics
    grad_rows_ptr,  # (len(LAY.row_grads), B) float64: ∂loss/∂(differentiable statistic) per row
    grad_lp_ptr,  # (B, T) contiguous, compute dtype
    grad_ent_ptr,  # (B, T) contiguous (written when HAS_GRAD_ENT)
    B, T, stride_lp, stride_old, stride_adv, stride_mask,
    LAY: tl.constexpr, LOSS: tl.constexpr, RATIO: tl.constexpr, KL: tl.constexpr,
    KL_ST: tl.constexpr, KL_BIAS: tl.constexpr, ROLL: tl.constexpr, ROLL_MASK: tl.constexpr,
    HAS: tl.constexpr, ADV_TOKEN: tl.constexpr, HAS_GRAD_ENT: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    S: tl.constexpr = LAY.row_stats
    G_: tl.constexpr = LAY.row_grads
    R: tl.constexpr = LAY.ratio_modes
    row, lp_row, old_row, adv_row, mask_row, ref_row, adv0, lo, hi, C, thr = _row_setup(
        lp_ptr, old_ptr, adv_ptr, mask_ptr, opt, stride_lp, stride_old, stride_adv, stride_mask,
        stride_opt, hp_ptr, LAY, HAS, ADV_TOKEN)
    dt = lp_ptr.dtype.element_ty
    g_pg = tl.load(grad_rows_ptr + G_.pg_sum * B + row).to(dt)
    g_kl = tl.load(grad_rows_ptr + G_.kl_sum * B + row).to(dt)
    g_ent = tl.load(grad_rows_ptr + G_.ent_sum * B + row).to(dt)
    g_lp = tl.load(grad_rows_ptr + G_.lp_sum * B + row).to(dt)
    n = tl.load(stats_ptr + S.len * B + row)
    lps = tl.load(stats_ptr + S.lp_sum * B + row)
    r_seq, passes, _w = _seq_quantities(n, lps, n * 0.0, hp_ptr, LAY,
                                        LAY.rollout_levels.none, ROLL_MASK)
    seq_w = tl.load(stats_ptr + S.seq_weight * B + row)  # the forward's sequence rollout weight
    r_seq_t = r_seq.to(dt)
    pass_seq = tl.where(passes, 1.0, 0.0).to(dt)
    len1 = tl.maximum(n, 1.0)
    gmpo_coef = (g_pg.to(tl.float64) * tl.load(stats_ptr + S.pg_sum * B + row) / len1).to(dt)
    grad_lp_row = grad_lp_ptr + row * T
    grad_ent_row = grad_ent_ptr + row * T
    phi_pos = tl.zeros((), dt)
    phi_neg = tl.zeros((), dt)
    if LOSS == LAY.loss_kinds.vespo:  # φ from the forward's log w (clamped again: a no-op)
        _lw, pp, pn = _vespo_phis(tl.load(stats_ptr + S.seq_log_ratio * B + row), hp_ptr, LAY)
        phi_pos = pp.to(dt)
        phi_neg = pn.to(dt)

    # Ratio part of the sequence mean's exact gradient: G = Σ_t m·∂(loss terms)/∂r.
    G = tl.zeros((), dt)
    if RATIO == R.seq_full:
        accG = tl.zeros((BLOCK_T,), dt)
        for t0 in range(0, T, BLOCK_T):
            offs, _inb, v, lp, old, a = _tile(t0, T, lp_row, old_row, adv_row, mask_row, adv0,
                                              ADV_TOKEN, BLOCK_T)
            rho = tl.zeros((BLOCK_T,), dt) + tl.exp(r_seq_t)
            w, em, _h, wt, _vlw = _multiplier(old, opt, stride_opt, row, offs, v, thr, seq_w,
                                              hp_ptr, LAY, LOSS, ROLL, ROLL_MASK, HAS)
            _l, d_r, _dl, _c, _clo, _chi, _du = _token_loss(LOSS, rho, a, lp, old,
                        _cov_at(opt, stride_opt, row, offs, v, lp, LOSS, LAY), lo, hi, hp_ptr,
                                                            LAY)
            gr = g_pg * (w * em * wt) * d_r
            if KL != LAY.kl_kinds.none:
                if KL_BIAS:
                    ref = tl.load(ref_row + offs, mask=v, other=0.0)
                    kv, _kd = _kl_at(KL, KL_ST, lp, ref, hp_ptr, LAY)
                    gr += g_kl * kv * rho
            accG += tl.where(v, gr, 0.0)
        G = tl.sum(accG, axis=0) / len1.to(dt) * pass_seq

    for t0 in range(0, T, BLOCK_T):
        offs, inb, v, lp, old, a = _tile(t0, T, lp_row, old_row, adv_row, mask_row, adv0,
                                         ADV_TOKEN, BLOCK_T)
        d = lp - old
        w, em, _h, wt, _vlw = _multiplier(old, opt, stride_opt, row, offs, v, thr, seq_w,
                                          hp_ptr, LAY, LOSS, ROLL, ROLL_MASK, HAS)
        if LOSS == LAY.loss_kinds.gmpo:
            _gdc, gd, _gc = _gmpo_clip(d, a, lo, hi)
            g = gmpo_coef * gd
            rho = tl.zeros((BLOCK_T,), dt) + 1.0
            pass_r = tl.zeros((BLOCK_T,), dt)
        else:
            if RATIO == R.token:
                rho = tl.exp(_clampv(d, -C, C))
                pass_r = tl.where(_in_closed(d, -C, C), 1.0, 0.0).to(dt)
            else:
                rho = tl.zeros((BLOCK_T,), dt) + tl.exp(r_seq_t)
                pass_r = tl.zeros((BLOCK_T,), dt) + pass_seq
            _l, d_r, d_lp, _c, _clo, _chi, _du = _token_loss(LOSS, rho, a, lp, old,
                        _cov_at(opt, stride_opt, row, offs, v, lp, LOSS, LAY), lo, hi, hp_ptr,
                                                             LAY)
            if LOSS == LAY.loss_kinds.vespo:  # −sg[φ]·A·logp: φ of A's sign, no rollout factor
                wgt = g_pg * (em * wt) * tl.where(a >= 0.0, phi_pos, phi_neg)
            else:
                wgt = g_pg * (w * em * wt)
            g = wgt * d_lp
            if RATIO != R.seq_full:
                g += wgt * d_r * pass_r
        if KL != LAY.kl_kinds.none:
            ref = tl.load(ref_row + offs, mask=v, other=0.0)
            kv, kd = _kl_at(KL, KL_ST, lp, ref, hp_ptr, LAY)
            if KL_BIAS:
                g += g_kl * kd * rho
                if RATIO != R.seq_full:
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
def _kl_penalty_kernel(lp_ptr, ref_ptr, grad_ptr, out_ptr, n, clamps_ptr,
                       KIND: tl.constexpr, ST: tl.constexpr, HAS_GRAD: tl.constexpr,
                       KL_KINDS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    lp = tl.load(lp_ptr + offs, mask=inb, other=0.0)
    ref = tl.load(ref_ptr + offs, mask=inb, other=0.0)
    value, d = _kl_term(KIND, ST, lp, ref, tl.load(clamps_ptr), tl.load(clamps_ptr + 1),
                        KL_KINDS)
    if HAS_GRAD:
        out = tl.load(grad_ptr + offs, mask=inb, other=0.0) * d
    else:
        out = value
    tl.store(out_ptr + offs, out, mask=inb)


# ---------------------------------------------------------------------------------------------
# Launchers (tensors in, nothing returned; the op layer allocates and validates)


@functools.cache
def _layout_tuple(tables: tuple[tuple[str, tuple[str, ...]], ...]) -> Any:
    fields = {name: namedtuple(name, names)(*range(len(names))) for name, names in tables}
    return namedtuple("policy_loss", list(fields))(**fields)


def layout_tuple(tables: dict[str, list[str]]) -> Any:
    """The kernels' ``LAY``: {table: entry names in code order} (``rlkern._C.LAYOUTS
    ["policy_loss"]``) as a named tuple of named tuples, ``LAY.row_stats.pg_sum`` = the index
    of row ``pg_sum``."""
    return _layout_tuple(tuple((name, tuple(names)) for name, names in tables.items()))


def block_t(T: int) -> int:
    """Tokens per loop iteration: the row length rounded up to a power of two, in [16, 256].
    The forward keeps ~17 per-lane accumulators; 256 tokens over 4 warps is 2 tokens per
    thread, which keeps every configuration far from register spills."""
    return max(16, min(256, triton.next_power_of_2(max(T, 1))))


def _num_warps(bt: int) -> int:
    return 4 if bt >= 256 else (2 if bt >= 64 else 1)


def _common(lp, old, adv, mask, inputs, flags, LAY):
    """Kernel arguments shared by the forward and the backward: tensors, strides, constexprs
    (and the KL straight-through flag, which only the backward takes)."""
    F = LAY.flags
    opt = tuple(lp if t is None else t for t in inputs)  # placeholders are never read
    stride_opt = tuple(0 if t is None or t.dim() < 2 else t.stride(0) for t in inputs)
    args = (lp, old, adv, mask, opt, stride_opt)
    strides = (lp.stride(0), old.stride(0), adv.stride(0) if adv.dim() == 2 else 0,
               mask.stride(0))
    meta = dict(LAY=LAY, LOSS=flags[F.loss_kind], RATIO=flags[F.ratio_mode],
                KL=flags[F.kl_kind], KL_BIAS=bool(flags[F.kl_bias_correction]),
                ROLL=flags[F.rollout_level], ROLL_MASK=bool(flags[F.rollout_mask]),
                HAS=tuple(t is not None for t in inputs), ADV_TOKEN=adv.dim() == 2)
    return args, strides, meta, bool(flags[F.kl_straight_through])


def policy_loss_fwd(lp, old, adv, mask, inputs, flags, hparams, row_stats, tables):
    """Fill ``row_stats`` ``(len(row_stats), B)`` float64. ``inputs``: the optional inputs by
    slot (None: absent); ``hparams``: a tensor of the compute dtype on the inputs' device;
    ``tables``: the layout (:func:`layout_tuple`); the rest as ``rlkern::policy_loss_fwd_out``."""
    B, T = mask.shape
    if B == 0:
        return
    LAY = layout_tuple(tables)
    args, strides, meta, _ = _common(lp, old, adv, mask, inputs, flags, LAY)
    bt = block_t(T)
    _policy_loss_fwd_kernel[(B,)](*args, hparams, row_stats, B, T, *strides, **meta,
                                  BLOCK_T=bt, num_warps=_num_warps(bt))


def policy_loss_bwd(lp, old, adv, mask, inputs, row_stats, grad_rows, flags, hparams, grad_lp,
                    grad_ent, tables):
    """Fill ``grad_lp`` (and ``grad_ent`` when given), both ``(B, T)`` contiguous."""
    B, T = mask.shape
    if B == 0 or T == 0:
        return
    LAY = layout_tuple(tables)
    args, strides, meta, kl_st = _common(lp, old, adv, mask, inputs, flags, LAY)
    bt = block_t(T)
    _policy_loss_bwd_kernel[(B,)](
        *args, hparams, row_stats, grad_rows, grad_lp,
        grad_lp if grad_ent is None else grad_ent, B, T, *strides, **meta, KL_ST=kl_st,
        HAS_GRAD_ENT=grad_ent is not None, BLOCK_T=bt, num_warps=_num_warps(bt))


def kl_penalty(lp, ref, grad, out, clamps, *, kind: int, straight_through: bool,
               tables: dict[str, list[str]]) -> None:
    """``out = kl(lp, ref)`` or ``grad · ∂kl/∂lp`` (contiguous tensors of n elements);
    ``clamps``: a 2-element tensor (log clamp, value clamp) of the compute dtype; ``kind`` a
    code of the layout's kl_kinds."""
    n = lp.numel()
    if n == 0:
        return
    block = 1024
    _kl_penalty_kernel[(triton.cdiv(n, block),)](
        lp, ref, lp if grad is None else grad, out, n, clamps, KIND=kind,
        ST=bool(straight_through), HAS_GRAD=grad is not None,
        KL_KINDS=layout_tuple(tables).kl_kinds, BLOCK=block, num_warps=4)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation specs (rlkern aot-report; tests/test_aot.py)

_AOT_T = (64, 1024)


def aot_specs(layouts: dict[str, dict[str, list[str]]]) -> list[dict[str, Any]]:
    """The common configurations: PPO / GSPO / TRL-sequence with and without KL and entropy,
    fp32, at T = 64 and 1024 (two block sizes), forward and backward. ``layouts``:
    ``rlkern._C.LAYOUTS`` (this module's codes come from there)."""
    LAY = layout_tuple(layouts["policy_loss"])
    K, R, KL, RL, S = LAY.loss_kinds, LAY.ratio_modes, LAY.kl_kinds, LAY.rollout_levels, LAY.inputs
    n_in = len(S)
    has = lambda *slots: tuple(i in slots for i in range(n_in))
    base = {"B": "i32", "T": "i32", "mask_ptr": "*i1", "hp_ptr": "*fp32",
            "stats_ptr": "*fp64", "grad_rows_ptr": "*fp64",
            "opt": ("*fp32",) * n_in, "stride_opt": ("i32",) * n_in}
    for name in ("stride_lp", "stride_old", "stride_adv", "stride_mask"):
        base[name] = "i64"
    plain = dict(KL=KL.none, KL_BIAS=False, ROLL=RL.none, ROLL_MASK=False, ADV_TOKEN=False)
    configs = {
        "ppo": dict(plain, LOSS=K.ppo, RATIO=R.token, HAS=has()),
        "ppo+k3+entropy": dict(plain, LOSS=K.ppo, RATIO=R.token, KL=KL.k3,
                               HAS=has(S.ref_logprobs, S.entropy)),
        "gspo": dict(plain, LOSS=K.ppo, RATIO=R.seq_detached, HAS=has()),
        "trl-seq+k3bias+rollout": dict(
            plain, LOSS=K.ppo, RATIO=R.seq_full, KL=KL.k3, KL_BIAS=True, ROLL=RL.sequence,
            ROLL_MASK=True, HAS=has(S.ref_logprobs, S.rollout_logprobs, S.entropy,
                                    S.entropy_threshold)),
    }
    specs: list[dict[str, Any]] = []
    for T in _AOT_T:
        bt = block_t(T)
        for label, flags in configs.items():
            for fn in (_policy_loss_fwd_kernel, _policy_loss_bwd_kernel):
                signature = aot_signature(fn, base, _fp32_pointer)
                constexprs = {k: v for k, v in flags.items() if k in fn.arg_names}
                constexprs.update(LAY=LAY, BLOCK_T=bt)
                if fn is _policy_loss_bwd_kernel:
                    constexprs.update(KL_ST=False, HAS_GRAD_ENT=flags["HAS"][S.entropy])
                specs.append(aot_spec(f"fp32 T={T} {label} BLOCK_T={bt}", fn, signature,
                                      constexprs, _num_warps(bt),
                                      [a for a in signature if a.endswith("_ptr")]))
    return specs


def _fp32_pointer(name: str) -> str:
    """The AOT type of an argument not listed: the kernels' other pointers are fp32."""
    if not name.endswith("_ptr"):
        raise KeyError(f"no AOT type for argument {name!r}")
    return "*fp32"
