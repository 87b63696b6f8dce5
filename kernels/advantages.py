"""Triton kernels for group advantages and the §2.1 helpers (ALGORITHMS.md §2, §2.1).

Group advantages run as two segmented passes over rows sorted by group (the caller sorts once:
``perm`` lists the rows group after group, in row order within a group, and ``offsets[g]`` is
where group ``g`` starts; contiguous groups need neither):

1. ``_segment_stats_kernel`` — one program per group: the moments ``(n, mean, M2, min, max)``
   of its valid scores by two passes in float64 (mean, then Σ (x − mean)²; a group whose values
   are all equal gets mean = that value and M2 = 0 exactly), and the estimator's extras: the
   length-weighted sums (opo, reinforce_pp_baseline), the mean log-likelihood (xrpo), the top
   two scores and the top row (grpo_passk). For ``unlikely`` the rows of a group come sorted by
   (log-likelihood, row), so a valid row's rank is the number of valid rows before it, and the
   kernel shapes ``r' = s (1 − λ rank / n)`` on the fly.
2. ``_rows_finish_kernel`` — one program per block of rows: the per-row formula of
   ``csrc/include/rlkern/group_stats.h`` (``group_affine``), reading the row's group summary.

Batch-level constants (σ_batch, GPG's α, REINFORCE++'s whitening) are reduced by the caller from
the K group summaries and arrive as a small float64 ``params`` tensor, read by pointer (no host
synchronisation, no fp32 rounding of the constants).

The helpers: ``_discounted_returns_kernel`` (one program per row, a reverse linear-recurrence
scan with ``tl.associative_scan``), ``_position_sums_kernel`` (per group × block of positions:
the IGPO baseline or the GTPO weights), ``_empg_kernel`` (one program: two reductions and the
modulation). GiGPO reuses the two group kernels twice (prompt groups, then step groups).

This module imports only triton; the launchers take tensors (anything Triton accepts as a
pointer). ``AOT_SPECS`` lists configurations for ahead-of-time compilation (``rlkern aot-report``).
"""

from __future__ import annotations

import struct
from typing import Any

import triton
import triton.language as tl

__all__ = ["AOT_SPECS", "EST_CODES", "PARAM_FIELDS", "STD_CODES", "discounted_returns",
           "empg_modulate", "position_sums", "rows_finish", "segment_stats"]

#: Estimator codes (rlkern/group_stats.h: enum Estimator) and std modes (enum StdMode).
EST_CODES = {"grpo": 0, "dr_grpo": 1, "rloo": 2, "reinforce_pp_baseline": 3, "opo": 4, "gpg": 5,
             "grpo_passk": 6, "ngrpo": 7, "unlikely": 8, "xrpo": 9}
STD_CODES = {"unbiased": 0, "biased": 1, "none": 2}
#: Layout of the float64 ``params`` tensor read by ``_rows_finish_kernel``.
PARAM_FIELDS = ("eps", "r_max", "lam", "kappa", "batch_std", "gpg_alpha", "white_mean",
                "white_rstd")
#: Columns of the moments (K, 5) and extras (K, 7) tables.
N_MOMENTS, N_EXTRAS = 5, 7

_BLOCK_ROWS = 512  # rows per program in the row pass (4 per thread: no spills in fp64)
_BLOCK_GROUP = 32  # rows of a group per iteration of the segment pass (groups are small)


# ---------------------------------------------------------------------------------------------
# Group statistics


@triton.jit
def _load_rows(scores_ptr, perm_ptr, start, j, count, BLOCK: tl.constexpr,
               CONTIGUOUS: tl.constexpr):
    """Rows j..j+BLOCK of a group: (row index, value in float64, in-range, valid)."""
    k = j + tl.arange(0, BLOCK)
    in_range = k < count
    if CONTIGUOUS:
        rows = start + k
    else:
        rows = tl.load(perm_ptr + start + k, mask=in_range, other=0)
    x = tl.load(scores_ptr + rows, mask=in_range, other=0.0).to(tl.float64)
    valid = in_range & ((x - x) == 0.0)  # NaN and ±inf are not scores
    return rows, x, in_range, valid


