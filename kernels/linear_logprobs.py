"""Triton kernels for token logprobs straight from hidden states and the LM head
(ALGORITHMS.md §1, "Fused linear form"): GEMM tiles with an online-softmax epilogue.

For row ``i`` with hidden state ``h_i`` (length ``H``), label ``y`` and temperature ``T``::

    x_iv   = h_i · W_v (+ b_v)                  logits, formed tile by tile, never stored
    z_iv   = x_iv / T                           (computed as x · (1/T), 1/T a runtime scalar)
    lse_i  = log Σ_v exp(z_iv)
    logp_i = z_iy − lse_i
    ent_i  = lse_i − Σ_v p_iv z_iv,             p_iv = exp(z_iv − lse_i)

and for the backward, with upstream gradients ``g_lp``, ``g_ent``, ``g_lse`` per row::

    dZ_iv = [ g_lp (1[v = y] − p_iv) + g_ent p_iv (E_p[z] − z_iv) + g_lse p_iv ] / T,
    E_p[z] = lse − entropy,
    ∂h = dZ W,   ∂W = dZᵀ h,   ∂b = Σ_rows dZ.

The ``(N, V)`` logits never exist in memory: each program forms a ``(BLOCK_M, BLOCK_N)`` logits
tile in registers with ``tl.dot`` over ``K = H`` in ``BLOCK_K`` steps (fp32 accumulation) and
consumes it at once.

Forward (two kernels). Grid ``(row blocks, vocab splits)``: a program streams its vocabulary
range in ``BLOCK_N``-wide tiles and folds every tile into per-row online-softmax summaries
(Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"; the summary and merge
of ``csrc/include/rlkern/online_softmax.h``)::

    m = max z,   s = Σ exp(z − m),   t = Σ exp(z − m)(z − m)

written per (split, row) to a small fp32 scratch together with the label's logit (kept by
the split that owns the label). A second tiny kernel merges the splits of each row in a fixed
order and writes ``logp = z_y − lse``, ``lse = m + log s``, ``entropy = log s − t/s``.

Backward (deterministic, three kernels). Every logits tile is recomputed from ``h`` and ``W``
and turned into ``dZ`` in registers; then

* ``_linear_logprobs_bwd_dh_kernel`` (grid ``(row blocks, vocab splits)``) accumulates
  ``dZ @ W_tile`` into the program's own slice of a per-split fp32 buffer and
  ``_sum_splits_kernel`` adds the splits into ``grad_hidden`` in a fixed order;
* ``_linear_logprobs_bwd_dw_kernel`` (grid: vocab tiles) owns ``BLOCK_N`` rows of ``∂W`` and
  the matching ``∂b``, loops over all row blocks in order and accumulates ``dZᵀ @ h_tile``.

Every fp32 element is thus updated by exactly one program in a fixed order: the gradients are
bitwise reproducible run to run (no atomics). The price is one more recompute of the logits
than an atomic scheme (the dh and dW passes each form the tiles: 8·N·H·V backward FLOPs
instead of 6·N·H·V). Both schemes move the same fp32 accumulator bytes — every tile
read-modify-writes ``(BLOCK_M + BLOCK_N)·H`` accumulator elements, atomically or not — and
that traffic, not the tensor-core work, bounds the backward at LM-head shapes, so the extra
recompute costs little wall time; see :func:`bwd_config`.

Units: the epilogues work in base 2, ``z₂ = x · (log₂e / T)``, so that ``exp(z − m)`` is one
``exp2`` of a difference (as in ``kernels/logprobs.py``); per-row results are converted back
with one multiply by ``ln 2``.

Layouts: ``hidden (N, H)`` and ``weight (V, H)`` with unit last-dim stride and any row stride;
offsets are 64-bit (``N·H``, ``V·H`` may exceed 2³¹). This module imports only triton; the
launchers take torch tensors (anything with ``shape``, ``stride()``, ``element_size()`` and, for
the scratch buffers, ``new_empty`` / ``new_zeros``) but never import torch.
"""

from __future__ import annotations

import os
import struct
from typing import Any, NamedTuple

import triton
import triton.language as tl

__all__ = [
    "AOT_SPECS",
    "LinearBwdConfig",
    "LinearLaunchConfig",
    "bwd_config",
    "fwd_config",
    "linear_logprobs_bwd",
    "linear_logprobs_fwd",
]

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
# The lowest finite float32: z − m is clamped to it so that a padding column (−inf) gives
# w = exp2(·) = 0 and w·(z − m) = 0 instead of 0·(−inf) = NaN (NaN still propagates).
_LOWEST = tl.constexpr(-3.4028234663852886e38)
# Fields of the forward scratch, stored as (splits, _STATS, N) so each field is contiguous:
# m₂, s, t, z₂ of the label (the last valid only in the split that owns the label).
_N_STATS = 4
_STATS = tl.constexpr(_N_STATS)


# ---------------------------------------------------------------------------------------------
# Shared tile helpers


