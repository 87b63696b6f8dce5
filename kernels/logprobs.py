"""Triton kernels for token log-probabilities, entropy and softmax statistics (ALGORITHMS.md §1).

For one row ``x`` (length ``V``) with label ``y`` and temperature ``T``::

    z              = x / T                      (computed as x · (1/T), 1/T a runtime scalar)
    lse            = log Σ_v exp(z_v)
    logp           = z_y − lse
    entropy        = lse − Σ_v p_v z_v,         p_v = exp(z_v − lse)
    self_certainty = lse − mean_v z_v
    sum_p_sq       = Σ_v p_v²

Gradient of ``g_lp·logp + g_ent·entropy + g_lse·lse`` wrt one logit::

    ∂/∂x_v = [ g_lp (1[v = y] − p_v) + g_ent p_v (E_p[z] − z_v) + g_lse p_v ] / T,
    E_p[z] = lse − entropy.

Layout: logits are a ``(B, L, V)`` view whose vocab dim is contiguous and whose two leading
strides are arbitrary (TRL's ``logits[:, :-1, :]`` is read in place); row ``r = (b, l)`` starts at
``b·stride_0 + l·stride_1``, computed in 64 bits because ``B·L·V`` may exceed 2³¹. One program
handles one row with a fixed chunking of the vocabulary, so a row's results never depend on the
other rows or on the batch size (batch invariance).

The forward keeps the streaming summary of ``csrc/include/rlkern/online_softmax.h``:
``m`` (running max of the *raw* logits), ``s = Σ exp((x − m)/T)``, ``t = Σ exp(·)·(x − m)/T``,
``u = Σ exp(2(x − m)/T)``, ``Σ(x − m)``, from which ``lse = m/T + log s``,
``entropy = log s − t/s``, ``Σp² = u/s²``: shifted before ``1/T`` scales, so finite rows stay
finite at any magnitude and temperature. It keeps one summary per thread-sized segment of the
vocabulary chunk (so the loop needs no cross-thread communication) and merges them once per
row; see ``_logprobs_fwd_kernel``. The backward takes ``p`` from the saved ``lse`` unless
``|lse| ≥ BWD_LSE_BOUND``, where it recomputes the row's max and normaliser first.

The launchers ``logprobs_fwd`` / ``logprobs_bwd`` take torch tensors (or anything Triton accepts
as a pointer) but this module imports only triton: it never sees torch. ``AOT_SPECS`` lists the
default configurations for ahead-of-time compilation (``rlkern aot-report``); it is derived
from the same :func:`launch_config` the launchers use, so the two cannot drift.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import triton
import triton.language as tl

from rlkern.kernels._common import (
    AOT_DTYPES,
    LN2,
    LOG2E,
    LOWEST,
    aot_signature,
    aot_spec,
    row_scales,
    split_inv_temperature,
)

#: Rows with |lse| at or above this bound recompute their normaliser in the backward (the C++
#: kernels' ``rlkern::logprobs::kBwdLseBound``, csrc/include/rlkern/logprobs.h).
BWD_LSE_BOUND = tl.constexpr(256.0)

__all__ = ["AOT_SPECS", "LaunchConfig", "launch_config", "logprobs_bwd", "logprobs_fwd"]


# ---------------------------------------------------------------------------------------------
# Kernels (both in base-2 units, see kernels/_common.py)


@triton.jit
def row_summary(row_ptr, v_end, vocab, scale, acc: tl.constexpr, BLOCK_V: tl.constexpr,
                SEG_V: tl.constexpr, VEC: tl.constexpr, HAS_ENTROPY: tl.constexpr,
                HAS_STATS: tl.constexpr):
    """The per-segment summaries ``(m, s, t, u, rel, cnt)`` of logits ``[0, v_end)`` of a row
    (see the forward kernel's docstring); shared with the sampler (kernels/sample.py), whose
    raw log-probs are then this kernel's log-probs bit for bit."""
    NUM_SEGS: tl.constexpr = BLOCK_V // SEG_V
    REPS: tl.constexpr = SEG_V // VEC
    # The inner-loop trick: a chunk is read as a (REPS, NUM_SEGS, VEC) tile in which segment j
    # is the VEC-runs j, j + NUM_SEGS, ... — exactly the elements one thread holds when each
    # thread loads VEC contiguous logits at a time. Every reduction over a segment (axes 0 and
    # 2) then stays inside a thread: no shuffles, shared memory or barriers in the loop, and
    # moving a summary to a new max costs a few ops per segment instead of per element.
    # (Were the compiler to lay the tile out otherwise, results would not change: the
    # partition into segments is fixed by the indices, only its cost would.)
    tile = (tl.arange(0, REPS)[:, None, None] * (NUM_SEGS * VEC)
            + tl.arange(0, NUM_SEGS)[None, :, None] * VEC
            + tl.arange(0, VEC)[None, None, :])

    # Everything relative to the segment max m of the *raw* logits, scaled after the shift:
    # d = (x − m)·log₂e/T ≤ 0 neither overflows nor loses the differences of huge logits, at
    # any temperature (a product x·log₂e/T would, e.g. for x = 1e10 or T = 1e-10).
    m = tl.full((NUM_SEGS,), float("-inf"), acc)  # segment max of x; −inf while empty
    s = tl.zeros((NUM_SEGS,), acc)
    t = tl.zeros((NUM_SEGS,), acc)
    u = tl.zeros((NUM_SEGS,), acc)
    rel = tl.zeros((NUM_SEGS,), acc)  # Σ(x − m) over the segment (HAS_STATS)
    cnt = tl.zeros((NUM_SEGS,), acc)  # elements seen by the segment (HAS_STATS)
    for start in range(0, v_end, BLOCK_V):
        offs = start + tile
        in_vocab = offs < vocab
        # Padding lanes read as −inf: they add exp2(−inf) = 0 to s, t, u (rel masks them).
        x = tl.load(row_ptr + offs, mask=in_vocab, other=float("-inf")).to(acc)
        m_new = tl.maximum(m, tl.max(tl.max(x, axis=2), axis=0))
        # The shift: m', or 0 while the segment holds only −inf (x − (−inf) would be NaN).
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        # Move the summaries to the new reference: with δ = (m − m')·log₂e/T ≤ 0 and
        # α = exp2(δ), s ← α s, t ← α (t + δ s), u ← α² u. An empty summary is all zeros: it
        # takes δ = 0 (−inf − m' would make δ·s = −inf·0 = NaN).
        delta = tl.where(m == float("-inf"), 0.0, (m - ref) * scale)
        alpha = tl.exp2(delta)
        # Clamped so that a −inf logit gives w = 0 and w·d = 0 (the limit) rather than
        # 0·(−inf) = NaN, while a NaN logit (or +inf, for which x − m' = inf − inf) stays NaN
        # (a plain max would turn it into a silently ignored entry).
        r = x - ref[None, :, None]
        d = tl.maximum(r * scale, LOWEST, propagate_nan=tl.PropagateNan.ALL)
        w = tl.exp2(d)
        if HAS_ENTROPY:
            t = alpha * (t + delta * s) + tl.sum(tl.sum(w * d, axis=2), axis=0)
        if HAS_STATS:
            u = (alpha * alpha) * u + tl.sum(tl.sum(w * w, axis=2), axis=0)
            # Σ(x − m) moves with the reference too: + cnt·(m − m') (−inf if only −inf so far).
            rel = tl.where(cnt > 0, rel + cnt * (m - ref), rel)
            rel += tl.sum(tl.sum(tl.where(in_vocab, r, 0.0), axis=2), axis=0)
            cnt += tl.sum(tl.sum(in_vocab.to(acc), axis=2), axis=0)
        s = alpha * s + tl.sum(tl.sum(w, axis=2), axis=0)
        m = m_new

    return m, s, t, u, rel, cnt


@triton.jit
def merge_summaries(m, s, scale):
    """Merge the segment summaries onto the row max M: ``(row_m, row_ref, delta, beta, s_row,
    log2_s)`` (online_softmax.h's merge, all at once)."""
    row_m = tl.max(m, axis=0)
    row_ref = tl.where(row_m == float("-inf"), 0.0, row_m)  # M (0 for an all −inf row)
    delta = tl.where(m == float("-inf"), 0.0, (m - row_ref) * scale)  # empty: 0, as above
    beta = tl.exp2(delta)
    s_row = tl.sum(beta * s, axis=0)
    # An all −inf row has s_row = 0, so lse = −inf (Python raises on it, when checks are on).
    log2_s = tl.log2(s_row)
    return row_m, row_ref, delta, beta, s_row, log2_s


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr,  # (B, L, V) bf16/fp16/fp32/fp64, unit vocab stride
    labels_ptr,  # (B, L) int64, contiguous
    logprobs_ptr,  # (B, L) fp32 (fp64 for fp64 logits), contiguous; also fixes the acc dtype
    lse_ptr,  # (B, L) like logprobs
    entropy_ptr,  # (B, L) like logprobs; untouched unless HAS_ENTROPY
    self_certainty_ptr,  # (B, L) like logprobs; untouched unless HAS_STATS
    sum_p_sq_ptr,  # (B, L) like logprobs; untouched unless HAS_STATS
    seq_len,  # L
    vocab,  # V
    stride_logits_0,
    stride_logits_1,
    inv_temperature,  # 1 / T rounded to fp32: a runtime scalar (a constexpr recompiles per T)
    inv_temperature_lo,  # 1 / T − inv_temperature: restores 1 / T to ~48 bits for fp64 logits
    ignore_index,
    BLOCK_V: tl.constexpr,  # vocabulary chunk per loop iteration
    SEG_V: tl.constexpr,  # elements of a chunk summarised together (one thread's share)
    VEC: tl.constexpr,  # contiguous elements of a segment (one 16-byte load)
    HAS_ENTROPY: tl.constexpr,
    HAS_STATS: tl.constexpr,
):
    """One program per row: stream the row once in BLOCK_V chunks and write its statistics.

    The row is summarised as in online_softmax.h, but per *segment* rather than per row: every
    chunk is split into ``BLOCK_V / SEG_V`` segments and segment ``j`` of every chunk feeds
    summary ``j``, which keeps its own reference max ``m`` (raw logit units) and, in base-2
    units with ``d = (x − m)·log₂e/T``::

        s = Σ exp2(d),   t = Σ exp2(d)·d,   u = Σ exp2(2d)

    The summaries are merged once, after the loop, with the exact merge of online_softmax.h.
    """
    acc = logprobs_ptr.dtype.element_ty  # fp32, or fp64 for fp64 logits
    row = tl.program_id(0).to(tl.int64)
    b = row // seq_len
    l_idx = row - b * seq_len
    row_ptr = logits_ptr + (b * stride_logits_0 + l_idx * stride_logits_1)
    inv_t, scale = row_scales(inv_temperature, inv_temperature_lo, acc)  # scale: base 2

    label = tl.load(labels_ptr + row)
    row_valid = label != ignore_index
    # An ignored row runs the vocabulary loop zero times: its logits are never read.
    v_end = tl.where(row_valid, vocab, 0)

    m, s, t, u, rel, cnt = row_summary(row_ptr, v_end, vocab, scale, acc, BLOCK_V, SEG_V, VEC,
                                       HAS_ENTROPY, HAS_STATS)
    row_m, row_ref, delta, beta, s_row, log2_s = merge_summaries(m, s, scale)
    # lse = M/T + log s in natural units: only it can leave the float range (it is ±inf then).
    lse = tl.fma(row_ref, inv_t, log2_s * LN2)

    # The label's logit: one extra scalar load. An out-of-range label (not ignore_index) is
    # never dereferenced and yields NaN. logp = (x_y − M)·log₂e/T − log₂ s, formed like every
    # term of s, so a confident token (logp ≈ 0, lse large) keeps an error at the resolution
    # of 1, not of lse.
    label_ok = row_valid & (label >= 0) & (label < vocab)
    x_y = tl.load(row_ptr + label, mask=label_ok, other=float("nan"))
    logp = ((x_y.to(acc) - row_m) * scale - log2_s) * LN2

    zero = tl.zeros((), acc)
    tl.store(logprobs_ptr + row, tl.where(row_valid, logp, zero))
    tl.store(lse_ptr + row, tl.where(row_valid, lse, zero))
    if HAS_ENTROPY:
        # entropy = lse − E_p[z] = log s − t/s (both relative to M), base 2 → nats.
        t_row = tl.sum(beta * (t + delta * s), axis=0)
        entropy = (log2_s - t_row / s_row) * LN2
        tl.store(entropy_ptr + row, tl.where(row_valid, entropy, zero))
    if HAS_STATS:
        # self_certainty = lse − mean z = log s − mean(x − M)/T; NaN for an all −inf row.
        rel_row = tl.sum(tl.where(cnt > 0, rel + cnt * (m - row_m), 0.0), axis=0)
        # (in base 2: the scale, unlike 1/T, never rounds to 0, and 0·(−inf) would be NaN)
        self_certainty = (log2_s - scale * (rel_row / vocab)) * LN2
        sum_p_sq = tl.sum((beta * beta) * u, axis=0) / (s_row * s_row)
        tl.store(self_certainty_ptr + row, tl.where(row_valid, self_certainty, zero))
        tl.store(sum_p_sq_ptr + row, tl.where(row_valid, sum_p_sq, zero))


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr,  # (B, L, V) bf16/fp16/fp32/fp64, unit vocab stride
    labels_ptr,  # (B, L) int64, contiguous
    lse_ptr,  # (B, L) fp32 (fp64 for fp64 logits), contiguous; also fixes the acc dtype
    entropy_ptr,  # (B, L) like lse; read only when HAS_GRAD_ENT
    grad_logprobs_ptr,  # (B, L) like lse; read only when HAS_GRAD_LP
    grad_entropy_ptr,  # (B, L) like lse; read only when HAS_GRAD_ENT
    grad_lse_ptr,  # (B, L) like lse; read only when HAS_GRAD_LSE
    grad_logits_ptr,  # (B, L, V) dtype of logits, unit vocab stride; may alias logits_ptr
    seq_len,
    vocab,
    stride_logits_0,
    stride_logits_1,
    stride_grad_0,
    stride_grad_1,
    inv_temperature,
    inv_temperature_lo,
    ignore_index,
    BLOCK_V: tl.constexpr,
    HAS_GRAD_LP: tl.constexpr,
    HAS_GRAD_ENT: tl.constexpr,
    HAS_GRAD_LSE: tl.constexpr,
):
    """One program per row: recompute p from the saved lse and write the logit gradients.

    Each chunk is loaded, turned into gradients and stored before the next chunk, element by
    element, so ``grad_logits`` may alias ``logits`` (in-place backward).
    """
    acc = lse_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    b = row // seq_len
    l_idx = row - b * seq_len
    x_row = logits_ptr + (b * stride_logits_0 + l_idx * stride_logits_1)
    g_row = grad_logits_ptr + (b * stride_grad_0 + l_idx * stride_grad_1)

    label = tl.load(labels_ptr + row)
    row_valid = label != ignore_index
    zero = tl.zeros((), acc)
    lse = tl.where(row_valid, tl.load(lse_ptr + row), zero)  # whatever an ignored row holds
    inv_t, scale = row_scales(inv_temperature, inv_temperature_lo, acc)
    cols = tl.arange(0, BLOCK_V)
    # Logits are read in [0, read_end): the whole row, or nothing for an ignored row.
    read_end = tl.where(row_valid, vocab, 0)

    # p_v = exp2((x_v − shift)·log₂e/T − ref₂). With a moderate lse (the usual case) the
    # shift is 0 and ref₂ = lse·log₂e: its float rounding moves p by |lse|·2⁻²⁴ at most. Past
    # BWD_LSE_BOUND (huge logits, a tiny temperature, an lse that overflowed) the row's max M
    # and normaliser are recomputed (two more reads of the row) and p is formed relative to M,
    # exactly: shift = M, ref₂ = log₂ s, E_p[z'] = t/s with z' = (x − M)/T.
    shift = zero
    ref2 = lse * LOG2E
    e_z = zero  # E_p[z'] (natural units), needed for an entropy gradient
    if HAS_GRAD_ENT:
        e_z = lse - tl.where(row_valid, tl.load(entropy_ptr + row), zero)
    # A NaN (or +inf) row: its outputs, hence its gradient, are NaN.
    label_in_range = (label >= 0) & (label < vocab)
    undefined = lse != lse
    if row_valid & ~(tl.abs(lse) < BWD_LSE_BOUND) & ~undefined:
        mx = tl.full((BLOCK_V,), float("-inf"), acc)
        for start in range(0, vocab, BLOCK_V):
            offs = start + cols
            x = tl.load(x_row + offs, mask=offs < vocab, other=float("-inf")).to(acc)
            mx = tl.maximum(mx, x, propagate_nan=tl.PropagateNan.ALL)
        row_m = tl.max(mx, axis=0)
        sv = tl.zeros((BLOCK_V,), acc)
        tv = tl.zeros((BLOCK_V,), acc)
        for start in range(0, vocab, BLOCK_V):
            offs = start + cols
            x = tl.load(x_row + offs, mask=offs < vocab, other=float("-inf")).to(acc)
            d = tl.maximum((x - row_m) * scale, LOWEST, propagate_nan=tl.PropagateNan.ALL)
            w = tl.exp2(d)
            sv += w
            tv += w * d
        s_row = tl.sum(sv, axis=0)
        # An all −inf row (s = 0, M = −inf) or a NaN one has no gradient.
        undefined = ~(s_row > 0) | (row_m == float("-inf"))
        shift = row_m
        ref2 = tl.log2(s_row)
        e_z = tl.sum(tv, axis=0) / s_row * LN2
    # Per-row constants. With z'_v = (x_v − shift)/T the gradient is
    #   grad_v = p_v · (g_ent/T · (E_p[z'] − z'_v) + c) + 1[v = y] · g_lp/T,
    #   c      = (g_lse − g_lp)/T
    # : one exp2 and two FMAs per element. E_p[z'] − z'_v is formed first, so it cancels
    # exactly where it should (a row of one logit: 0). An ignored row has every constant forced
    # to 0 (its upstream gradients may be anything, even NaN) and its logits are not read:
    # every p_v is then exp2(−inf) = 0 and the row's gradient is exactly 0.
    c = zero
    g_lp = zero
    g_ent = zero
    if HAS_GRAD_LP:
        g_lp = tl.where(row_valid, tl.load(grad_logprobs_ptr + row), zero)
        c -= g_lp
    if HAS_GRAD_ENT:
        g_ent = tl.where(row_valid, tl.load(grad_entropy_ptr + row), zero)
    if HAS_GRAD_LSE:
        c += tl.load(grad_lse_ptr + row)
    c = tl.where(row_valid, c, zero) * inv_t
    g_lp = g_lp * inv_t
    g_ent = g_ent * inv_t

    # The label as a 32-bit column index (−1 when out of range: it then matches no column, and
    # nothing is read out of bounds); compared against the chunk's own columns, so the inner
    # loop does one 32-bit compare per element instead of 64-bit ones.
    label_col = tl.where(label_in_range, label, -1).to(tl.int32)
    for start in range(0, vocab, BLOCK_V):
        offs = start + cols
        x = tl.load(x_row + offs, mask=offs < read_end, other=float("-inf")).to(acc)
        r = x - shift
        p = tl.exp2(tl.fma(r, scale, -ref2))
        if HAS_GRAD_ENT:
            # Where p = 0 (a −inf logit) the term is 0 (the limit), not 0·(±inf) = NaN; a NaN
            # p (NaN logit or lse) stays NaN.
            grad = tl.where(p > 0, p * tl.fma(e_z - r * inv_t, g_ent, c), p * (g_ent + c))
        else:
            grad = p * c
        if HAS_GRAD_LP:
            grad = tl.where(cols == label_col - start, grad + g_lp, grad)
        grad = tl.where(undefined, float("nan"), grad)
        tl.store(g_row + offs, grad.to(grad_logits_ptr.dtype.element_ty), mask=offs < vocab)


