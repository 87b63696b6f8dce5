"""Triton kernels for group advantages (ALGORITHMS.md §2) and the group statistics behind them.

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
the K group summaries and arrive in the small float64 ``params`` tensor, read by pointer (no host
synchronisation, no fp32 rounding of the constants). ``_moments_merge_kernel`` merges two
moments tables row by row (Chan's formula: streaming statistics).

The options arrive as the ops' integer codes (``flags``) together with the family's code
tables, both from the Python layer (``rlkern.config.advantages.codes()``, read from the header):
the row launcher turns them into the estimator's and the std mode's *names*, the kernel's
compile-time constants, so that no code number is written here. The tables the kernels index
(``params``, the moments and extras columns) are the header's too; this module names the
entries it reads (:data:`PARAM_FIELDS`, :data:`MOMENT_FIELDS`, :data:`EXTRA_FIELDS`) and
:func:`rows_finish` checks them against the tables it is handed.

This module imports only triton; the launchers take tensors (anything Triton accepts as a
pointer). ``AOT_SPECS`` lists configurations for ahead-of-time compilation (``rlkern aot-report``).
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

__all__ = ["AOT_SPECS", "EXTRA_FIELDS", "MOMENT_FIELDS", "PARAM_FIELDS", "moments_merge",
           "rows_finish", "segment_stats"]

#: The entries of the header's ``params``, ``moments`` and ``extras`` tables, in their order.
PARAM_FIELDS = ("eps", "r_max", "lam", "kappa", "batch_std", "gpg_alpha", "white_mean",
                "white_rstd")
MOMENT_FIELDS = ("count", "mean", "m2", "min", "max")
EXTRA_FIELDS = ("wsum", "wdev", "wdev2", "loglik_mean", "top1", "top2", "top_row")


def _positions(fields: tuple[str, ...], names: str) -> tuple[tl.constexpr, ...]:
    """The positions of ``names`` (space-separated) in ``fields``, as Triton constants."""
    return tuple(tl.constexpr(fields.index(name)) for name in names.split())


(_P_EPS, _P_R_MAX, _P_LAM, _P_KAPPA, _P_BATCH_STD, _P_GPG_ALPHA, _P_WHITE_MEAN,
 _P_WHITE_RSTD) = _positions(PARAM_FIELDS, "eps r_max lam kappa batch_std gpg_alpha white_mean "
                                           "white_rstd")
_M_COUNT, _M_MEAN, _M_M2, _M_MIN, _M_MAX = _positions(MOMENT_FIELDS, "count mean m2 min max")
(_X_WSUM, _X_WDEV, _X_WDEV2, _X_LOGLIK_MEAN, _X_TOP1, _X_TOP2,
 _X_TOP_ROW) = _positions(EXTRA_FIELDS, "wsum wdev wdev2 loglik_mean top1 top2 top_row")
_NM = tl.constexpr(len(MOMENT_FIELDS))  # the width of a moments row
_NX = tl.constexpr(len(EXTRA_FIELDS))  # the width of an extras row

_BLOCK_ROWS = 512  # rows per program in the row pass (4 per thread: no spills in fp64)
_BLOCK_GROUP = 32  # rows of a group per iteration of the segment pass (groups are small)
_BLOCK_MERGE = 128  # groups per program of the merge
_INT64_MAX = tl.constexpr(9223372036854775807)


# ---------------------------------------------------------------------------------------------
# Group statistics


@triton.jit
def _group_block(scores_ptr, perm_ptr, start, j, count, BLOCK: tl.constexpr,
                 CONTIGUOUS: tl.constexpr):
    """Rows j..j+BLOCK of a group: (row index, value in float64, in-range, valid)."""
    k = j + tl.arange(0, BLOCK)
    in_range = k < count
    rows = start + k if CONTIGUOUS else tl.load(perm_ptr + start + k, mask=in_range, other=0)
    x = tl.load(scores_ptr + rows, mask=in_range, other=0.0).to(tl.float64)
    return rows, x, in_range, in_range & ((x - x) == 0.0)  # NaN and ±inf are not scores


@triton.jit
def _shaped(x, valid, before, lam, n):
    """unlikely's r' = x (1 − λ rank / n) of a block of a group's rows sorted by likelihood
    (rank = the valid rows before the row), and the valid rows of the block."""
    v = valid.to(tl.float64)
    rank = before + tl.cumsum(v, axis=0) - v
    return x * (1.0 - lam * (rank / n)), tl.sum(v, axis=0)


@triton.jit
def _group_moments(scores_ptr, perm_ptr, start, count, lam, n_valid, BLOCK: tl.constexpr,
                   CONTIGUOUS: tl.constexpr, SHAPED: tl.constexpr):
    """(n, mean, M2, min, max) of a group's valid values in float64, by two passes: the scores,
    or with SHAPED their r' (``n_valid``: the group's valid rows, known from the scores)."""
    inf = float("inf")
    n = tl.zeros((), tl.float64)
    total = tl.zeros((), tl.float64)
    lo = tl.full((), inf, tl.float64)
    hi = tl.full((), -inf, tl.float64)
    before = tl.zeros((), tl.float64)
    for j in range(0, count, BLOCK):
        _, x, _, valid = _group_block(scores_ptr, perm_ptr, start, j, count, BLOCK, CONTIGUOUS)
        if SHAPED:
            x, seen = _shaped(x, valid, before, lam, n_valid)
            before += seen
        n += tl.sum(valid.to(tl.float64), axis=0)
        total += tl.sum(tl.where(valid, x, 0.0), axis=0)
        lo = tl.minimum(lo, tl.min(tl.where(valid, x, inf), axis=0))
        hi = tl.maximum(hi, tl.max(tl.where(valid, x, -inf), axis=0))
    mean = total / n  # NaN for an empty group
    m2 = tl.zeros((), tl.float64)
    before = tl.zeros((), tl.float64)
    for j in range(0, count, BLOCK):  # r' recomputed, not re-read: no store-to-load hazard
        _, x, _, valid = _group_block(scores_ptr, perm_ptr, start, j, count, BLOCK, CONTIGUOUS)
        if SHAPED:
            x, seen = _shaped(x, valid, before, lam, n_valid)
            before += seen
        d = tl.where(valid, x - mean, 0.0)
        m2 += tl.sum(d * d, axis=0)
    equal = lo == hi  # all values equal: mean = that value, M2 = 0, exactly
    return n, tl.where(equal, lo, mean), tl.where(equal, 0.0, m2), lo, hi


@triton.jit
def _store_moments(ptr, n, mean, m2, lo, hi):
    tl.store(ptr + _M_COUNT, n)
    tl.store(ptr + _M_MEAN, mean)
    tl.store(ptr + _M_M2, m2)
    tl.store(ptr + _M_MIN, lo)
    tl.store(ptr + _M_MAX, hi)


@triton.jit
def _segment_stats_kernel(
    scores_ptr,  # (N,) fp32 / fp64
    perm_ptr,  # (N,) int64: rows group after group (unused when CONTIGUOUS)
    offsets_ptr,  # (K + 1,) int64 (unused when CONTIGUOUS)
    weights_ptr,  # (N,) fp64, read when WEIGHTED (absent: 1)
    loglik_ptr,  # (N,) fp64, read when LOGLIK or UNLIKELY
    ms_ptr,  # (K, NM) fp64 out: moments of the scores
    mx_ptr,  # (K, NM) fp64 out when UNLIKELY: moments of r'
    ext_ptr,  # (K, NX) fp64 out when any extra
    xr_ptr,  # (N,) fp64 out when UNLIKELY: r' per row
    params_ptr,  # PARAM_FIELDS fp64 (λ for unlikely)
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
    start = g * group_size if CONTIGUOUS else tl.load(offsets_ptr + g)
    count = group_size if CONTIGUOUS else tl.load(offsets_ptr + g + 1) - start
    lam = tl.load(params_ptr + _P_LAM)
    n, mean, m2, lo, hi = _group_moments(scores_ptr, perm_ptr, start, count, lam, 0.0, BLOCK,
                                         CONTIGUOUS, False)
    _store_moments(ms_ptr + g * _NM, n, mean, m2, lo, hi)
    xmean = mean
    if UNLIKELY:
        # Rows arrive sorted by (log-likelihood, row): rank = valid rows before this one.
        before = tl.zeros((), tl.float64)
        for j in range(0, count, BLOCK):
            rows, x, in_range, valid = _group_block(scores_ptr, perm_ptr, start, j, count,
                                                    BLOCK, CONTIGUOUS)
            xr, seen = _shaped(x, valid, before, lam, n)
            before += seen
            tl.store(xr_ptr + rows, tl.where(valid, xr, x), mask=in_range)
        nx, xmean, xm2, xlo, xhi = _group_moments(scores_ptr, perm_ptr, start, count, lam, n,
                                                  BLOCK, CONTIGUOUS, True)
        _store_moments(mx_ptr + g * _NM, nx, xmean, xm2, xlo, xhi)

    if WEIGHTED or LOGLIK or TOP:
        inf = float("inf")
        wsum = tl.zeros((), tl.float64)
        wdev = tl.zeros((), tl.float64)
        wdev2 = tl.zeros((), tl.float64)
        aux = tl.zeros((), tl.float64)
        top1 = tl.full((), -inf, tl.float64)
        top2 = tl.full((), -inf, tl.float64)
        top_row = tl.full((), -1, tl.int64)
        for j in range(0, count, BLOCK):
            rows, x, in_range, valid = _group_block(scores_ptr, perm_ptr, start, j, count,
                                                    BLOCK, CONTIGUOUS)
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
                r1 = tl.min(tl.where(valid & (xv == c1), rows, _INT64_MAX), axis=0)
                c2 = tl.max(tl.where(rows == r1, -inf, xv), axis=0)
                has = tl.sum(valid.to(tl.int32), axis=0) > 0
                better = has & ((top_row < 0) | (c1 > top1))
                tie = has & (top_row >= 0) & (c1 == top1)
                new_top2 = tl.where(better, tl.maximum(top1, c2),
                                    tl.where(tie, top1, tl.maximum(top2, c1)))
                top2 = tl.where(has, new_top2, top2)
                top_row = tl.where(better, r1, top_row)
                top1 = tl.where(better, c1, top1)
        base = ext_ptr + g * _NX
        tl.store(base + _X_WSUM, wsum)
        tl.store(base + _X_WDEV, wdev)
        tl.store(base + _X_WDEV2, wdev2)
        tl.store(base + _X_LOGLIK_MEAN, tl.where(n > 0, aux / n, 0.0))
        tl.store(base + _X_TOP1, top1)
        tl.store(base + _X_TOP2, top2)
        tl.store(base + _X_TOP_ROW, top_row.to(tl.float64))


@triton.jit
def _sigma(m2, n, BIASED: tl.constexpr):
    if BIASED:
        return tl.sqrt(m2 / n)
    else:
        return tl.sqrt(m2 / (n - 1.0))


@triton.jit
def _inverse_spread(sigma, eps):
    """1 / (σ + eps), or 0 where σ + eps = 0 (inverse_spread of rlkern/group_stats.h: σ = 0
    puts every row on its group's mean, so A = 0, not 0·(1/0) = NaN)."""
    d = sigma + eps
    return tl.where(d != 0.0, 1.0 / tl.where(d != 0.0, d, 1.0), 0.0)


@triton.jit
def _rows_finish_kernel(
    scores_ptr,  # (N,) fp32 / fp64 (the score, or r' for unlikely via xr_ptr)
    xr_ptr,  # (N,) fp64, read when UNLIKELY
    loglik_ptr,  # (N,) fp64, read for xrpo
    row_group_ptr,  # (N,) int64 (unused when CONTIGUOUS)
    ms_ptr,  # (K, NM) fp64: moments of the scores (reported mean / std / zero variance)
    mx_ptr,  # (K, NM) fp64: moments of the values the estimator normalises
    ext_ptr,  # (K, NX) fp64, read when EXTRAS
    params_ptr,  # PARAM_FIELDS fp64
    adv_ptr,  # (N,) fp32 / fp64 out
    mean_ptr,  # (N,) like adv
    std_ptr,  # (N,) like adv
    zv_ptr,  # (N,) bool (int8) out
    n_rows,
    group_size,
    ESTIMATOR: tl.constexpr,  # the estimator's name
    STD: tl.constexpr,  # the std mode's name: "unbiased", "biased" or "none"
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
    gm = g * _NM
    ms_n = tl.load(ms_ptr + gm + _M_COUNT, mask=in_range, other=0.0)
    ms_m2 = tl.load(ms_ptr + gm + _M_M2, mask=in_range, other=0.0)
    n = tl.load(mx_ptr + gm + _M_COUNT, mask=in_range, other=0.0)
    mean = tl.load(mx_ptr + gm + _M_MEAN, mask=in_range, other=0.0)
    m2 = tl.load(mx_ptr + gm + _M_M2, mask=in_range, other=0.0)
    eps = tl.load(params_ptr + _P_EPS)
    biased: tl.constexpr = STD == "biased"
    divide: tl.constexpr = STD != "none"

    # Reported statistics of the scores: NaN mean/std for an empty group, std 0 for one row.
    rep_std = tl.where(ms_n < 2.0, 0.0, _sigma(tl.maximum(ms_m2, 0.0), ms_n, biased))
    tl.store(mean_ptr + rows, tl.load(ms_ptr + gm + _M_MEAN, mask=in_range, other=0.0),
             mask=in_range)
    tl.store(std_ptr + rows, tl.where(ms_n == 0.0, float("nan"), rep_std), mask=in_range)
    equal = tl.load(ms_ptr + gm + _M_MIN, mask=in_range, other=0.0) == tl.load(
        ms_ptr + gm + _M_MAX, mask=in_range, other=0.0)
    tl.store(zv_ptr + rows, ((ms_n >= 2.0) & equal).to(tl.int8), mask=in_range)

    # group_affine (rlkern/group_stats.h): A = (x − center)·scale.
    single = n < 2.0
    if SINGLETON_VERL:
        active = n >= 1.0
    else:
        active = n >= 2.0
    sigma = _sigma(m2, n, biased)
    center = tl.where(single, 0.0, mean)
    scale = tl.full((BLOCK,), 1.0, tl.float64)
    if EXTRAS:
        ge = g * _NX
        wsum = tl.load(ext_ptr + ge + _X_WSUM, mask=in_range, other=0.0)
        wdev = tl.load(ext_ptr + ge + _X_WDEV, mask=in_range, other=0.0)
    if ESTIMATOR == "opo":  # length-weighted mean, as a correction of the plain mean
        center = tl.where(single, 0.0, tl.where(wsum > 0.0, mean + wdev / wsum, mean))
    elif ESTIMATOR == "rloo":
        scale = tl.where(single, 1.0, n / (n - 1.0))
    elif ESTIMATOR == "gpg":  # (scale·0 + a: the constant broadcast without rounding it)
        scale = scale * 0.0 + tl.load(params_ptr + _P_GPG_ALPHA)
    elif ESTIMATOR == "reinforce_pp_baseline":  # (c − mean c)·rstd with c = x − center
        center += tl.load(params_ptr + _P_WHITE_MEAN)
        scale = scale * 0.0 + tl.load(params_ptr + _P_WHITE_RSTD)
    elif ESTIMATOR == "ngrpo":  # one Welford step with the virtual sample r_max
        r_max = tl.load(params_ptr + _P_R_MAX)
        n2 = n + 1.0
        mean2 = mean + (r_max - mean) / n2
        m22 = m2 + (r_max - mean) * (r_max - mean2)
        center = mean2
        if divide:
            scale = _inverse_spread(_sigma(m22, n2, biased), eps)
    elif ESTIMATOR == "grpo" or ESTIMATOR == "unlikely" or ESTIMATOR == "xrpo":
        if divide:
            if BATCH_SCOPE:
                scale = scale * 0.0 + _inverse_spread(tl.load(params_ptr + _P_BATCH_STD), eps)
            else:
                scale = _inverse_spread(tl.where(single, 1.0, sigma), eps)
    a = (x - center) * scale
    if ESTIMATOR == "xrpo":  # novelty-aware sharpening of positive advantages
        lam = tl.load(params_ptr + _P_LAM)
        kappa = tl.load(params_ptr + _P_KAPPA)
        ll = tl.load(loglik_ptr + rows, mask=in_range, other=0.0)
        ll_mean = tl.load(ext_ptr + ge + _X_LOGLIK_MEAN, mask=in_range, other=0.0)
        eta = tl.exp(ll - ll_mean)
        bonus = tl.maximum(lam * (1.0 - eta), 0.0)
        a = tl.where(a > 0.0, a + tl.minimum(bonus, kappa * a), a)
    if ESTIMATOR == "grpo_passk":  # the top row gets (top1 − top2)/(σ + eps)
        top1 = tl.load(ext_ptr + ge + _X_TOP1, mask=in_range, other=0.0)
        top2 = tl.load(ext_ptr + ge + _X_TOP2, mask=in_range, other=0.0)
        top_row = tl.load(ext_ptr + ge + _X_TOP_ROW, mask=in_range, other=-1.0)
        gap = top1 - top2
        if divide:
            spread = tl.where(single, 0.0, sigma) + eps  # σ = 0: top1 == top2, A = 0
            gap = tl.where(spread != 0.0, gap / tl.where(spread != 0.0, spread, 1.0), 0.0)
        a = tl.where(rows.to(tl.float64) == top_row, gap, 0.0)
    a = tl.where(valid & active, a, 0.0)
    tl.store(adv_ptr + rows, a, mask=in_range)


@triton.jit
def _moments_merge_kernel(a_ptr, b_ptr, out_ptr, k, BLOCK: tl.constexpr):
    """out[g] = Chan's merge of a[g] and b[g] (moments_merge of rlkern/group_stats.h)."""
    g = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = g < k
    pa = a_ptr + g * _NM
    pb = b_ptr + g * _NM
    na = tl.load(pa + _M_COUNT, mask=ok, other=0.0)
    nb = tl.load(pb + _M_COUNT, mask=ok, other=0.0)
    mean_a = tl.load(pa + _M_MEAN, mask=ok, other=0.0)
    mean_b = tl.load(pb + _M_MEAN, mask=ok, other=0.0)
    m2a = tl.load(pa + _M_M2, mask=ok, other=0.0)
    m2b = tl.load(pb + _M_M2, mask=ok, other=0.0)
    lo = tl.minimum(tl.load(pa + _M_MIN, mask=ok, other=0.0),
                    tl.load(pb + _M_MIN, mask=ok, other=0.0))
    hi = tl.maximum(tl.load(pa + _M_MAX, mask=ok, other=0.0),
                    tl.load(pb + _M_MAX, mask=ok, other=0.0))
    n = na + nb
    delta = mean_b - mean_a
    mean = mean_a + delta * (nb / n)
    m2 = m2a + m2b + delta * delta * (na * nb / n)
    equal = lo == hi  # keep zero-variance groups exact
    mean = tl.where(equal, lo, mean)
    m2 = tl.where(equal, 0.0, m2)
    # An empty side leaves the other as it is.
    mean = tl.where(na == 0.0, mean_b, tl.where(nb == 0.0, mean_a, mean))
    m2 = tl.where(na == 0.0, m2b, tl.where(nb == 0.0, m2a, m2))
    po = out_ptr + g * _NM
    tl.store(po + _M_COUNT, n, mask=ok)
    tl.store(po + _M_MEAN, mean, mask=ok)
    tl.store(po + _M_M2, m2, mask=ok)
    tl.store(po + _M_MIN, lo, mask=ok)
    tl.store(po + _M_MAX, hi, mask=ok)


# ---------------------------------------------------------------------------------------------
# Launchers


def segment_stats(scores: Any, perm: Any | None, offsets: Any | None, group_size: int,
                  num_groups: int, weights: Any | None, loglik: Any | None, ms: Any, mx: Any,
                  ext: Any, xr: Any, params: Any, *, unlikely: bool, weighted: bool,
                  with_loglik: bool, top: bool) -> None:
    """Fill ``ms`` (K, NM), and ``mx`` / ``xr`` (unlikely) and ``ext`` (K, NX) when asked.

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


def _check_tables(codes: Any) -> None:
    """The header's tables (``codes``) must be the ones these kernels index."""
    if id(codes) in _checked_tables:
        return
    for table, mine in (("params", PARAM_FIELDS), ("moments", MOMENT_FIELDS),
                        ("extras", EXTRA_FIELDS)):
        theirs = tuple(entry.name for entry in getattr(codes, table))
        if theirs != mine:
            raise RuntimeError(f"rlkern.kernels.advantages reads the {table} table as {mine}, "
                               f"but rlkern/group_stats.h defines {theirs}: update the kernels")
    _checked_tables.add(id(codes))


_checked_tables: set[int] = set()


def rows_finish(scores: Any, xr: Any | None, loglik: Any | None, row_group: Any | None,
                group_size: int, ms: Any, mx: Any, ext: Any | None, params: Any, adv: Any,
                mean: Any, std: Any, zv: Any, *, flags: Any, codes: Any) -> None:
    """Write the per-row outputs (``zv`` is a bool tensor; pass it viewed as int8).

    ``flags`` are the op's option codes and ``codes`` the family's code tables (``IntEnum``
    classes: ``codes.flags``, ``codes.estimator``, ...), as the Python layer hands them."""
    n = scores.shape[0]
    if n == 0:
        return
    _check_tables(codes)
    f = codes.flags
    contiguous = row_group is None
    _rows_finish_kernel[(triton.cdiv(n, _BLOCK_ROWS),)](
        scores, xr if xr is not None else scores, loglik if loglik is not None else scores,
        scores if contiguous else row_group, ms, mx, ext if ext is not None else ms, params,
        adv, mean, std, zv, n, group_size,
        ESTIMATOR=codes.estimator(flags[f.estimator]).name, STD=codes.std(flags[f.std]).name,
        BATCH_SCOPE=flags[f.std_scope] == codes.std_scope.batch,
        SINGLETON_VERL=flags[f.singleton] == codes.singleton.verl, CONTIGUOUS=contiguous,
        UNLIKELY=xr is not None, EXTRAS=ext is not None, BLOCK=_BLOCK_ROWS, num_warps=4,
    )


def moments_merge(a: Any, b: Any, out: Any) -> None:
    """``out[g]`` = Chan's merge of the moments rows ``a[g]`` and ``b[g]`` (K, NM) each."""
    k = a.shape[0]
    if k == 0:
        return
    _moments_merge_kernel[(triton.cdiv(k, _BLOCK_MERGE),)](a, b, out, k, BLOCK=_BLOCK_MERGE,
                                                           num_warps=4)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation specs (consumed by rlkern.aot)


def _aot_specs() -> list[dict[str, Any]]:
    """The configurations the launchers use for float32 scores: the segment pass for grpo
    (ids and contiguous), the extras variants, the row pass for each estimator family, and
    the merge."""
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
        extras = est in ("opo", "grpo_passk", "xrpo", "reinforce_pp_baseline")
        specs.append({"name": f"rows_finish {est}", "fn": _rows_finish_kernel,
                      "signature": {**fin_sig, **{k: "constexpr" for k in (
                          "ESTIMATOR", "STD", "BATCH_SCOPE", "SINGLETON_VERL", "CONTIGUOUS",
                          "UNLIKELY", "EXTRAS", "BLOCK")}},
                      "constexprs": {"ESTIMATOR": est, "STD": "unbiased", "BATCH_SCOPE": False,
                                     "SINGLETON_VERL": False, "CONTIGUOUS": False,
                                     "UNLIKELY": False, "EXTRAS": extras, "BLOCK": _BLOCK_ROWS},
                      "num_warps": 4,
                      "divisible_by_16": [k for k in fin_sig if k.endswith("_ptr")]})
    specs.append({"name": "moments_merge", "fn": _moments_merge_kernel,
                  "signature": {"a_ptr": "*fp64", "b_ptr": "*fp64", "out_ptr": "*fp64",
                                "k": "i32", "BLOCK": "constexpr"},
                  "constexprs": {"BLOCK": _BLOCK_MERGE}, "num_warps": 4,
                  "divisible_by_16": ["a_ptr", "b_ptr", "out_ptr"]})
    return specs


AOT_SPECS: list[dict[str, Any]] = _aot_specs()