@triton.jit
def _mma(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """``acc + a @ b`` on tensor cores (fp32 or fp64 accumulator ``acc``).

    ``UPCAST_DOT`` is for Triton's interpreter only: its ``tl.dot`` multiplies the raw bit
    patterns of bf16 operands (it stores bf16 as uint16; triton-lang/triton#11584), so 16-bit
    operands are widened to fp32 first — exact, and products of 16-bit floats are exact in
    fp32, so the result matches a 16-bit tensor-core product up to summation order.
    """
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _logits_tile(
    hidden_ptr, weight_ptr, bias_ptr, rows64, row_ok, cols, col_ok, hidden_size,
    stride_hidden_0, stride_weight_0,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """``x = h[rows] W[cols]ᵀ (+ b[cols])`` as a ``(BLOCK_M, BLOCK_N)`` tile in ``ACC``.

    ``K = H`` is walked in ``BLOCK_K`` steps, each one ``tl.dot`` accumulating into ``x``
    (fp32 for bf16/fp16/fp32 inputs, fp64 for fp64). Rows, columns and ``K`` beyond the
    bounds load as 0, so out-of-range entries of the tile are finite (callers mask them).
    """
    kk = tl.arange(0, BLOCK_K)
    h_ptrs = hidden_ptr + (rows64[:, None] * stride_hidden_0 + kk[None, :])
    # W is read as a (BLOCK_K, BLOCK_N) tile, i.e. already transposed: contiguous along K.
    w_ptrs = weight_ptr + (cols.to(tl.int64)[None, :] * stride_weight_0 + kk[:, None])
    x = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for k0 in range(0, hidden_size, BLOCK_K):
        k_ok = kk < hidden_size - k0
        h = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        x = _mma(h, w, x, INPUT_PRECISION, UPCAST_DOT)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        x += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    return x


@triton.jit
def _row_grad_consts(
    labels_ptr, lse_ptr, entropy_ptr, grad_logprobs_ptr, grad_entropy_ptr, grad_lse_ptr,
    rows64, row_ok, vocab, ignore_index, inv_t,
    ACC: tl.constexpr, HAS_GRAD_LP: tl.constexpr, HAS_GRAD_ENT: tl.constexpr,
    HAS_GRAD_LSE: tl.constexpr,
):
    """Per-row constants of the logit gradient (as in kernels/logprobs.py's backward).

    With ``z = x / T`` the gradient of one logit is
    ``dZ_v = p_v · (c − g_ent·x_v / T²) [+ g_lp / T at v = y]`` with
    ``c = (g_lse − g_lp + g_ent·E_p[z]) / T`` and ``p_v = exp2(x_v·log₂e/T − lse·log₂e)``.

    Returns ``(live, label_col, lse₂, c, g_lp / T, g_ent / T²)``: ``live`` marks rows inside
    the batch that are not ``ignore_index`` (every other row gets a zero gradient row whatever
    its upstream gradients hold, NaN included); ``label_col`` is the label as an int32 column
    index, −1 when out of range, so it matches no column and is never dereferenced.
    """
    label = tl.load(labels_ptr + rows64, mask=row_ok, other=ignore_index)
    live = row_ok & (label != ignore_index)
    lse = tl.load(lse_ptr + rows64, mask=live, other=0.0).to(ACC)
    c = tl.zeros(lse.shape, ACC)
    g_lp = tl.zeros(lse.shape, ACC)
    g_ent = tl.zeros(lse.shape, ACC)
    if HAS_GRAD_LP:
        g_lp = tl.load(grad_logprobs_ptr + rows64, mask=live, other=0.0).to(ACC)
        c -= g_lp
    if HAS_GRAD_ENT:
        g_ent = tl.load(grad_entropy_ptr + rows64, mask=live, other=0.0).to(ACC)
        c += g_ent * (lse - tl.load(entropy_ptr + rows64, mask=live, other=0.0).to(ACC))
    if HAS_GRAD_LSE:
        c += tl.load(grad_lse_ptr + rows64, mask=live, other=0.0).to(ACC)
    label_col = tl.where(live & (label >= 0) & (label < vocab), label, -1).to(tl.int32)
    return live, label_col, lse * _LOG2E, c * inv_t, g_lp * inv_t, g_ent * (inv_t * inv_t)


@triton.jit
def _dlogits_tile(
    x, cols, col_ok, live, label_col, lse2, c, g_lp, g_ent, scale,
    HAS_GRAD_LP: tl.constexpr, HAS_GRAD_ENT: tl.constexpr,
):
    """``dZ`` of one logits tile ``x`` (raw logits, before 1/T): one exp2 and two FMAs per
    element. Entries outside the batch, the vocabulary or on ignored rows are exactly 0 (their
    recomputed logits are finite but meaningless: exp2 of them may overflow)."""
    p = tl.exp2(tl.fma(x, scale, -lse2[:, None]))
    if HAS_GRAD_ENT:
        dz = p * tl.fma(x, -g_ent[:, None], c[:, None])
    else:
        dz = p * c[:, None]
    if HAS_GRAD_LP:
        dz = tl.where(cols[None, :] == label_col[:, None], dz + g_lp[:, None], dz)
    return tl.where(live[:, None] & col_ok[None, :], dz, 0.0)


# ---------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _linear_logprobs_fwd_kernel(
    hidden_ptr,  # (N, H) bf16/fp16/fp32/fp64, unit last stride
    weight_ptr,  # (V, H) same dtype, unit last stride
    bias_ptr,  # (V,) same dtype, contiguous; read only when HAS_BIAS
    labels_ptr,  # (N,) int64, contiguous
    stats_ptr,  # (splits, 4, N) fp32 (fp64 for fp64 inputs) scratch; fixes the acc dtype
    n_rows,  # N
    vocab,  # V
    hidden_size,  # H
    split_cols,  # vocabulary columns per split (a multiple of BLOCK_N)
    stride_hidden_0,
    stride_weight_0,
    inv_temperature,  # 1 / T rounded to fp32: a runtime scalar (a constexpr recompiles per T)
    inv_temperature_lo,  # 1 / T − inv_temperature: restores 1 / T to ~48 bits for fp64
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,  # tl.dot precision for fp32 inputs (ignored otherwise)
    UPCAST_DOT: tl.constexpr,  # interpreter only (see _mma)
):
    """Program ``(i, j)``: rows ``[i·BLOCK_M, (i+1)·BLOCK_M)`` × vocabulary split ``j``
    (columns ``[j·split_cols, min(V, (j+1)·split_cols))``, never empty). Writes the split's
    per-row ``(m₂, s, t, z₂_y)`` to ``stats[j]``, base-2 units::

        m₂ = max z₂,   s = Σ exp2(z₂ − m₂),   t = Σ exp2(z₂ − m₂)(z₂ − m₂),   z₂ = x·log₂e/T

    ``z₂_y`` is the label's scaled logit when the label lies in this split (else 0, unused).
    """
    ACC: tl.constexpr = stats_ptr.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    # Triton passes float scalars as fp32; the low part matters only for fp64.
    inv_t = tl.cast(inv_temperature, ACC) + tl.cast(inv_temperature_lo, ACC)
    scale = inv_t * _LOG2E
    # Out-of-batch rows get a label that matches no column (they are never stored anyway).
    labels = tl.load(labels_ptr + rows64, mask=row_ok, other=-1)

    v_begin = pid_s * split_cols
    v_end = tl.minimum(vocab, v_begin + split_cols)
    m = tl.full((BLOCK_M,), float("-inf"), ACC)  # running max of z₂ (−inf while empty)
    s = tl.zeros((BLOCK_M,), ACC)
    t = tl.zeros((BLOCK_M,), ACC)
    z_y = tl.zeros((BLOCK_M,), ACC)
    for v0 in range(v_begin, v_end, BLOCK_N):
        cols = v0 + tl.arange(0, BLOCK_N)
        col_ok = cols < v_end
        x = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows64, row_ok, cols, col_ok,
                         hidden_size, stride_hidden_0, stride_weight_0, ACC, BLOCK_M, BLOCK_N,
                         BLOCK_K, HAS_BIAS, INPUT_PRECISION, UPCAST_DOT)
        # Padding columns become −inf: they add exp2(−inf) = 0 below. A matmul never yields
        # −inf itself, so every tile (non-empty by construction) has a finite max per row
        # unless the inputs hold inf/NaN, which then propagate to that row only.
        z2 = tl.where(col_ok[None, :], x * scale, float("-inf"))
        # The label's logit: exactly one tile of one split matches, so the sum is exact.
        z_y += tl.sum(tl.where(cols[None, :] == labels[:, None], z2, 0.0), axis=1)
        # Online softmax (Milakov & Gimelshein 2018): move the running summary to the new
        # max. With δ = m − m' ≤ 0 and α = exp2(δ): s ← α s, t ← α (t + δ s), since
        # exp2(z − m') = α·exp2(z − m) and z − m' = (z − m) + δ. An empty summary (m = −inf,
        # s = t = 0) takes δ = 0: −inf − m' would make δ·s = −inf·0 = NaN.
        m_new = tl.maximum(m, tl.max(z2, axis=1))
        delta = tl.where(m == float("-inf"), 0.0, m - m_new)
        alpha = tl.exp2(delta)
        d = tl.maximum(z2 - m_new[:, None], _LOWEST, propagate_nan=tl.PropagateNan.ALL)
        w = tl.exp2(d)
        if HAS_ENTROPY:
            t = alpha * (t + delta * s) + tl.sum(w * d, axis=1)
        s = alpha * s + tl.sum(w, axis=1)
        m = m_new

    out = stats_ptr + (pid_s.to(tl.int64) * _STATS) * n_rows + rows64
    tl.store(out, m, mask=row_ok)
    tl.store(out + n_rows, s, mask=row_ok)
    if HAS_ENTROPY:
        tl.store(out + 2 * n_rows, t, mask=row_ok)
    tl.store(out + 3 * n_rows, z_y, mask=row_ok)