# ---------------------------------------------------------------------------------------------
# Launch heuristics

class LaunchConfig(NamedTuple):
    """Compile-time shape of a launch: ``block_v`` logits per loop iteration over
    ``num_warps`` warps; in the forward, segments of ``seg_v`` logits (one thread's share,
    summarised together) made of runs of ``vec`` contiguous logits (one 16-byte load)."""

    block_v: int
    seg_v: int
    vec: int
    num_warps: int


# 32 bytes of logits per thread per iteration (two 16-byte loads) keeps enough bytes in flight
# per SM with few registers; 4096 logits per iteration bounds the (rare) padding work for
# small vocabularies and the per-row prologue/epilogue for large ones.
_BYTES_PER_THREAD = 32
_MAX_BLOCK_V = 4096
_MAX_WARPS = 16


def launch_config(vocab: int, element_size: int) -> LaunchConfig:
    """Launch shape for rows of ``vocab`` logits of ``element_size`` bytes (both kernels).

    ``block_v = clamp(next_pow2(V), 16, 4096)``; each thread takes ``32 / element_size``
    logits per iteration (16 for bf16/fp16, 8 for fp32), which fixes ``num_warps`` (1 to 16;
    bf16 at V = 151936: 8 warps); ``seg_v = block_v / (32·num_warps)``;
    ``vec = min(16 / element_size, seg_v)``. A function of ``V`` and the dtype only, never of
    the number of rows (batch invariance).
    """
    size = max(element_size, 1)
    per_thread = max(1, _BYTES_PER_THREAD // size)
    if vocab % 16:
        # Triton proves row alignment only from strides divisible by 16 (its specialisation
        # of integer arguments), so such rows are read with scalar loads; 16 of them in flight
        # per thread cost registers (spills at V = 1000 bf16): take half as many per thread.
        per_thread = max(1, per_thread // 2)
    block_v = max(16, min(triton.next_power_of_2(max(vocab, 1)), _MAX_BLOCK_V))
    num_warps = max(1, min(_MAX_WARPS, block_v // (32 * per_thread)))
    seg_v = max(1, block_v // (32 * num_warps))
    vec = max(1, min(16 // size, seg_v))
    return LaunchConfig(block_v, seg_v, vec, num_warps)


# ---------------------------------------------------------------------------------------------
# Launchers


def logprobs_fwd(
    logits3: Any,
    labels2: Any,
    logprobs: Any,
    lse: Any,
    entropy: Any | None,
    self_certainty: Any | None,
    sum_p_sq: Any | None,
    *,
    temperature: float,
    ignore_index: int,
) -> None:
    """Fill the per-row outputs of ``token_logprobs`` (ALGORITHMS.md §1).

    Args:
        logits3: ``(B, L, V)`` bf16 / fp16 / fp32 / fp64, ``stride(2) == 1``, any other strides.
        labels2: ``(B, L)`` int64, contiguous; each in ``[0, V)`` or ``ignore_index``.
        logprobs, lse: ``(B, L)`` contiguous outputs, fp32 (fp64 for fp64 logits).
        entropy: like ``logprobs``, or ``None`` (not computed).
        self_certainty, sum_p_sq: like ``logprobs``, both given or both ``None``.
        temperature: ``T > 0``; the kernel multiplies by ``1/T`` (a runtime scalar).
        ignore_index: rows with this label get 0 in every output and are not read.

    An out-of-range label gives NaN in ``logprobs`` (never an out-of-bounds read); an all
    ``−inf`` row gives ``lse = −inf``. The caller validates both when checks are on.
    """
    if (self_certainty is None) != (sum_p_sq is None):
        raise ValueError("self_certainty and sum_p_sq must be given together (or both None)")
    n_batch, seq_len, vocab = logits3.shape
    if n_batch * seq_len == 0:
        return
    cfg = launch_config(vocab, logits3.element_size())
    has_entropy = entropy is not None
    has_stats = self_certainty is not None
    _logprobs_fwd_kernel[(n_batch * seq_len,)](
        logits3, labels2, logprobs, lse,
        entropy if has_entropy else lse,  # placeholders are never touched (flags are off)
        self_certainty if has_stats else lse,
        sum_p_sq if has_stats else lse,
        seq_len, vocab, logits3.stride(0), logits3.stride(1),
        *split_inv_temperature(temperature), int(ignore_index),
        BLOCK_V=cfg.block_v, SEG_V=cfg.seg_v, VEC=cfg.vec,
        HAS_ENTROPY=has_entropy, HAS_STATS=has_stats,
        num_warps=cfg.num_warps,
    )


def logprobs_bwd(
    logits3: Any,
    labels2: Any,
    lse: Any,
    entropy: Any | None,
    grad_logprobs: Any | None,
    grad_entropy: Any | None,
    grad_lse: Any | None,
    grad_logits3: Any,
    *,
    temperature: float,
    ignore_index: int,
) -> None:
    """Write ``∂(g_lp·logp + g_ent·entropy + g_lse·lse)/∂logits`` into ``grad_logits3``.

    Per element, with ``p_v = exp(z_v − lse)`` and ``E_p[z] = lse − entropy``::

        grad_v = [ g_lp (1[v = y] − p_v) + g_ent p_v (E_p[z] − z_v) + g_lse p_v ] / T

    Args:
        logits3: ``(B, L, V)`` as in :func:`logprobs_fwd`.
        labels2: ``(B, L)`` int64, contiguous.
        lse: ``(B, L)`` fp32 (fp64 for fp64 logits), contiguous, from the forward.
        entropy: like ``lse``; required when ``grad_entropy`` is given.
        grad_logprobs, grad_entropy, grad_lse: like ``lse``, or ``None`` (no such term).
        grad_logits3: ``(B, L, V)`` dtype of ``logits3``, ``stride(2) == 1``, own strides; may
            be ``logits3`` itself (in-place backward).
        temperature, ignore_index: as in the forward. Ignored rows get a zero gradient row.
    """
    if grad_entropy is not None and entropy is None:
        raise ValueError("grad_entropy needs the forward's entropy")
    n_batch, seq_len, vocab = logits3.shape
    if n_batch * seq_len == 0 or vocab == 0:
        return
    cfg = launch_config(vocab, logits3.element_size())
    _logprobs_bwd_kernel[(n_batch * seq_len,)](
        logits3, labels2, lse,
        entropy if entropy is not None else lse,  # placeholders are never read
        grad_logprobs if grad_logprobs is not None else lse,
        grad_entropy if grad_entropy is not None else lse,
        grad_lse if grad_lse is not None else lse,
        grad_logits3,
        seq_len, vocab, logits3.stride(0), logits3.stride(1),
        grad_logits3.stride(0), grad_logits3.stride(1),
        *split_inv_temperature(temperature), int(ignore_index),
        BLOCK_V=cfg.block_v,
        HAS_GRAD_LP=grad_logprobs is not None,
        HAS_GRAD_ENT=grad_entropy is not None,
        HAS_GRAD_LSE=grad_lse is not None,
        num_warps=cfg.num_warps,
    )


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation specs (consumed by rlkern.aot)

# The vocabularies the default configs are taken at: Qwen2/3 (151936) and a small one.
_AOT_VOCABS = (151936, 1000)


def _aot_specs() -> list[dict[str, Any]]:
    """The default configurations, as ``launch_config`` picks them at ``_AOT_VOCABS``.

    Per (vocab, dtype): the forward with entropy (TRL's and verl's default), the forward with
    every output (the most live accumulators), and the backward with every gradient term.
    ``divisible_by_16`` lists the args Triton's launcher would specialise as 16-divisible for
    a contiguous ``(B, L, V)`` batch (pointers always; V and the row strides when 16 | V), which
    decides whether loads are vectorised.

    Keys: ``name``, ``fn`` (the JIT function), ``signature`` (arg name → Triton type string,
    ``"constexpr"`` for constexprs), ``constexprs``, ``num_warps``, ``divisible_by_16``.
    """
    specs: list[dict[str, Any]] = []
    scalars = {"labels_ptr": "*i64", "seq_len": "i32", "vocab": "i32",
               "stride_logits_0": "i64", "stride_logits_1": "i32",
               "stride_grad_0": "i64", "stride_grad_1": "i32",
               "inv_temperature": "fp32", "inv_temperature_lo": "fp32", "ignore_index": "i32"}
    fwd_flags = {"entropy": {"HAS_ENTROPY": True, "HAS_STATS": False},
                 "entropy+stats": {"HAS_ENTROPY": True, "HAS_STATS": True}}
    bwd_flags = {"lp+ent+lse": {"HAS_GRAD_LP": True, "HAS_GRAD_ENT": True,
                                "HAS_GRAD_LSE": True}}
    for vocab in _AOT_VOCABS:
        for dtype, size in AOT_DTYPES:
            cfg = launch_config(vocab, size)
            types = {**scalars, "logits_ptr": f"*{dtype}", "grad_logits_ptr": f"*{dtype}"}
            for fn, flag_sets in ((_logprobs_fwd_kernel, fwd_flags),
                                  (_logprobs_bwd_kernel, bwd_flags)):
                signature = aot_signature(fn, types, lambda name: "*fp32")  # other pointers
                divisible = [n for n in signature if n.endswith("_ptr")]
                if vocab % 16 == 0:
                    divisible += [n for n in signature if n == "vocab" or n.startswith("stride")]
                for label, flags in flag_sets.items():
                    constexprs = {"BLOCK_V": cfg.block_v, **flags}
                    if fn is _logprobs_fwd_kernel:
                        constexprs.update(SEG_V=cfg.seg_v, VEC=cfg.vec)
                    specs.append(aot_spec(f"{dtype} V={vocab} {label} BLOCK_V={cfg.block_v}",
                                          fn, signature, constexprs, cfg.num_warps, divisible))
    return specs


AOT_SPECS: list[dict[str, Any]] = _aot_specs()