@triton.jit
def _segment_stats_kernel(
    scores_ptr,  # (N,) fp32 / fp64
    perm_ptr,  # (N,) int64: rows group after group (unused when CONTIGUOUS)
    offsets_ptr,  # (K + 1,) int64 (unused when CONTIGUOUS)
    weights_ptr,  # (N,) fp64, read when WEIGHTED (absent: 1)
    loglik_ptr,  # (N,) fp64, read when LOGLIK or UNLIKELY
    ms_ptr,  # (K, 5) fp64 out: moments of the scores
    mx_ptr,  # (K, 5) fp64 out when UNLIKELY: moments of r'
    ext_ptr,  # (K, 7) fp64 out when any extra
    xr_ptr,  # (N,) fp64 out when UNLIKELY: r' per row
    params_ptr,  # (8,) fp64: PARAM_FIELDS (λ for unlikely)
    group_size,
    BLOCK: tl.constexpr,
    CONTIGUOUS: tl.constexpr,
    UNLIKELY: tl.constexpr,
    WEIGHTED: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    LOGLIK: tl.constexpr,
    TOP: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    if CONTIGUOUS:
        start = g * group_size
        count = group_size
    else:
        start = tl.load(offsets_ptr + g)
        count = tl.load(offsets_ptr + g + 1) - start
    inf = float("inf")
    # Pass 1: count, sum, min, max of the valid scores.
    n = tl.zeros((), tl.float64)
    total = tl.zeros((), tl.float64)
    lo = tl.full((), inf, tl.float64)
    hi = tl.full((), -inf, tl.float64)
    for j in range(0, count, BLOCK):
        rows, x, in_range, valid = _load_rows(scores_ptr, perm_ptr, start, j, count, BLOCK,
                                              CONTIGUOUS)
        n += tl.sum(valid.to(tl.float64), axis=0)
        total += tl.sum(tl.where(valid, x, 0.0), axis=0)
        lo = tl.minimum(lo, tl.min(tl.where(valid, x, inf), axis=0))
        hi = tl.maximum(hi, tl.max(tl.where(valid, x, -inf), axis=0))
    mean = total / n  # NaN for an empty group
    # Pass 2: M2 about the mean (two-pass: no cancellation).
    m2 = tl.zeros((), tl.float64)
    for j in range(0, count, BLOCK):
        rows, x, in_range, valid = _load_rows(scores_ptr, perm_ptr, start, j, count, BLOCK,
                                              CONTIGUOUS)
        d = tl.where(valid, x - mean, 0.0)
        m2 += tl.sum(d * d, axis=0)
    equal = lo == hi
    mean = tl.where(equal, lo, mean)
    m2 = tl.where(equal, 0.0, m2)
    tl.store(ms_ptr + g * 5 + 0, n)
    tl.store(ms_ptr + g * 5 + 1, mean)
    tl.store(ms_ptr + g * 5 + 2, m2)
    tl.store(ms_ptr + g * 5 + 3, lo)
    tl.store(ms_ptr + g * 5 + 4, hi)

    xmean = mean
    if UNLIKELY:
        # Rows arrive sorted by (log-likelihood, row): rank = valid rows before this one.
        lam = tl.load(params_ptr + 2)
        total = tl.zeros((), tl.float64)
        lo = tl.full((), inf, tl.float64)
        hi = tl.full((), -inf, tl.float64)
        before = tl.zeros((), tl.float64)
        for j in range(0, count, BLOCK):
            rows, x, in_range, valid = _load_rows(scores_ptr, perm_ptr, start, j, count, BLOCK,
                                                  CONTIGUOUS)
            v = valid.to(tl.float64)
            rank = before + tl.cumsum(v, axis=0) - v
            xr = x * (1.0 - lam * (rank / n))
            tl.store(xr_ptr + rows, tl.where(valid, xr, x), mask=in_range)
            total += tl.sum(tl.where(valid, xr, 0.0), axis=0)
            lo = tl.minimum(lo, tl.min(tl.where(valid, xr, inf), axis=0))
            hi = tl.maximum(hi, tl.max(tl.where(valid, xr, -inf), axis=0))
            before += tl.sum(v, axis=0)
        xmean = total / n
        m2 = tl.zeros((), tl.float64)
        before = tl.zeros((), tl.float64)
        for j in range(0, count, BLOCK):  # recomputed, not re-read: no store-to-load hazard
            rows, x, in_range, valid = _load_rows(scores_ptr, perm_ptr, start, j, count, BLOCK,
                                                  CONTIGUOUS)
            v = valid.to(tl.float64)
            rank = before + tl.cumsum(v, axis=0) - v
            d = tl.where(valid, x * (1.0 - lam * (rank / n)) - xmean, 0.0)
            m2 += tl.sum(d * d, axis=0)
            before += tl.sum(v, axis=0)
        equal = lo == hi
        xmean = tl.where(equal, lo, xmean)
        m2 = tl.where(equal, 0.0, m2)
        tl.store(mx_ptr + g * 5 + 0, n)
        tl.store(mx_ptr + g * 5 + 1, xmean)
        tl.store(mx_ptr + g * 5 + 2, m2)
        tl.store(mx_ptr + g * 5 + 3, lo)
        tl.store(mx_ptr + g * 5 + 4, hi)

    if WEIGHTED or LOGLIK or TOP:
        wsum = tl.zeros((), tl.float64)
        wdev = tl.zeros((), tl.float64)
        wdev2 = tl.zeros((), tl.float64)
        aux = tl.zeros((), tl.float64)
        top1 = tl.full((), -inf, tl.float64)
        top2 = tl.full((), -inf, tl.float64)
        top_row = tl.full((), -1, tl.int64)
        for j in range(0, count, BLOCK):
            rows, x, in_range, valid = _load_rows(scores_ptr, perm_ptr, start, j, count, BLOCK,
                                                  CONTIGUOUS)
            if UNLIKELY:  # the extras are of r' (unlikely has none today; kept general)
                x = tl.load(xr_ptr + rows, mask=in_range, other=0.0)
            if WEIGHTED:
                if HAS_WEIGHTS:
                    w = tl.load(weights_ptr + rows, mask=valid, other=0.0)
                else:
                    w = valid.to(tl.float64)
                d = tl.where(valid, x - xmean, 0.0)
                wsum += tl.sum(w, axis=0)
                wdev += tl.sum(w * d, axis=0)
                wdev2 += tl.sum(w * d * d, axis=0)
            if LOGLIK:
                aux += tl.sum(tl.load(loglik_ptr + rows, mask=valid, other=0.0), axis=0)
            if TOP:
                xv = tl.where(valid, x, -inf)
                c1 = tl.max(xv, axis=0)
                # The first row (in row order) holding the chunk's max; then the max of the rest.
                r1 = tl.min(tl.where(valid & (xv == c1), rows, 9223372036854775807), axis=0)
                c2 = tl.max(tl.where(rows == r1, -inf, xv), axis=0)
                has = tl.sum(valid.to(tl.int32), axis=0) > 0
                better = has & ((top_row < 0) | (c1 > top1))
                tie = has & (top_row >= 0) & (c1 == top1)
                new_top2 = tl.where(better, tl.maximum(top1, c2),
                                    tl.where(tie, top1, tl.maximum(top2, c1)))
                top2 = tl.where(has, new_top2, top2)
                top_row = tl.where(better, r1, top_row)
                top1 = tl.where(better, c1, top1)
        base = ext_ptr + g * 7
        tl.store(base + 0, wsum)
        tl.store(base + 1, wdev)
        tl.store(base + 2, wdev2)
        tl.store(base + 3, tl.where(n > 0, aux / n, 0.0))
        tl.store(base + 4, top1)
        tl.store(base + 5, top2)
        tl.store(base + 6, top_row.to(tl.float64))


@triton.jit
def _rows_finish_kernel(
    scores_ptr,  # (N,) fp32 / fp64 (the score, or r' for unlikely via xr_ptr)
    xr_ptr,  # (N,) fp64, read when UNLIKELY
    loglik_ptr,  # (N,) fp64, read for xrpo
    row_group_ptr,  # (N,) int64 (unused when CONTIGUOUS)
    ms_ptr,  # (K, 5) fp64: moments of the scores (reported mean / std / zero variance)
    mx_ptr,  # (K, 5) fp64: moments of the values the estimator normalises
    ext_ptr,  # (K, 7) fp64, read when EXTRAS
    params_ptr,  # (8,) fp64: PARAM_FIELDS
    adv_ptr,  # (N,) fp32 / fp64 out
    mean_ptr,  # (N,) like adv
    std_ptr,  # (N,) like adv
    zv_ptr,  # (N,) bool (int8) out
    n_rows,
    group_size,
    ESTIMATOR: tl.constexpr,
    STD_MODE: tl.constexpr,
    BATCH_SCOPE: tl.constexpr,
    SINGLETON_VERL: tl.constexpr,
    CONTIGUOUS: tl.constexpr,
    UNLIKELY: tl.constexpr,
    EXTRAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = rows < n_rows
    if CONTIGUOUS:
        g = rows // group_size
    else:
        g = tl.load(row_group_ptr + rows, mask=in_range, other=0)
    s = tl.load(scores_ptr + rows, mask=in_range, other=0.0).to(tl.float64)
    valid = in_range & ((s - s) == 0.0)
    if UNLIKELY:
        x = tl.load(xr_ptr + rows, mask=in_range, other=0.0)
    else:
        x = s
    gm = g * 5
    ms_n = tl.load(ms_ptr + gm, mask=in_range, other=0.0)
    ms_mean = tl.load(ms_ptr + gm + 1, mask=in_range, other=0.0)
    ms_m2 = tl.load(ms_ptr + gm + 2, mask=in_range, other=0.0)
    ms_lo = tl.load(ms_ptr + gm + 3, mask=in_range, other=0.0)
    ms_hi = tl.load(ms_ptr + gm + 4, mask=in_range, other=0.0)
    n = tl.load(mx_ptr + gm, mask=in_range, other=0.0)
    mean = tl.load(mx_ptr + gm + 1, mask=in_range, other=0.0)
    m2 = tl.load(mx_ptr + gm + 2, mask=in_range, other=0.0)
    eps = tl.load(params_ptr + 0)

    # Reported statistics of the scores: NaN mean/std for an empty group, std 0 for one row.
    if STD_MODE == 1:
        rep_var = ms_m2 / ms_n
    else:
        rep_var = ms_m2 / (ms_n - 1.0)
    rep_std = tl.where(ms_n < 2.0, 0.0, tl.sqrt(tl.maximum(rep_var, 0.0)))
    rep_std = tl.where(ms_n == 0.0, float("nan"), rep_std)
    tl.store(mean_ptr + rows, ms_mean, mask=in_range)
    tl.store(std_ptr + rows, rep_std, mask=in_range)
    tl.store(zv_ptr + rows, ((ms_n >= 2.0) & (ms_lo == ms_hi)).to(tl.int8), mask=in_range)

    # group_affine (rlkern/group_stats.h): A = (x − center)·scale.
    single = n < 2.0
    if SINGLETON_VERL:
        active = n >= 1.0
    else:
        active = n >= 2.0
    if STD_MODE == 1:
        sigma = tl.sqrt(m2 / n)
    else:
        sigma = tl.sqrt(m2 / (n - 1.0))
    center = tl.where(single, 0.0, mean)
    scale = tl.full((BLOCK,), 1.0, tl.float64)
    if EXTRAS:
        ge = g * 7
        wsum = tl.load(ext_ptr + ge, mask=in_range, other=0.0)
        wdev = tl.load(ext_ptr + ge + 1, mask=in_range, other=0.0)
    if ESTIMATOR == 4:  # opo: length-weighted mean, as a correction of the plain mean
        center = tl.where(single, 0.0, tl.where(wsum > 0.0, mean + wdev / wsum, mean))
    elif ESTIMATOR == 2:  # rloo
        scale = tl.where(single, 1.0, n / (n - 1.0))
    elif ESTIMATOR == 5:  # gpg
        scale += tl.load(params_ptr + 5) - 1.0
    elif ESTIMATOR == 3:  # reinforce_pp_baseline: (c − mean c)·rstd with c = x − center
        center += tl.load(params_ptr + 6)
        scale += tl.load(params_ptr + 7) - 1.0
    elif ESTIMATOR == 7:  # ngrpo: one Welford step with the virtual sample r_max
        r_max = tl.load(params_ptr + 1)
        n2 = n + 1.0
        mean2 = mean + (r_max - mean) / n2
        m22 = m2 + (r_max - mean) * (r_max - mean2)
        center = mean2
        if STD_MODE != 2:
            if STD_MODE == 1:
                sigma2 = tl.sqrt(m22 / n2)
            else:
                sigma2 = tl.sqrt(m22 / n)
            scale = 1.0 / (sigma2 + eps)
    elif ESTIMATOR == 0 or ESTIMATOR == 8 or ESTIMATOR == 9:  # grpo, unlikely, xrpo
        if STD_MODE != 2:
            if BATCH_SCOPE:
                scale = scale * 0.0 + 1.0 / (tl.load(params_ptr + 4) + eps)
            else:
                scale = 1.0 / (tl.where(single, 1.0, sigma) + eps)
    a = (x - center) * scale
    if ESTIMATOR == 9:  # xrpo: novelty-aware sharpening of positive advantages
        lam = tl.load(params_ptr + 2)
        kappa = tl.load(params_ptr + 3)
        ll = tl.load(loglik_ptr + rows, mask=in_range, other=0.0)
        ll_mean = tl.load(ext_ptr + ge + 3, mask=in_range, other=0.0)
        eta = tl.exp(ll - ll_mean)
        bonus = tl.maximum(lam * (1.0 - eta), 0.0)
        a = tl.where(a > 0.0, a + tl.minimum(bonus, kappa * a), a)
    if ESTIMATOR == 6:  # grpo_passk: the top row gets (top1 − top2)/(σ + eps)
        top1 = tl.load(ext_ptr + ge + 4, mask=in_range, other=0.0)
        top2 = tl.load(ext_ptr + ge + 5, mask=in_range, other=0.0)
        top_row = tl.load(ext_ptr + ge + 6, mask=in_range, other=-1.0)
        gap = top1 - top2
        if STD_MODE != 2:
            gap = gap / (tl.where(single, 0.0, sigma) + eps)
        a = tl.where(rows.to(tl.float64) == top_row, gap, 0.0)
    a = tl.where(valid & active, a, 0.0)
    tl.store(adv_ptr + rows, a, mask=in_range)


# ---------------------------------------------------------------------------------------------
# §2.1 helpers


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    # f2 ∘ f1 for f(G) = b + a·G: applying the earlier (a1, b1) first.
    return a1 * a2, b2 + a2 * b1


@triton.jit
def _discounted_returns_kernel(
    rewards_ptr,  # (N, T) fp32 / fp64, contiguous
    reset_ptr,  # (N, T) bool, read when HAS_RESET
    out_ptr,  # (N, T) like rewards
    seq_len,
    gamma,  # γ rounded to fp32 (Triton float arguments are fp32) ...
    gamma_lo,  # ... and the residual γ − gamma: together ~48 bits of γ
    HAS_RESET: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """One program per row: G[t] = r[t] + γ·(1 − reset[t])·G[t + 1], scanned from the end.

    Each chunk is loaded back to front and scanned forwards as a composition of the affine maps
    G ↦ r + a·G (an associative scan), then applied to the carry of the chunk after it.
    Accumulation is float64."""
    row = tl.program_id(0).to(tl.int64)
    base = row * seq_len
    gamma64 = tl.cast(gamma, tl.float64) + tl.cast(gamma_lo, tl.float64)
    carry = tl.zeros((), tl.float64)
    k = tl.arange(0, BLOCK_T)
    for start in range(0, seq_len, BLOCK_T):
        t = seq_len - 1 - (start + k)  # back to front
        ok = t >= 0
        r = tl.load(rewards_ptr + base + t, mask=ok, other=0.0).to(tl.float64)
        a = tl.full((BLOCK_T,), 1.0, tl.float64) * gamma64
        if HAS_RESET:
            reset = tl.load(reset_ptr + base + t, mask=ok, other=0)
            a = tl.where(reset != 0, 0.0, a)
        a_acc, b_acc = tl.associative_scan((a, r), 0, _affine_combine)
        g = b_acc + a_acc * carry
        tl.store(out_ptr + base + t, g, mask=ok)
        carry = tl.sum(tl.where(k == BLOCK_T - 1, g, 0.0), axis=0)  # the chunk's last (= t0)


@triton.jit
def _position_sums_kernel(
    x_ptr,  # (N, T) fp32 / fp64
    mask_ptr,  # (N, T) bool
    perm_ptr,  # (N,) int64: rows group after group (unused when CONTIGUOUS)
    offsets_ptr,  # (K + 1,) int64 (unused when CONTIGUOUS)
    out_a_ptr,  # (N, T): the baseline-subtracted values, or the GTPO weights
    out_b_ptr,  # (N, T): the GTPO inverse weights (GTPO only)
    seq_len,
    group_size,
    eps,
    GTPO: tl.constexpr,
    CONTIGUOUS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """One program per (group, block of positions): sums over the group's valid rows at each
    position, then one write per element. Baseline: A = x − Σx/Σ1. GTPO: w = H / ΣH,
    w_inv = h / Σh with h = 1 / max(H, eps)."""
    g = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < seq_len
    if CONTIGUOUS:
        start = g * group_size
        count = group_size
    else:
        start = tl.load(offsets_ptr + g)
        count = tl.load(offsets_ptr + g + 1) - start
    sum_a = tl.zeros((BLOCK_T,), tl.float64)
    sum_b = tl.zeros((BLOCK_T,), tl.float64)
    for j in range(0, count):
        if CONTIGUOUS:
            row = start + j
        else:
            row = tl.load(perm_ptr + start + j)
        v = tl.load(mask_ptr + row * seq_len + t, mask=t_ok, other=0) != 0
        x = tl.load(x_ptr + row * seq_len + t, mask=t_ok & v, other=0.0).to(tl.float64)
        if GTPO:
            sum_a += tl.where(v, x, 0.0)
            sum_b += tl.where(v, 1.0 / tl.maximum(x, eps), 0.0)
        else:
            sum_a += tl.where(v, x, 0.0)
            sum_b += v.to(tl.float64)
    for j in range(0, count):
        if CONTIGUOUS:
            row = start + j
        else:
            row = tl.load(perm_ptr + start + j)
        v = tl.load(mask_ptr + row * seq_len + t, mask=t_ok, other=0) != 0
        x = tl.load(x_ptr + row * seq_len + t, mask=t_ok & v, other=0.0).to(tl.float64)
        if GTPO:
            w = tl.where(v & (sum_a != 0.0), x / tl.where(sum_a != 0.0, sum_a, 1.0), 0.0)
            w_inv = tl.where(v, (1.0 / tl.maximum(x, eps)) / tl.where(v, sum_b, 1.0), 0.0)
            tl.store(out_a_ptr + row * seq_len + t, w, mask=t_ok)
            tl.store(out_b_ptr + row * seq_len + t, w_inv, mask=t_ok)
        else:
            a = tl.where(v, x - sum_a / tl.maximum(sum_b, 1.0), 0.0)
            tl.store(out_a_ptr + row * seq_len + t, a, mask=t_ok)


@triton.jit
def _empg_kernel(
    adv_ptr,  # (S,) fp32 / fp64
    h_ptr,  # (S,) step entropies (finite)
    h_next_ptr,  # (S,) next-step entropies, NaN where none
    out_ptr,  # (S,) like adv
    n,
    k,
    k_f,
    zeta,
    BLOCK: tl.constexpr,
):
    """One program: min / max of H, then mean of e^{−kĤ}, then the modulation (float64)."""
    offs = tl.arange(0, BLOCK)
    lo = tl.full((), float("inf"), tl.float64)
    hi = tl.full((), -float("inf"), tl.float64)
    for start in range(0, n, BLOCK):
        ok = start + offs < n
        h = tl.load(h_ptr + start + offs, mask=ok, other=0.0).to(tl.float64)
        lo = tl.minimum(lo, tl.min(tl.where(ok, h, float("inf")), axis=0))
        hi = tl.maximum(hi, tl.max(tl.where(ok, h, -float("inf")), axis=0))
    scale = tl.where(hi > lo, 1.0 / (hi - lo), 0.0)
    total = tl.zeros((), tl.float64)
    for start in range(0, n, BLOCK):
        ok = start + offs < n
        h = tl.load(h_ptr + start + offs, mask=ok, other=0.0).to(tl.float64)
        total += tl.sum(tl.where(ok, tl.exp(-k * (h - lo) * scale), 0.0), axis=0)
    inv_mean = n / total
    for start in range(0, n, BLOCK):
        ok = start + offs < n
        h = tl.load(h_ptr + start + offs, mask=ok, other=0.0).to(tl.float64)
        hn = tl.load(h_next_ptr + start + offs, mask=ok, other=0.0).to(tl.float64)
        a = tl.load(adv_ptr + start + offs, mask=ok, other=0.0).to(tl.float64)
        g = tl.exp(-k * (h - lo) * scale) * inv_mean
        f = tl.where(hn == hn, tl.exp(-k_f * (hn - lo) * scale), 0.0)
        tl.store(out_ptr + start + offs, g * a + zeta * f, mask=ok)


# ---------------------------------------------------------------------------------------------
# Launchers


def segment_stats(scores: Any, perm: Any | None, offsets: Any | None, group_size: int,
                  num_groups: int, weights: Any | None, loglik: Any | None, ms: Any, mx: Any,
                  ext: Any, xr: Any, params: Any, *, unlikely: bool, weighted: bool,
                  with_loglik: bool, top: bool) -> None:
    """Fill ``ms`` (K, 5), and ``mx`` / ``xr`` (unlikely) and ``ext`` (K, 7) when asked.

    ``perm`` / ``offsets`` give the groups (``None``: contiguous groups of ``group_size``);
    for unlikely, rows within a group must be sorted by (log-likelihood, row)."""
    if num_groups == 0:
        return
    contiguous = perm is None
    _segment_stats_kernel[(num_groups,)](
        scores, scores if contiguous else perm, scores if contiguous else offsets,
        weights if weights is not None else scores, loglik if loglik is not None else scores,
        ms, mx, ext, xr, params, group_size,
        BLOCK=_BLOCK_GROUP, CONTIGUOUS=contiguous, UNLIKELY=unlikely, WEIGHTED=weighted,
        HAS_WEIGHTS=weights is not None, LOGLIK=with_loglik, TOP=top, num_warps=1,
    )


def rows_finish(scores: Any, xr: Any | None, loglik: Any | None, row_group: Any | None,
                group_size: int, ms: Any, mx: Any, ext: Any | None, params: Any, adv: Any,
                mean: Any, std: Any, zv: Any, *, estimator: int, std_mode: int,
                batch_scope: bool, singleton_verl: bool) -> None:
    """Write the per-row outputs (``zv`` is a bool tensor; pass it viewed as int8)."""
    n = scores.shape[0]
    if n == 0:
        return
    contiguous = row_group is None
    _rows_finish_kernel[(triton.cdiv(n, _BLOCK_ROWS),)](
        scores, xr if xr is not None else scores, loglik if loglik is not None else scores,
        scores if contiguous else row_group, ms, mx, ext if ext is not None else ms, params,
        adv, mean, std, zv, n, group_size,
        ESTIMATOR=estimator, STD_MODE=std_mode, BATCH_SCOPE=batch_scope,
        SINGLETON_VERL=singleton_verl, CONTIGUOUS=contiguous, UNLIKELY=xr is not None,
        EXTRAS=ext is not None, BLOCK=_BLOCK_ROWS, num_warps=4,
    )


def discounted_returns(rewards: Any, reset: Any | None, out: Any, *, gamma: float) -> None:
    """``out`` = discounted returns of contiguous ``(N, T)`` rewards (float64 accumulation)."""
    n, t = rewards.shape
    if n * t == 0:
        return
    block_t = max(16, min(1024, triton.next_power_of_2(t)))
    _discounted_returns_kernel[(n,)](
        rewards, reset if reset is not None else rewards, out, t, *_split_fp32(gamma),
        HAS_RESET=reset is not None, BLOCK_T=block_t, num_warps=4)


def _split_fp32(value: float) -> tuple[float, float]:
    """``value`` as an fp32 number plus its fp32 residual (Triton float arguments are fp32)."""
    hi = struct.unpack("f", struct.pack("f", float(value)))[0]
    return hi, float(value) - hi


def position_sums(x: Any, mask: Any, perm: Any | None, offsets: Any | None, group_size: int,
                  num_groups: int, out_a: Any, out_b: Any | None, *, gtpo: bool,
                  eps: float = 1e-6) -> None:
    """IGPO baseline (``gtpo=False``) or GTPO weights into ``out_a`` (and ``out_b``)."""
    n, t = x.shape
    if n * t == 0 or num_groups == 0:
        return
    block_t = max(16, min(256, triton.next_power_of_2(t)))
    contiguous = perm is None
    _position_sums_kernel[(num_groups, triton.cdiv(t, block_t))](
        x, mask, x if contiguous else perm, x if contiguous else offsets, out_a,
        out_b if out_b is not None else out_a, t, group_size, float(eps),
        GTPO=gtpo, CONTIGUOUS=contiguous, BLOCK_T=block_t, num_warps=2)


def empg_modulate(adv: Any, h: Any, h_next: Any, out: Any, *, k: float, k_f: float,
                  zeta: float) -> None:
    n = adv.shape[0]
    if n == 0:
        return
    _empg_kernel[(1,)](adv, h, h_next, out, n, float(k), float(k_f), float(zeta), BLOCK=1024,
                       num_warps=8)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation specs (consumed by rlkern.aot)


def _aot_specs() -> list[dict[str, Any]]:
    """The configurations the launchers use for float32 scores: the segment pass for grpo
    (ids and contiguous), the extras variants, and the row pass for each estimator family;
    the helpers at their largest blocks."""
    specs: list[dict[str, Any]] = []
    seg_sig = {"scores_ptr": "*fp32", "perm_ptr": "*i64", "offsets_ptr": "*i64",
               "weights_ptr": "*fp64", "loglik_ptr": "*fp64", "ms_ptr": "*fp64",
               "mx_ptr": "*fp64", "ext_ptr": "*fp64", "xr_ptr": "*fp64", "params_ptr": "*fp64",
               "group_size": "i32", "BLOCK": "constexpr", "CONTIGUOUS": "constexpr",
               "UNLIKELY": "constexpr", "WEIGHTED": "constexpr", "HAS_WEIGHTS": "constexpr",
               "LOGLIK": "constexpr", "TOP": "constexpr"}
    flags = {"UNLIKELY": False, "WEIGHTED": False, "HAS_WEIGHTS": False, "LOGLIK": False,
             "TOP": False}
    seg_variants = {
        "grpo ids": {"CONTIGUOUS": False},
        "grpo contiguous": {"CONTIGUOUS": True},
        "opo ids": {"CONTIGUOUS": False, "WEIGHTED": True, "HAS_WEIGHTS": True},
        "passk+xrpo ids": {"CONTIGUOUS": False, "LOGLIK": True, "TOP": True},
        "unlikely ids": {"CONTIGUOUS": False, "UNLIKELY": True},
    }
    for name, extra in seg_variants.items():
        specs.append({"name": f"segment_stats {name}", "fn": _segment_stats_kernel,
                      "signature": seg_sig,
                      "constexprs": {"BLOCK": _BLOCK_GROUP, **flags, **extra}, "num_warps": 1,
                      "divisible_by_16": [k for k in seg_sig if k.endswith("_ptr")]})
    fin_sig = {"scores_ptr": "*fp32", "xr_ptr": "*fp64", "loglik_ptr": "*fp64",
               "row_group_ptr": "*i64", "ms_ptr": "*fp64", "mx_ptr": "*fp64",
               "ext_ptr": "*fp64", "params_ptr": "*fp64", "adv_ptr": "*fp32", "mean_ptr": "*fp32",
               "std_ptr": "*fp32", "zv_ptr": "*i8", "n_rows": "i32", "group_size": "i32"}
    for est in ("grpo", "rloo", "opo", "grpo_passk", "ngrpo", "xrpo", "reinforce_pp_baseline"):
        code = EST_CODES[est]
        extras = est in ("opo", "grpo_passk", "xrpo", "reinforce_pp_baseline")
        specs.append({"name": f"rows_finish {est}", "fn": _rows_finish_kernel,
                      "signature": {**fin_sig, **{k: "constexpr" for k in (
                          "ESTIMATOR", "STD_MODE", "BATCH_SCOPE", "SINGLETON_VERL", "CONTIGUOUS",
                          "UNLIKELY", "EXTRAS", "BLOCK")}},
                      "constexprs": {"ESTIMATOR": code, "STD_MODE": 0, "BATCH_SCOPE": False,
                                     "SINGLETON_VERL": False, "CONTIGUOUS": False,
                                     "UNLIKELY": False, "EXTRAS": extras, "BLOCK": _BLOCK_ROWS},
                      "num_warps": 4,
                      "divisible_by_16": [k for k in fin_sig if k.endswith("_ptr")]})
    specs.append({"name": "discounted_returns BLOCK_T=1024", "fn": _discounted_returns_kernel,
                  "signature": {"rewards_ptr": "*fp32", "reset_ptr": "*i1", "out_ptr": "*fp32",
                                "seq_len": "i32", "gamma": "fp32", "gamma_lo": "fp32",
                                "HAS_RESET": "constexpr",
                                "BLOCK_T": "constexpr"},
                  "constexprs": {"HAS_RESET": True, "BLOCK_T": 1024}, "num_warps": 4,
                  "divisible_by_16": ["rewards_ptr", "reset_ptr", "out_ptr"]})
    for gtpo in (False, True):
        specs.append({"name": f"position_sums {'gtpo' if gtpo else 'baseline'} ids",
                      "fn": _position_sums_kernel,
                      "signature": {"x_ptr": "*fp32", "mask_ptr": "*i1", "perm_ptr": "*i64",
                                    "offsets_ptr": "*i64", "out_a_ptr": "*fp32",
                                    "out_b_ptr": "*fp32", "seq_len": "i32", "group_size": "i32",
                                    "eps": "fp32", "GTPO": "constexpr",
                                    "CONTIGUOUS": "constexpr", "BLOCK_T": "constexpr"},
                      "constexprs": {"GTPO": gtpo, "CONTIGUOUS": False, "BLOCK_T": 256},
                      "num_warps": 2,
                      "divisible_by_16": ["x_ptr", "mask_ptr", "perm_ptr", "offsets_ptr",
                                          "out_a_ptr", "out_b_ptr"]})
    specs.append({"name": "empg BLOCK=1024", "fn": _empg_kernel,
                  "signature": {"adv_ptr": "*fp32", "h_ptr": "*fp32", "h_next_ptr": "*fp32",
                                "out_ptr": "*fp32", "n": "i32", "k": "fp32", "k_f": "fp32",
                                "zeta": "fp32", "BLOCK": "constexpr"},
                  "constexprs": {"BLOCK": 1024}, "num_warps": 8,
                  "divisible_by_16": ["adv_ptr", "h_ptr", "h_next_ptr", "out_ptr"]})
    return specs


AOT_SPECS: list[dict[str, Any]] = _aot_specs()