@triton.jit
def _linear_logprobs_merge_kernel(
    stats_ptr,  # (splits, 4, N) from the forward kernel
    labels_ptr,  # (N,) int64
    logprobs_ptr,  # (N,) fp32 (fp64 for fp64 inputs), contiguous
    lse_ptr,  # (N,) like logprobs
    entropy_ptr,  # (N,) like logprobs; untouched unless HAS_ENTROPY
    n_rows,
    vocab,
    n_splits,
    split_cols,
    ignore_index,
    BLOCK: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
):
    """Merge each row's split summaries in split order (online_softmax.h's exact merge) and
    write the per-row results. Ignored rows get 0; an out-of-range label (not ignore_index) is
    never used as an address and gives a NaN logprob."""
    ACC: tl.constexpr = stats_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    m = tl.full((BLOCK,), float("-inf"), ACC)
    s = tl.zeros((BLOCK,), ACC)
    t = tl.zeros((BLOCK,), ACC)
    src = stats_ptr + rows64  # split j's fields start at (j·4 + field)·N (64-bit pointer)
    for _ in range(0, n_splits):
        m_j = tl.load(src, mask=row_ok, other=float("-inf"))
        s_j = tl.load(src + n_rows, mask=row_ok, other=0.0)
        # Both summaries move to the common max M: δ = m − M, s' = e^δ s, t' = e^δ (t + δ s)
        # (base 2 here); an empty summary (s = 0) takes δ = 0 and stays empty.
        m_new = tl.maximum(m, m_j)
        d_a = tl.where(s == 0, 0.0, m - m_new)
        d_b = tl.where(s_j == 0, 0.0, m_j - m_new)
        a = tl.exp2(d_a)
        b = tl.exp2(d_b)
        if HAS_ENTROPY:
            t_j = tl.load(src + 2 * n_rows, mask=row_ok, other=0.0)
            t = a * (t + d_a * s) + b * (t_j + d_b * s_j)
        s = a * s + b * s_j
        m = m_new
        src += _STATS * n_rows

    label = tl.load(labels_ptr + rows64, mask=row_ok, other=ignore_index)
    valid = label != ignore_index
    label_ok = valid & (label >= 0) & (label < vocab)
    owner = tl.where(label_ok, label // split_cols, 0)  # the split whose range holds y
    z_y = tl.load(stats_ptr + (owner * _STATS + 3) * n_rows + rows64, mask=row_ok & label_ok,
                  other=float("nan"))
    log2_s = tl.log2(s)
    # logp = (z₂_y − m₂) − log₂ s: the max cancels before the rounding of lse enters, so a
    # confident token (logp ≈ 0, lse large) keeps an error at the resolution of 1.
    logp = ((z_y - m) - log2_s) * _LN2
    zero = tl.zeros((BLOCK,), ACC)
    tl.store(logprobs_ptr + rows64, tl.where(valid, logp, zero), mask=row_ok)
    tl.store(lse_ptr + rows64, tl.where(valid, (m + log2_s) * _LN2, zero), mask=row_ok)
    if HAS_ENTROPY:
        # entropy = lse − E_p[z] = log s − t / s (both relative to m).
        entropy = (log2_s - t / s) * _LN2
        tl.store(entropy_ptr + rows64, tl.where(valid, entropy, zero), mask=row_ok)


# ---------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _linear_logprobs_bwd_dh_kernel(
    hidden_ptr,  # (N, H)
    weight_ptr,  # (V, H)
    bias_ptr,  # (V,); read only when HAS_BIAS
    labels_ptr,  # (N,) int64
    lse_ptr,  # (N,) fp32 (fp64 for fp64 inputs) from the forward; fixes the acc dtype
    entropy_ptr,  # (N,) like lse; read only when HAS_GRAD_ENT
    grad_logprobs_ptr,  # (N,) like lse; read only when HAS_GRAD_LP
    grad_entropy_ptr,  # (N,) like lse; read only when HAS_GRAD_ENT
    grad_lse_ptr,  # (N,) like lse; read only when HAS_GRAD_LSE
    grad_hidden_ptr,  # (splits, N, H) contiguous, acc dtype: ∂h of each split, += into it
    n_rows,
    vocab,
    hidden_size,
    split_cols,
    stride_hidden_0,
    stride_weight_0,
    inv_temperature,
    inv_temperature_lo,
    ignore_index,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_GRAD_LP: tl.constexpr,
    HAS_GRAD_ENT: tl.constexpr,
    HAS_GRAD_LSE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """Program ``(i, j)``: ``grad_hidden[j, rows_i] += Σ_{tiles of split j} dZ_tile W_tile``.

    Only this program touches ``grad_hidden[j, rows_i, :]``, tile after tile in order, so the
    read-modify-write needs no atomics and is deterministic. ``dZ`` is rounded to the weight
    dtype for the tensor-core product (as the CPU path rounds its logits tile).
    """
    ACC: tl.constexpr = lse_ptr.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    inv_t = tl.cast(inv_temperature, ACC) + tl.cast(inv_temperature_lo, ACC)
    scale = inv_t * _LOG2E
    live, label_col, lse2, c, g_lp, g_ent = _row_grad_consts(
        labels_ptr, lse_ptr, entropy_ptr, grad_logprobs_ptr, grad_entropy_ptr, grad_lse_ptr,
        rows64, row_ok, vocab, ignore_index, inv_t, ACC, HAS_GRAD_LP, HAS_GRAD_ENT,
        HAS_GRAD_LSE)

    kk = tl.arange(0, BLOCK_K)
    gh_rows = grad_hidden_ptr + (pid_s.to(tl.int64) * n_rows + rows64[:, None]) * hidden_size
    v_begin = pid_s * split_cols
    v_end = tl.minimum(vocab, v_begin + split_cols)
    for v0 in range(v_begin, v_end, BLOCK_N):
        cols = v0 + tl.arange(0, BLOCK_N)
        col_ok = cols < v_end
        x = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows64, row_ok, cols, col_ok,
                         hidden_size, stride_hidden_0, stride_weight_0, ACC, BLOCK_M, BLOCK_N,
                         BLOCK_K, HAS_BIAS, INPUT_PRECISION, UPCAST_DOT)
        dz = _dlogits_tile(x, cols, col_ok, live, label_col, lse2, c, g_lp, g_ent, scale,
                           HAS_GRAD_LP, HAS_GRAD_ENT).to(weight_ptr.dtype.element_ty)
        w_ptrs = weight_ptr + (cols.to(tl.int64)[:, None] * stride_weight_0 + kk[None, :])
        for k0 in range(0, hidden_size, BLOCK_K):
            k_ok = kk < hidden_size - k0
            w = tl.load(w_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            gh_ptrs = gh_rows + (k0 + kk)[None, :]
            gh_mask = row_ok[:, None] & k_ok[None, :]
            prev = tl.load(gh_ptrs, mask=gh_mask, other=0.0)
            # The running sum is the MMA accumulator: one fused update per element.
            tl.store(gh_ptrs, _mma(dz, w, prev, INPUT_PRECISION, UPCAST_DOT),
                     mask=gh_mask)
            w_ptrs += BLOCK_K
        # The next tile reads these accumulator elements back, possibly from other threads
        # of this program (the load and store layouts, and pipelined async copies, are the
        # compiler's choice): a CTA barrier makes this tile's stores visible to them first.
        tl.debug_barrier()


@triton.jit
def _linear_logprobs_bwd_dw_kernel(
    hidden_ptr,  # (N, H)
    weight_ptr,  # (V, H)
    bias_ptr,  # (V,); read only when HAS_BIAS
    labels_ptr,  # (N,) int64
    lse_ptr,  # (N,) fp32 (fp64 for fp64 inputs); fixes the acc dtype
    entropy_ptr,
    grad_logprobs_ptr,
    grad_entropy_ptr,
    grad_lse_ptr,
    grad_weight_ptr,  # (V, H) contiguous, acc dtype, += into it; used when HAS_GRAD_WEIGHT
    grad_bias_ptr,  # (V,) contiguous, acc dtype, += into it; used when HAS_GRAD_BIAS
    n_rows,
    vocab,
    hidden_size,
    stride_hidden_0,
    stride_weight_0,
    inv_temperature,
    inv_temperature_lo,
    ignore_index,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_GRAD_LP: tl.constexpr,
    HAS_GRAD_ENT: tl.constexpr,
    HAS_GRAD_LSE: tl.constexpr,
    HAS_GRAD_WEIGHT: tl.constexpr,
    HAS_GRAD_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """Program ``j`` owns vocabulary rows ``cols_j`` of ``∂W`` and ``∂b`` and walks all row
    blocks in order: ``grad_weight[cols_j] += Σ_i dZ_ijᵀ h_i``, ``grad_bias[cols_j] += Σ dZ``.
    No other program writes these elements, so no atomics and a fixed summation order."""
    ACC: tl.constexpr = lse_ptr.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < vocab
    cols64 = cols.to(tl.int64)
    inv_t = tl.cast(inv_temperature, ACC) + tl.cast(inv_temperature_lo, ACC)
    scale = inv_t * _LOG2E
    kk = tl.arange(0, BLOCK_K)
    gb = tl.zeros((BLOCK_N,), ACC)
    for r0 in range(0, n_rows, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        rows64 = rows.to(tl.int64)
        live, label_col, lse2, c, g_lp, g_ent = _row_grad_consts(
            labels_ptr, lse_ptr, entropy_ptr, grad_logprobs_ptr, grad_entropy_ptr,
            grad_lse_ptr, rows64, row_ok, vocab, ignore_index, inv_t, ACC, HAS_GRAD_LP,
            HAS_GRAD_ENT, HAS_GRAD_LSE)
        x = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows64, row_ok, cols, col_ok,
                         hidden_size, stride_hidden_0, stride_weight_0, ACC, BLOCK_M, BLOCK_N,
                         BLOCK_K, HAS_BIAS, INPUT_PRECISION, UPCAST_DOT)
        dz = _dlogits_tile(x, cols, col_ok, live, label_col, lse2, c, g_lp, g_ent, scale,
                           HAS_GRAD_LP, HAS_GRAD_ENT)
        if HAS_GRAD_BIAS:
            gb += tl.sum(dz, axis=0)
        if HAS_GRAD_WEIGHT:
            dz_t = tl.trans(dz.to(hidden_ptr.dtype.element_ty))  # (BLOCK_N, BLOCK_M)
            h_ptrs = hidden_ptr + (rows64[:, None] * stride_hidden_0 + kk[None, :])
            gw_ptrs = grad_weight_ptr + (cols64[:, None] * hidden_size + kk[None, :])
            for k0 in range(0, hidden_size, BLOCK_K):
                k_ok = kk < hidden_size - k0
                h = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                gw_mask = col_ok[:, None] & k_ok[None, :]
                prev = tl.load(gw_ptrs, mask=gw_mask, other=0.0)
                tl.store(gw_ptrs, _mma(dz_t, h, prev, INPUT_PRECISION, UPCAST_DOT),
                         mask=gw_mask)
                h_ptrs += BLOCK_K
                gw_ptrs += BLOCK_K
            tl.debug_barrier()  # as in the ∂h kernel: the next row block reads these back
    if HAS_GRAD_BIAS:
        gb_ptrs = grad_bias_ptr + cols64
        tl.store(gb_ptrs, tl.load(gb_ptrs, mask=col_ok, other=0.0) + gb, mask=col_ok)


@triton.jit
def _sum_splits_kernel(
    partial_ptr,  # (splits, numel) contiguous
    out_ptr,  # (numel,) contiguous, same dtype: out += Σ_j partial[j]
    numel,
    n_splits,
    BLOCK: tl.constexpr,
):
    """``out += partial[0] + partial[1] + …`` elementwise, splits in order (deterministic)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    total = tl.load(out_ptr + offs, mask=ok, other=0.0)
    for j in range(0, n_splits):
        total += tl.load(partial_ptr + j * numel + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, total, mask=ok)


# ---------------------------------------------------------------------------------------------
# Launch heuristics


class LinearLaunchConfig(NamedTuple):
    """Compile-time shape of a launch: ``(block_m, block_n)`` logits tiles formed in
    ``block_k`` steps of ``H`` by ``num_warps`` warps with ``num_stages`` pipelined loads;
    ``split_cols`` vocabulary columns per split (a multiple of ``block_n``)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_cols: int


class LinearBwdConfig(NamedTuple):
    """Launch shapes of the backward's two passes: ``dh`` (its ``split_cols`` cuts the
    vocabulary into the ∂h splits) and ``dw`` (one program per ``block_n`` vocabulary rows;
    its ``split_cols`` is unused)."""

    dh: LinearLaunchConfig
    dw: LinearLaunchConfig


# Tiles of 128 × 128 logits are the usual tensor-core GEMM tile: 64 fp32 accumulators per
# thread over 8 warps, and with BLOCK_K = 64 (bf16/fp16) three pipeline stages take
# 3 · (128 + 128) · 64 · 2 B = 96 KiB of shared memory, which fits sm_80 (164 KiB) and sm_90.
# Register counts of these defaults are in the AOT report (all without spills on sm_90).
_MAX_BLOCK = 128
_BWD_SHORT = 64  # the backward tiles hold a second product: one side is halved (see bwd_config)
_MAX_SPLITS = 64  # forward: vocabulary splits (parallelism for few rows; a tiny merge)
_BWD_PROGRAMS = 256  # backward ∂h pass: target programs (about two per SM on an H100)
_BWD_PARTIAL_BYTES = 1 << 28  # cap on the per-split ∂h buffers (256 MiB)


def _pow2_clamp(value: int, low: int, high: int) -> int:
    return max(low, min(triton.next_power_of_2(max(int(value), 1)), high))


def _block_k(hidden_size: int, element_size: int) -> int:
    """``BLOCK_K``: 64 for 2-byte inputs (128 bytes of each row per stage), 16 for 4- and
    8-byte ones (fp32's tf32x3 products split every operand in two, doubling its registers:
    at 32, the fp32 forward spilled on sm_80).

    When ``H`` is not a multiple of 16, Triton cannot prove the rows 16-byte aligned and loads
    them element by element, each element with its own 64-bit address in registers: the K step
    drops to 16 (at 64 a bf16 forward tile needed over 1 KiB of spills on sm_90).
    """
    cap = 64 if element_size <= 2 and hidden_size % 16 == 0 else 16
    return _pow2_clamp(hidden_size, 16, cap)


def _num_warps(block_m: int, block_n: int) -> int:
    return 8 if block_m * block_n >= 64 * 64 else 4


def _input_precision(element_size: int) -> str:
    """tl.dot precision: fp32 inputs use "tf32x3" (three TF32 tensor-core products of the
    split operands: close to fp32 accuracy at several times the speed of the "ieee" FMA path,
    which also needs far more registers); fp64 needs "ieee"; bf16/fp16 ignore it."""
    return "ieee" if element_size == 8 else "tf32x3"


# Whether the kernels above were decorated for Triton's interpreter (TRITON_INTERPRET=1 when
# this module was imported: Triton decides at decoration time).
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dot_options(element_size: int) -> dict[str, Any]:
    return {"INPUT_PRECISION": _input_precision(element_size),
            "UPCAST_DOT": _INTERPRETED and element_size == 2}


def fwd_config(n_rows: int, vocab: int, hidden_size: int, element_size: int
               ) -> LinearLaunchConfig:
    """Forward launch shape for ``hidden (N, H)``, ``weight (V, H)`` of ``element_size`` bytes.

    ``block_n = clamp(next_pow2(V), 16, 128)``, ``block_m = clamp(next_pow2(N), 16, 128)``,
    ``block_k`` from :func:`_block_k` (bf16 at H = 2048: 64), 8 warps from 64 × 64 tiles up
    (4 below), 3 stages; the vocabulary is cut into at most 64 splits of whole tiles (bf16 at
    V = 151936: 1187 tiles in 63 splits of 19 tiles). fp64 (a correctness path: gradchecks)
    caps both sides at 64, its accumulators taking two registers each.

    Batch invariance: ``block_n``, ``block_k`` and the splits — which fix the per-row
    arithmetic (which columns are summarised together, in which order, and each logit's
    K-summation) — depend on ``(V, H, dtype)`` only, never on ``N``. Only ``block_m`` shrinks
    for ``N < 128`` (small problems and the interpreter); that regroups rows but leaves every
    row's reduction order as is (on a GPU the MMA instruction shape may change with it).
    """
    side = _MAX_BLOCK if element_size <= 4 else _BWD_SHORT  # fp64: 64 × 64 (8-byte acc)
    block_n = _pow2_clamp(vocab, 16, side)
    block_k = _block_k(hidden_size, element_size)
    block_m = _pow2_clamp(n_rows, 16, side)
    tiles = triton.cdiv(max(vocab, 1), block_n)
    split_cols = block_n * triton.cdiv(tiles, min(tiles, _MAX_SPLITS))
    return LinearLaunchConfig(block_m, block_n, block_k, _num_warps(block_m, block_n), 3,
                              split_cols)


def bwd_config(n_rows: int, vocab: int, hidden_size: int, element_size: int
               ) -> LinearBwdConfig:
    """Backward launch shapes: the ∂h pass and the ∂W pass.

    Each tile ends in a second product whose fp32 accumulator lives in memory: the ∂h pass
    read-modify-writes ``block_m × H`` elements per tile, the ∂W pass ``block_n × H``. That
    traffic falls with the *other* side of the tile (∂h: ``block_n/4`` MMA FLOPs per
    accumulator byte, ∂W: ``block_m/4``), so the long side of each pass's tile is the one
    that divides its traffic and the short side (64) keeps registers below spilling:

    * ∂h: ``block_m = clamp(next_pow2(N), 16, 64)``, ``block_n = clamp(next_pow2(V), 16, 128)``;
      the vocabulary is cut into ``splits`` so that ``row blocks × splits`` reaches about 256
      programs, within a 256 MiB budget for the per-split ∂h buffers (a single split, written
      straight into ``grad_hidden``, once ``N ≥ 256·block_m``);
    * ∂W: ``block_m = clamp(next_pow2(N), 16, 128)``, ``block_n = clamp(next_pow2(V), 16, 64)``,
      one program per vocabulary tile.

    fp32 / fp64 inputs (tf32x3 / fp64 products need about twice the registers) use 64 × 64
    tiles in both passes, and 32 on the short side when ``H % 16 != 0``. ``block_k`` as in
    the forward; 8 warps from 64 × 64 tiles up (4 below); 3 stages.

    Where the time goes at LM-head shapes: the accumulator traffic, at 16–32 FLOPs per byte,
    is an order of magnitude below an H100's ridge point (~300 FLOP/B for bf16), so the
    backward is bound by memory (L2) traffic rather than by tensor-core throughput — as an
    atomic-add scheme, which moves the same bytes, would be. The owned-slice scheme's extra
    logits recompute therefore costs little wall time and buys determinism.
    """
    long_side = _MAX_BLOCK if element_size <= 2 else _BWD_SHORT
    # fp32 with an unaligned H (element-wise loads, see _block_k) on top of tf32x3: 32.
    short_side = _BWD_SHORT // 2 if element_size > 2 and hidden_size % 16 else _BWD_SHORT
    block_k = _block_k(hidden_size, element_size)
    # ∂h pass
    bm = _pow2_clamp(n_rows, 16, short_side)
    bn = _pow2_clamp(vocab, 16, long_side)
    tiles = triton.cdiv(max(vocab, 1), bn)
    row_blocks = triton.cdiv(max(n_rows, 1), bm)
    acc_size = 8 if element_size == 8 else 4
    by_memory = max(1, _BWD_PARTIAL_BYTES // max(n_rows * hidden_size * acc_size, 1))
    splits = max(1, min(triton.cdiv(_BWD_PROGRAMS, row_blocks), tiles, by_memory))
    dh = LinearLaunchConfig(bm, bn, block_k, _num_warps(bm, bn), 3,
                            bn * triton.cdiv(tiles, splits))
    # ∂W pass
    bm = _pow2_clamp(n_rows, 16, long_side)
    bn = _pow2_clamp(vocab, 16, short_side)
    dw = LinearLaunchConfig(bm, bn, block_k, _num_warps(bm, bn), 3, bn)
    return LinearBwdConfig(dh, dw)


# ---------------------------------------------------------------------------------------------
# Launchers


def _split_inv_temperature(temperature: float) -> tuple[float, float]:
    """``1/T`` as an fp32 value plus its fp32 residual (Triton float arguments are fp32)."""
    inv_t = 1.0 / float(temperature)
    hi = struct.unpack("f", struct.pack("f", inv_t))[0]
    return hi, inv_t - hi


def _check_rows_layout(hidden: Any, weight: Any, bias: Any | None) -> tuple[int, int, int]:
    n_rows, hidden_size = hidden.shape
    vocab, k = weight.shape
    if k != hidden_size:
        raise ValueError(f"weight must have shape (V, {hidden_size}), got {tuple(weight.shape)}")
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(f"{name} must have a unit last-dim stride, got {t.stride()}")
    if bias is not None and (tuple(bias.shape) != (vocab,) or (vocab > 1 and bias.stride(0) != 1)):
        raise ValueError(f"bias must be a contiguous ({vocab},) tensor")
    return n_rows, vocab, hidden_size


def linear_logprobs_fwd(
    hidden: Any,
    weight: Any,
    labels: Any,
    bias: Any | None,
    logprobs: Any,
    lse: Any,
    entropy: Any | None,
    *,
    temperature: float,
    ignore_index: int,
    config: LinearLaunchConfig | None = None,
) -> None:
    """Fill the per-row outputs of ``token_logprobs(hidden @ weight.T + bias, labels)``.

    Args:
        hidden: ``(N, H)`` bf16 / fp16 / fp32 / fp64, ``stride(1) == 1``, any row stride.
        weight: ``(V, H)`` same dtype, ``stride(1) == 1``, any row stride.
        labels: ``(N,)`` int64, contiguous; each in ``[0, V)`` or ``ignore_index``.
        bias: ``(V,)`` same dtype, contiguous, or ``None``.
        logprobs, lse: ``(N,)`` contiguous outputs, fp32 (fp64 for fp64 inputs).
        entropy: like ``logprobs``, or ``None`` (not computed: the ``t`` sums are skipped).
        temperature: ``T > 0``; logits are multiplied by ``1/T`` (a runtime scalar).
        ignore_index: rows with this label get 0 in every output.
        config: override of :func:`fwd_config` (tests, tuning).

    Formulas: ``lse = m + log s``, ``logp = z_y − lse``, ``entropy = log s − t/s`` from the
    merged summaries (module docstring). A label outside ``[0, V)`` that is not
    ``ignore_index`` gives NaN in ``logprobs`` and is never used as an address.

    Scratch: ``splits · 4 · N`` elements of the output dtype (``lse.new_empty``); no ``(N, V)``
    buffer. Two launches: the tile kernel, grid ``(cdiv(N, block_m), splits)``, and the merge.
    """
    n_rows, vocab, hidden_size = _check_rows_layout(hidden, weight, bias)
    if n_rows == 0:
        return
    if vocab == 0:
        raise ValueError("weight must have at least one row (V >= 1)")
    cfg = config or fwd_config(n_rows, vocab, hidden_size, hidden.element_size())
    n_splits = triton.cdiv(vocab, cfg.split_cols)
    stats = lse.new_empty((n_splits, _N_STATS, n_rows))
    inv_t = _split_inv_temperature(temperature)
    has_entropy = entropy is not None
    _linear_logprobs_fwd_kernel[(triton.cdiv(n_rows, cfg.block_m), n_splits)](
        hidden, weight, bias if bias is not None else hidden, labels, stats,
        n_rows, vocab, hidden_size, cfg.split_cols, hidden.stride(0), weight.stride(0),
        *inv_t,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        HAS_BIAS=bias is not None, HAS_ENTROPY=has_entropy, **_dot_options(hidden.element_size()),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    _linear_logprobs_merge_kernel[(triton.cdiv(n_rows, _MERGE_BLOCK),)](
        stats, labels, logprobs, lse, entropy if has_entropy else lse,
        n_rows, vocab, n_splits, cfg.split_cols, int(ignore_index),
        BLOCK=_MERGE_BLOCK, HAS_ENTROPY=has_entropy, num_warps=4,
    )


_MERGE_BLOCK = 128
_SUM_BLOCK = 1024


def linear_logprobs_bwd(
    hidden: Any,
    weight: Any,
    labels: Any,
    bias: Any | None,
    lse: Any,
    entropy: Any | None,
    grad_logprobs: Any | None,
    grad_entropy: Any | None,
    grad_lse: Any | None,
    grad_hidden: Any | None,
    grad_weight: Any | None,
    grad_bias: Any | None,
    *,
    temperature: float,
    ignore_index: int,
    config: LinearBwdConfig | None = None,
) -> None:
    """Add the parameter gradients of ``L = Σ g_lp·logp + Σ g_ent·entropy + Σ g_lse·lse``
    into fp32 accumulators.

    Per logit (recomputed tile by tile, never stored), with ``p = exp(z − lse)``::

        dZ = [ g_lp (1[v = y] − p) + g_ent p (E_p[z] − z) + g_lse p ] / T,  E_p[z] = lse − entropy

    and ``grad_hidden += dZ W``, ``grad_weight += dZᵀ h``, ``grad_bias += Σ_rows dZ``.

    Args:
        hidden, weight, labels, bias, temperature, ignore_index: as in
            :func:`linear_logprobs_fwd` (the same values as the forward).
        lse: ``(N,)`` fp32 (fp64 for fp64 inputs), contiguous, from the forward.
        entropy: like ``lse``; required when ``grad_entropy`` is given.
        grad_logprobs, grad_entropy, grad_lse: like ``lse``, or ``None`` (no such term).
        grad_hidden: ``(N, H)``, ``grad_weight``: ``(V, H)``, ``grad_bias``: ``(V,)``: the
            **accumulators** — contiguous, in the dtype of ``lse`` (fp32, or fp64 for fp64
            inputs), never the parameter dtype. The gradient is *added* to what they hold
            (pass zeros for a plain gradient); the caller casts them to the parameter dtype.
            Each may be ``None`` to skip it (e.g. a frozen LM head: ``grad_weight=None``).
        config: override of :func:`bwd_config` (tests, tuning).

    Ignored rows contribute nothing (whatever their upstream gradients hold). ``dZ`` is rounded
    to the input dtype before the ∂h / ∂W products (tensor-core inputs), as the CPU path
    rounds its logits-gradient tile.

    Deterministic: every accumulator element is updated by a single program in a fixed order
    (no atomics), so repeated calls give bitwise-identical gradients. Scratch: when the ∂h pass
    runs in ``splits > 1`` vocabulary splits, ``splits · N · H`` accumulator-dtype elements
    (``grad_hidden.new_zeros``), at most 256 MiB (see :func:`bwd_config`).
    """
    if grad_entropy is not None and entropy is None:
        raise ValueError("grad_entropy needs the forward's entropy")
    if grad_bias is not None and bias is None:
        raise ValueError("grad_bias needs bias")
    n_rows, vocab, hidden_size = _check_rows_layout(hidden, weight, bias)
    for name, acc, shape in (("grad_hidden", grad_hidden, (n_rows, hidden_size)),
                             ("grad_weight", grad_weight, (vocab, hidden_size)),
                             ("grad_bias", grad_bias, (vocab,))):
        if acc is None:
            continue
        if tuple(acc.shape) != shape or not acc.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {shape} accumulator")
        if acc.dtype != lse.dtype:
            raise TypeError(f"{name} must have the accumulator dtype {lse.dtype}, got "
                            f"{acc.dtype} (cast to the parameter dtype afterwards)")
    if n_rows == 0 or vocab == 0 or hidden_size == 0:
        return
    cfg = config or bwd_config(n_rows, vocab, hidden_size, hidden.element_size())
    inv_t = _split_inv_temperature(temperature)
    has = {"HAS_BIAS": bias is not None, "HAS_GRAD_LP": grad_logprobs is not None,
           "HAS_GRAD_ENT": grad_entropy is not None, "HAS_GRAD_LSE": grad_lse is not None,
           **_dot_options(hidden.element_size())}
    rows_in = (hidden, weight, bias if bias is not None else hidden, labels, lse,
               entropy if entropy is not None else lse,  # placeholders are never read
               grad_logprobs if grad_logprobs is not None else lse,
               grad_entropy if grad_entropy is not None else lse,
               grad_lse if grad_lse is not None else lse)

    if grad_hidden is not None:
        dh = cfg.dh
        n_splits = triton.cdiv(vocab, dh.split_cols)
        # One split writes straight into the caller's accumulator; several write their own
        # zeroed slices, added in split order afterwards.
        partial = grad_hidden if n_splits == 1 else grad_hidden.new_zeros(
            (n_splits, n_rows, hidden_size))
        _linear_logprobs_bwd_dh_kernel[(triton.cdiv(n_rows, dh.block_m), n_splits)](
            *rows_in, partial, n_rows, vocab, hidden_size, dh.split_cols,
            hidden.stride(0), weight.stride(0), *inv_t, int(ignore_index), **has,
            BLOCK_M=dh.block_m, BLOCK_N=dh.block_n, BLOCK_K=dh.block_k,
            num_warps=dh.num_warps, num_stages=dh.num_stages,
        )
        if n_splits > 1:
            numel = n_rows * hidden_size
            _sum_splits_kernel[(triton.cdiv(numel, _SUM_BLOCK),)](
                partial, grad_hidden, numel, n_splits, BLOCK=_SUM_BLOCK, num_warps=4)

    if grad_weight is not None or grad_bias is not None:
        dw = cfg.dw
        _linear_logprobs_bwd_dw_kernel[(triton.cdiv(vocab, dw.block_n),)](
            *rows_in,
            grad_weight if grad_weight is not None else lse,
            grad_bias if grad_bias is not None else lse,
            n_rows, vocab, hidden_size, hidden.stride(0), weight.stride(0), *inv_t,
            int(ignore_index), **has, HAS_GRAD_WEIGHT=grad_weight is not None,
            HAS_GRAD_BIAS=grad_bias is not None,
            BLOCK_M=dw.block_m, BLOCK_N=dw.block_n, BLOCK_K=dw.block_k,
            num_warps=dw.num_warps, num_stages=dw.num_stages,
        )


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation specs (consumed by rlkern.aot)

# (N, H, V) of the default configs: a Qwen-sized LM head (H = 2048, V = 151936) on a
# 4096-token micro-batch, and a small odd shape (the interpreter tests' kind).
_AOT_SHAPES = ((4096, 2048, 151936), (33, 40, 257))
_AOT_DTYPES = (("bf16", 2), ("fp16", 2), ("fp32", 4))


def _aot_signature(fn: Any, dtype: str) -> dict[str, str]:
    """Triton signature of ``fn`` in argument order: ``hidden/weight/bias`` in ``dtype``,
    labels int64, other pointers fp32, constexprs ``constexpr``, scalars i32 / fp32."""
    signature = {}
    for name in fn.arg_names:
        if name in ("hidden_ptr", "weight_ptr", "bias_ptr"):
            signature[name] = f"*{dtype}"
        elif name == "labels_ptr":
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        elif name.isupper():
            signature[name] = "constexpr"
        elif name.startswith("inv_temperature"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def _aot_divisible(signature: dict[str, str], values: dict[str, int]) -> list[str]:
    """Args Triton's launcher would specialise as 16-divisible: pointers (fresh allocations
    are) and the integer args whose value at this shape is."""
    return [n for n, ty in signature.items()
            if ty.startswith("*") or (ty == "i32" and values.get(n, 1) % 16 == 0)]


def _aot_specs() -> list[dict[str, Any]]:
    """The default configurations, as :func:`fwd_config` / :func:`bwd_config` pick them at
    ``_AOT_SHAPES``, for bf16 / fp16 / fp32: the forward tile kernel with entropy (the common
    case; no bias, as LM heads have none), the ∂h and ∂W kernels with every gradient term
    (the most live registers; ∂W with a bias and its gradient), and once per shape the
    dtype-independent merge and split-sum kernels.

    Keys as in ``kernels/logprobs.py``, plus ``num_stages``: what the launcher passes (3,
    which is also Triton's default, the value ``rlkern.aot`` compiles with).
    """
    specs: list[dict[str, Any]] = []
    grads = {"HAS_GRAD_LP": True, "HAS_GRAD_ENT": True, "HAS_GRAD_LSE": True}
    for n_rows, hidden_size, vocab in _AOT_SHAPES:
        shape = f"N={n_rows} H={hidden_size} V={vocab}"
        for dtype, size in _AOT_DTYPES:
            fwd = fwd_config(n_rows, vocab, hidden_size, size)
            bwd = bwd_config(n_rows, vocab, hidden_size, size)
            precision = _input_precision(size)
            kernels = (
                (_linear_logprobs_fwd_kernel, fwd, "entropy",
                 {"HAS_BIAS": False, "HAS_ENTROPY": True}),
                (_linear_logprobs_bwd_dh_kernel, bwd.dh, "lp+ent+lse",
                 {"HAS_BIAS": False, **grads}),
                (_linear_logprobs_bwd_dw_kernel, bwd.dw, "lp+ent+lse bias",
                 {"HAS_BIAS": True, **grads, "HAS_GRAD_WEIGHT": True, "HAS_GRAD_BIAS": True}),
            )
            for fn, cfg, label, flags in kernels:
                signature = _aot_signature(fn, dtype)
                values = {"n_rows": n_rows, "vocab": vocab, "hidden_size": hidden_size,
                          "split_cols": cfg.split_cols, "stride_hidden_0": hidden_size,
                          "stride_weight_0": hidden_size}
                specs.append({
                    "name": (f"{dtype} {shape} {label} BM={cfg.block_m} BN={cfg.block_n} "
                             f"BK={cfg.block_k}"),
                    "fn": fn,
                    "signature": signature,
                    "constexprs": {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                                   "BLOCK_K": cfg.block_k, "INPUT_PRECISION": precision,
                                   "UPCAST_DOT": False, **flags},
                    "num_warps": cfg.num_warps,
                    "num_stages": cfg.num_stages,
                    "divisible_by_16": _aot_divisible(signature, values),
                })
        for fn, block, constexprs in (
            (_linear_logprobs_merge_kernel, _MERGE_BLOCK, {"HAS_ENTROPY": True}),
            (_sum_splits_kernel, _SUM_BLOCK, {}),
        ):
            signature = _aot_signature(fn, "fp32")
            specs.append({
                "name": f"{shape} BLOCK={block}",
                "fn": fn,
                "signature": signature,
                "constexprs": {"BLOCK": block, **constexprs},
                "num_warps": 4,
                "num_stages": 3,
                "divisible_by_16": _aot_divisible(signature, {"n_rows": n_rows,
                                                              "vocab": vocab}),
            })
    return specs


AOT_SPECS: list[dict[str, Any]] = _aot_specs()
