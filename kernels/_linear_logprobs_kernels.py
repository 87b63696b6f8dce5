"""The ``@triton.jit`` kernels of ``kernels/linear_logprobs.py`` (whose docstring states the math
and the launch scheme) and the tile helpers they share. Imports only triton.

Layouts: ``hidden (N, H)`` and ``weight (V, H)`` with unit last-dim stride and any row stride;
offsets are 64-bit (``N·H``, ``V·H`` may exceed 2³¹). Per-row arrays are contiguous.
"""

from __future__ import annotations

import triton
import triton.language as tl

from rlkern.kernels._common import LN2, LOG2E, LOWEST, row_scales

# The forward's scratch between its two kernels, (splits, _N_STATS, N) so that each field is
# contiguous: the fields of a split's online-softmax summary (m the raw max, s and t in base 2
# relative to it) and the label's raw logit x_y (valid only in the split that owns the label).
# The same fields as the CPU path's running state (rlkern/logprobs.h, linear_logprobs.stats),
# in base 2 and split-major: private to the kernels below, it never leaves the launcher.
_M = tl.constexpr(0)
_S = tl.constexpr(1)
_T = tl.constexpr(2)
_ZY = tl.constexpr(3)
#: Rows with |lse| at or above this bound take the backward's exact path (the C++ kernels'
#: ``rlkern::logprobs::kBwdLseBound``, csrc/include/rlkern/logprobs.h).
BWD_LSE_BOUND = tl.constexpr(256.0)
N_STATS = 4
_N_STATS = tl.constexpr(N_STATS)


# ---------------------------------------------------------------------------------------------
# Tile helpers


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
def _tanh(u):
    """``tanh(u)`` from ``exp`` (no libdevice, so the interpreter runs it too):
    ``sign(u)·(1 − e^{−2|u|}) / (1 + e^{−2|u|})``, which is ±1 at ±inf and NaN at NaN; below
    ``|u| = 2⁻⁴`` the odd Taylor series to ``u⁷`` instead, where ``1 − e^{−2|u|}`` would cancel
    (its truncation error there is below ``u⁹·0.022 ≈ 8e-13``)."""
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    u2 = u * u
    small = u * (1.0 + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0 + u2 * (-17.0 / 315.0))))
    return tl.where(a < 0.0625, small, tl.where(u < 0, -big, big))


@triton.jit
def _softcap_tile(x, softcap, SOFTCAP: tl.constexpr):
    """Logit soft-capping of a raw logits tile: ``(z, tanh(x/c))`` with ``z = c·tanh(x/c)``
    when ``SOFTCAP`` (the backward multiplies ``∂L/∂z`` by ``1 − tanh²``), else ``(x, x)``
    (the second value unused)."""
    th = x
    if SOFTCAP:
        th = _tanh(x / softcap)
        x = softcap * th
    return x, th


@triton.jit
def _row_grad_consts(
    labels_ptr, shift_ptr, ref2_ptr, ez_ptr, grad_logprobs_ptr, grad_entropy_ptr, grad_lse_ptr,
    rows64, row_ok, vocab, ignore_index, inv_t,
    ACC: tl.constexpr, HAS_GRAD_LP: tl.constexpr, HAS_GRAD_ENT: tl.constexpr,
    HAS_GRAD_LSE: tl.constexpr,
):
    """Per-row constants of the logit gradient (as in kernels/logprobs.py's backward).

    The row references of :func:`_linear_logprobs_refs_kernel` give ``p`` relative to a shift:
    ``p_v = exp2((x_v − shift)·log₂e/T − ref₂)``; with ``z'_v = (x_v − shift)/T`` the
    gradient of one logit is ``dZ_v = p_v · (g_ent/T · (E_p[z'] − z'_v) + c) [+ g_lp / T at
    v = y]`` with ``c = (g_lse − g_lp)/T``; ``E_p[z'] − z'_v`` is formed first, so it cancels
    exactly where it should (a row of one logit: 0) instead of leaving a rounding that huge
    weights would amplify.

    Returns ``(live, label_col, shift, ref₂, E_p[z'], c, g_lp / T, g_ent / T)``: ``live`` marks
    rows inside the batch that are not ``ignore_index`` (every other row gets a zero gradient
    row whatever its upstream gradients hold, NaN included); ``label_col`` is the label as an
    int32 column index, −1 when out of range, so it matches no column and is never
    dereferenced.
    """
    label = tl.load(labels_ptr + rows64, mask=row_ok, other=ignore_index)
    live = row_ok & (label != ignore_index)
    shift = tl.load(shift_ptr + rows64, mask=live, other=0.0).to(ACC)
    ref2 = tl.load(ref2_ptr + rows64, mask=live, other=0.0).to(ACC)
    c = tl.zeros(ref2.shape, ACC)
    g_lp = tl.zeros(ref2.shape, ACC)
    g_ent = tl.zeros(ref2.shape, ACC)
    e_z = tl.zeros(ref2.shape, ACC)
    if HAS_GRAD_LP:
        g_lp = tl.load(grad_logprobs_ptr + rows64, mask=live, other=0.0).to(ACC)
        c -= g_lp
    if HAS_GRAD_ENT:
        g_ent = tl.load(grad_entropy_ptr + rows64, mask=live, other=0.0).to(ACC)
        e_z = tl.load(ez_ptr + rows64, mask=live, other=0.0).to(ACC)
    if HAS_GRAD_LSE:
        c += tl.load(grad_lse_ptr + rows64, mask=live, other=0.0).to(ACC)
    label_col = tl.where(live & (label >= 0) & (label < vocab), label, -1).to(tl.int32)
    return live, label_col, shift, ref2, e_z, c * inv_t, g_lp * inv_t, g_ent * inv_t


@triton.jit
def _dlogits_tile(
    x, cols, col_ok, live, label_col, shift, ref2, e_z, c, g_lp, g_ent, scale, inv_t,
    HAS_GRAD_LP: tl.constexpr, HAS_GRAD_ENT: tl.constexpr,
):
    """``dZ`` of one logits tile ``x`` (raw logits, before 1/T): one exp2 and two FMAs per
    element. Entries outside the batch, the vocabulary or on ignored rows are exactly 0 (their
    recomputed logits are finite but meaningless: exp2 of them may overflow). Where ``p = 0``
    (a −inf logit, e.g. from a −inf bias) the entropy term is 0, its limit, not 0·(−inf) = NaN,
    unless a coefficient is NaN (0·NaN = NaN, as on the CPU); a NaN ``ref₂`` (a row without a
    defined gradient) makes the row NaN."""
    r = x - shift[:, None]
    p = tl.exp2(tl.fma(r, scale, -ref2[:, None]))
    if HAS_GRAD_ENT:
        dz = tl.where(p > 0, p * tl.fma(e_z[:, None] - r * inv_t, g_ent[:, None], c[:, None]),
                      p * (g_ent[:, None] + c[:, None]))
    else:
        dz = p * c[:, None]
    if HAS_GRAD_LP:
        dz = tl.where(cols[None, :] == label_col[:, None], dz + g_lp[:, None], dz)
    return tl.where(live[:, None] & col_ok[None, :], dz, 0.0)


@triton.jit
def _dx_tile(
    x, cols, col_ok, live, label_col, shift, ref2, e_z, c, g_lp, g_ent, scale, inv_t, softcap,
    SOFTCAP: tl.constexpr, HAS_GRAD_LP: tl.constexpr, HAS_GRAD_ENT: tl.constexpr,
):
    """The gradient wrt the raw tile ``x`` (before the soft cap): :func:`_dlogits_tile` of the
    capped logits ``z = c·tanh(x/c)`` times ``∂z/∂x = 1 − tanh²`` (with SOFTCAP), or of ``x``."""
    z, th = _softcap_tile(x, softcap, SOFTCAP)
    dz = _dlogits_tile(z, cols, col_ok, live, label_col, shift, ref2, e_z, c, g_lp, g_ent,
                       scale, inv_t, HAS_GRAD_LP, HAS_GRAD_ENT)
    if SOFTCAP:
        dz = dz * ((1.0 - th) * (1.0 + th))
    return dz


@triton.jit
def _split_bounds(split, split_cols, vocab):
    """Columns ``[begin, end)`` of vocabulary split ``split`` (``split_cols`` wide, the last one
    cut at ``V``)."""
    begin = split * split_cols
    return begin, tl.minimum(vocab, begin + split_cols)


@triton.jit
def _tile_cols(v0, v_end, BLOCK_N: tl.constexpr):
    """The ``BLOCK_N`` columns from ``v0`` and their mask (columns at or past ``v_end`` are
    padding)."""
    cols = v0 + tl.arange(0, BLOCK_N)
    return cols, cols < v_end


@triton.jit
def _row_block(first, n_rows, BLOCK_M: tl.constexpr):
    """Rows ``[first, first + BLOCK_M)`` as 64-bit indices and their in-batch mask."""
    rows = first + tl.arange(0, BLOCK_M)
    return rows.to(tl.int64), rows < n_rows


@triton.jit
def _add_product(acc_ptrs, acc_ok, a, b_ptrs, b_ok, hidden_size,
                 BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """``acc += a @ b`` over ``K = H`` in ``BLOCK_K``-wide column blocks: ``acc_ptrs`` /
    ``b_ptrs`` address the first ``BLOCK_K`` columns of a ``(P, H)`` accumulator (rows masked by
    ``acc_ok``) and of a ``(Q, H)`` operand (rows masked by ``b_ok``), both unit-stride along
    ``H``; ``a`` is ``(P, Q)``. The running sum is the MMA accumulator: one fused update per
    element, by this program only (no atomics: a fixed order, bitwise reproducible)."""
    kk = tl.arange(0, BLOCK_K)
    for k0 in range(0, hidden_size, BLOCK_K):
        k_ok = kk < hidden_size - k0
        b = tl.load(b_ptrs + k0, mask=b_ok[:, None] & k_ok[None, :], other=0.0)
        acc_mask = acc_ok[:, None] & k_ok[None, :]
        prev = tl.load(acc_ptrs + k0, mask=acc_mask, other=0.0)
        tl.store(acc_ptrs + k0, _mma(a, b, prev, INPUT_PRECISION, UPCAST_DOT), mask=acc_mask)
    # The next tile reads these accumulator elements back, possibly from other threads of this
    # program (the load and store layouts, and pipelined async copies, are the compiler's
    # choice): a CTA barrier makes this tile's stores visible to them first.
    tl.debug_barrier()


# ---------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _linear_logprobs_fwd_kernel(
    hidden_ptr,  # (N, H) bf16/fp16/fp32/fp64, unit last stride
    weight_ptr,  # (V, H) same dtype, unit last stride
    bias_ptr,  # (V,) same dtype, contiguous; read only when HAS_BIAS
    labels_ptr,  # (N,) int64, contiguous
    lse_ptr,  # (N,) the forward's lse; read only when ONLY_FAR
    stats_ptr,  # (splits, 4, N) fp32 (fp64 for fp64 inputs) scratch; fixes the acc dtype
    n_rows,  # N
    vocab,  # V
    hidden_size,  # H
    split_cols,  # vocabulary columns per split (a multiple of BLOCK_N)
    stride_hidden_0,
    stride_weight_0,
    inv_temperature,  # 1 / T rounded to fp32: a runtime scalar (a constexpr recompiles per T)
    inv_temperature_lo,  # 1 / T − inv_temperature: restores 1 / T to ~48 bits for fp64
    ignore_index,  # read only when ONLY_FAR
    softcap,  # the cap c of z = c·tanh(x/c); read only when SOFTCAP
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,  # tl.dot precision for fp32 inputs (ignored otherwise)
    UPCAST_DOT: tl.constexpr,  # interpreter only (see _mma)
    ONLY_FAR: tl.constexpr,  # backward: skip row blocks without a row whose |lse| is large
    SOFTCAP: tl.constexpr,  # the logits are c·tanh(x/c) (every "x" below is that z)
):
    """Program ``(i, j)``: rows ``[i·BLOCK_M, (i+1)·BLOCK_M)`` × vocabulary split ``j``
    (columns ``[j·split_cols, min(V, (j+1)·split_cols))``, never empty). Writes the split's
    per-row ``(m, s, t, x_y)`` to ``stats[j]``, relative to the raw max and in base 2::

        m = max x,   s = Σ exp2((x − m)·log₂e/T),   t = Σ exp2(d)·d with d = (x − m)·log₂e/T

    Shifting by the raw max *before* scaling keeps ``d`` exact for huge logits and any
    temperature. ``x_y`` is the label's raw logit when the label lies in this split (else 0,
    unused). With ``ONLY_FAR`` (the backward's recompute, see the refs kernel) a row block none
    of whose rows has ``|lse| ≥ BWD_LSE_BOUND`` returns at once, writing nothing.
    """
    ACC: tl.constexpr = stats_ptr.dtype.element_ty
    pid_s = tl.program_id(1)
    rows64, row_ok = _row_block(tl.program_id(0) * BLOCK_M, n_rows, BLOCK_M)
    _, scale = row_scales(inv_temperature, inv_temperature_lo, ACC)
    # Out-of-batch rows get a label that matches no column (they are never stored anyway).
    labels = tl.load(labels_ptr + rows64, mask=row_ok, other=-1)
    if ONLY_FAR:
        lse = tl.load(lse_ptr + rows64, mask=row_ok, other=0.0)
        far = row_ok & (labels != ignore_index) & ~(tl.abs(lse) < BWD_LSE_BOUND) & (lse == lse)
        active = tl.max(far.to(tl.int32), axis=0) > 0
    else:
        active = True
    if active:
        v_begin, v_end = _split_bounds(pid_s, split_cols, vocab)
        m = tl.full((BLOCK_M,), float("-inf"), ACC)  # running raw max (−inf while empty)
        s = tl.zeros((BLOCK_M,), ACC)
        t = tl.zeros((BLOCK_M,), ACC)
        x_y = tl.zeros((BLOCK_M,), ACC)
        for v0 in range(v_begin, v_end, BLOCK_N):
            cols, col_ok = _tile_cols(v0, v_end, BLOCK_N)
            x = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows64, row_ok, cols, col_ok,
                             hidden_size, stride_hidden_0, stride_weight_0, ACC, BLOCK_M,
                             BLOCK_N, BLOCK_K, HAS_BIAS, INPUT_PRECISION, UPCAST_DOT)
            x, _th = _softcap_tile(x, softcap, SOFTCAP)
            # Padding columns become −inf: they add exp2(−inf) = 0 below. inf/NaN in the
            # inputs propagate to their rows only.
            x = tl.where(col_ok[None, :], x, float("-inf"))
            # The label's logit: exactly one tile of one split matches, so the sum is exact.
            x_y += tl.sum(tl.where(cols[None, :] == labels[:, None], x, 0.0), axis=1)
            # Online softmax (Milakov & Gimelshein 2018): move the running summary to the new
            # max. With δ = (m − m')·log₂e/T ≤ 0 and α = exp2(δ): s ← α s, t ← α (t + δ s),
            # since exp2(d − δ') = α·exp2(d). An empty summary (m = −inf, s = t = 0) takes
            # δ = 0, and an all −inf row the shift 0: −inf − (−inf) would be NaN.
            m_new = tl.maximum(m, tl.max(x, axis=1))
            ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            delta = tl.where(m == float("-inf"), 0.0, (m - ref) * scale)
            alpha = tl.exp2(delta)
            d = tl.maximum((x - ref[:, None]) * scale, LOWEST,
                           propagate_nan=tl.PropagateNan.ALL)
            w = tl.exp2(d)
            if HAS_ENTROPY:
                t = alpha * (t + delta * s) + tl.sum(w * d, axis=1)
            s = alpha * s + tl.sum(w, axis=1)
            m = m_new

        out = stats_ptr + (pid_s.to(tl.int64) * _N_STATS) * n_rows + rows64
        tl.store(out + _M * n_rows, m, mask=row_ok)
        tl.store(out + _S * n_rows, s, mask=row_ok)
        if HAS_ENTROPY:
            tl.store(out + _T * n_rows, t, mask=row_ok)
        tl.store(out + _ZY * n_rows, x_y, mask=row_ok)


@triton.jit
def _merge_splits(stats_ptr, rows64, row_ok, n_rows, n_splits, scale,
                  ACC: tl.constexpr, BLOCK: tl.constexpr, HAS_ENTROPY: tl.constexpr):
    """Each row's split summaries merged in split order (online_softmax.h's exact merge):
    ``(m, s, t)``, m the raw max, s and t in base 2 relative to it."""
    m = tl.full((BLOCK,), float("-inf"), ACC)
    s = tl.zeros((BLOCK,), ACC)
    t = tl.zeros((BLOCK,), ACC)
    src = stats_ptr + rows64  # split j's fields start at (j·4 + field)·N (64-bit pointer)
    for _ in range(0, n_splits):
        m_j = tl.load(src + _M * n_rows, mask=row_ok, other=float("-inf"))
        s_j = tl.load(src + _S * n_rows, mask=row_ok, other=0.0)
        # Both summaries move to the common max M: δ = (m − M)·log₂e/T, s' = 2^δ s,
        # t' = 2^δ (t + δ s); an empty summary (s = 0) takes δ = 0 and stays empty.
        m_new = tl.maximum(m, m_j)
        d_a = tl.where(s == 0, 0.0, (m - m_new) * scale)
        d_b = tl.where(s_j == 0, 0.0, (m_j - m_new) * scale)
        a = tl.exp2(d_a)
        b = tl.exp2(d_b)
        if HAS_ENTROPY:
            t_j = tl.load(src + _T * n_rows, mask=row_ok, other=0.0)
            t = a * (t + d_a * s) + b * (t_j + d_b * s_j)
        s = a * s + b * s_j
        m = m_new
        src += _N_STATS * n_rows
    return m, s, t


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
    inv_temperature,
    inv_temperature_lo,
    ignore_index,
    BLOCK: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
):
    """Merge each row's split summaries and write the per-row results. Ignored rows get 0;
    an out-of-range label (not ignore_index) is never used as an address and gives a NaN
    logprob. A row holding NaN or +inf is NaN; an all −inf row has lse = −inf."""
    ACC: tl.constexpr = stats_ptr.dtype.element_ty
    rows64, row_ok = _row_block(tl.program_id(0) * BLOCK, n_rows, BLOCK)
    inv_t, scale = row_scales(inv_temperature, inv_temperature_lo, ACC)
    m, s, t = _merge_splits(stats_ptr, rows64, row_ok, n_rows, n_splits, scale, ACC, BLOCK,
                            HAS_ENTROPY)

    label = tl.load(labels_ptr + rows64, mask=row_ok, other=ignore_index)
    valid = label != ignore_index
    label_ok = valid & (label >= 0) & (label < vocab)
    owner = tl.where(label_ok, label // split_cols, 0)  # the split whose range holds y
    x_y = tl.load(stats_ptr + (owner * _N_STATS + _ZY) * n_rows + rows64,
                  mask=row_ok & label_ok, other=float("nan"))
    log2_s = tl.log2(s)
    # logp = (x_y − m)·log₂e/T − log₂ s: the max cancels before any rounding of lse enters,
    # so a confident token (logp ≈ 0, lse large) keeps an error at the resolution of 1.
    logp = ((x_y - m) * scale - log2_s) * LN2
    # lse = m/T + log s in natural units (only it can leave the float range).
    lse = tl.fma(tl.where(m == float("-inf"), 0.0, m), inv_t, log2_s * LN2)
    zero = tl.zeros((BLOCK,), ACC)
    tl.store(logprobs_ptr + rows64, tl.where(valid, logp, zero), mask=row_ok)
    tl.store(lse_ptr + rows64, tl.where(valid, lse, zero), mask=row_ok)
    if HAS_ENTROPY:
        # entropy = lse − E_p[z] = log s − t / s (both relative to m).
        entropy = (log2_s - t / s) * LN2
        tl.store(entropy_ptr + rows64, tl.where(valid, entropy, zero), mask=row_ok)


@triton.jit
def _linear_logprobs_refs_kernel(
    stats_ptr,  # (splits, 4, N) from the forward kernel run with ONLY_FAR
    labels_ptr,  # (N,) int64
    lse_ptr,  # (N,) the forward's lse (fixes the acc dtype)
    entropy_ptr,  # (N,) the forward's entropy; read only when HAS_ENTROPY
    shift_ptr,  # (N,) out: the shift of each row's logits (0, or its max)
    ref2_ptr,  # (N,) out: log₂ Σ exp2((x − shift)·log₂e/T); NaN: no gradient defined
    ez_ptr,  # (N,) out: E_p[(x − shift)/T] (natural units); written when HAS_ENTROPY
    n_rows,
    n_splits,
    inv_temperature,
    inv_temperature_lo,
    ignore_index,
    BLOCK: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
):
    """The backward's per-row references. A row with a moderate lse (|lse| < BWD_LSE_BOUND)
    takes the forward's: shift 0, ref₂ = lse·log₂e, E_p[z] = lse − entropy (the float lse
    pins p down to |lse|·2⁻²⁴). Any other row (huge logits, a tiny temperature, an lse that
    overflowed) takes its recomputed summary, formed from the very tiles the backward kernel
    will form (same blocks, so the same roundings): shift = its max m, ref₂ = log₂ s,
    E_p[z'] = t/s — exact. An all −inf row, or one whose lse is NaN, gets ref₂ = NaN."""
    ACC: tl.constexpr = lse_ptr.dtype.element_ty
    rows64, row_ok = _row_block(tl.program_id(0) * BLOCK, n_rows, BLOCK)
    _, scale = row_scales(inv_temperature, inv_temperature_lo, ACC)
    lse = tl.load(lse_ptr + rows64, mask=row_ok, other=0.0)
    label = tl.load(labels_ptr + rows64, mask=row_ok, other=ignore_index)
    far = row_ok & (label != ignore_index) & ~(tl.abs(lse) < BWD_LSE_BOUND) & (lse == lse)
    m, s, t = _merge_splits(stats_ptr, rows64, far, n_rows, n_splits, scale, ACC, BLOCK,
                            HAS_ENTROPY)
    exact_ok = (s > 0) & (m != float("-inf"))
    tl.store(shift_ptr + rows64, tl.where(far, m, 0.0), mask=row_ok)
    tl.store(ref2_ptr + rows64,
             tl.where(far, tl.where(exact_ok, tl.log2(s), float("nan")), lse * LOG2E),
             mask=row_ok)
    if HAS_ENTROPY:
        entropy = tl.load(entropy_ptr + rows64, mask=row_ok, other=0.0)
        tl.store(ez_ptr + rows64, tl.where(far, t / s * LN2, lse - entropy), mask=row_ok)


# ---------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _linear_logprobs_bwd_dh_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr,  # (N, H), (V, H), (V,) if HAS_BIAS, (N,) int64
    # (N,) each, fp32 (fp64 for fp64 inputs): the row references of the refs kernel (ref₂
    # fixes the acc dtype; E_p[z'] read when HAS_GRAD_ENT), the upstream gradients (read when
    # their HAS_GRAD_*)
    shift_ptr, ref2_ptr, ez_ptr, grad_logprobs_ptr, grad_entropy_ptr, grad_lse_ptr,
    grad_hidden_ptr,  # (splits, N, H) contiguous, acc dtype: ∂h of each split, += into it
    n_rows, vocab, hidden_size, split_cols, stride_hidden_0, stride_weight_0,
    inv_temperature, inv_temperature_lo, ignore_index, softcap,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_GRAD_LP: tl.constexpr, HAS_GRAD_ENT: tl.constexpr, HAS_GRAD_LSE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """Program ``(i, j)``: ``grad_hidden[j, rows_i] += Σ_{tiles of split j} dZ_tile W_tile``.

    Only this program touches ``grad_hidden[j, rows_i, :]``, tile after tile in order, so the
    read-modify-write needs no atomics and is deterministic. ``dZ`` is rounded to the weight
    dtype for the tensor-core product (as the CPU path rounds its logits tile).
    """
    ACC: tl.constexpr = ref2_ptr.dtype.element_ty
    pid_s = tl.program_id(1)
    rows64, row_ok = _row_block(tl.program_id(0) * BLOCK_M, n_rows, BLOCK_M)
    inv_t, scale = row_scales(inv_temperature, inv_temperature_lo, ACC)
    live, label_col, shift, ref2, e_z, c, g_lp, g_ent = _row_grad_consts(
        labels_ptr, shift_ptr, ref2_ptr, ez_ptr, grad_logprobs_ptr, grad_entropy_ptr,
        grad_lse_ptr, rows64, row_ok, vocab, ignore_index, inv_t, ACC, HAS_GRAD_LP,
        HAS_GRAD_ENT, HAS_GRAD_LSE)

    kk = tl.arange(0, BLOCK_K)
    gh_ptrs = (grad_hidden_ptr + (pid_s.to(tl.int64) * n_rows + rows64[:, None]) * hidden_size
               + kk[None, :])
    v_begin, v_end = _split_bounds(pid_s, split_cols, vocab)
    for v0 in range(v_begin, v_end, BLOCK_N):
        cols, col_ok = _tile_cols(v0, v_end, BLOCK_N)
        x = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows64, row_ok, cols, col_ok,
                         hidden_size, stride_hidden_0, stride_weight_0, ACC, BLOCK_M, BLOCK_N,
                         BLOCK_K, HAS_BIAS, INPUT_PRECISION, UPCAST_DOT)
        dz = _dx_tile(x, cols, col_ok, live, label_col, shift, ref2, e_z, c, g_lp, g_ent,
                      scale, inv_t, softcap, SOFTCAP, HAS_GRAD_LP, HAS_GRAD_ENT)
        dz = dz.to(weight_ptr.dtype.element_ty)
        w_ptrs = weight_ptr + (cols.to(tl.int64)[:, None] * stride_weight_0 + kk[None, :])
        _add_product(gh_ptrs, row_ok, dz, w_ptrs, col_ok, hidden_size, BLOCK_K,
                     INPUT_PRECISION, UPCAST_DOT)


@triton.jit
def _linear_logprobs_bwd_dw_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr,  # as in the ∂h kernel
    shift_ptr, ref2_ptr, ez_ptr,  # as in the ∂h kernel (from the refs of *this* kernel's tiles)
    grad_logprobs_ptr, grad_entropy_ptr, grad_lse_ptr,  # as in the ∂h kernel
    grad_weight_ptr,  # (V, H) contiguous, acc dtype, += into it; used when HAS_GRAD_WEIGHT
    grad_bias_ptr,  # (V,) contiguous, acc dtype, += into it; used when HAS_GRAD_BIAS
    n_rows, vocab, hidden_size, stride_hidden_0, stride_weight_0,
    inv_temperature, inv_temperature_lo, ignore_index, softcap,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_GRAD_LP: tl.constexpr, HAS_GRAD_ENT: tl.constexpr, HAS_GRAD_LSE: tl.constexpr,
    HAS_GRAD_WEIGHT: tl.constexpr, HAS_GRAD_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """Program ``j`` owns vocabulary rows ``cols_j`` of ``∂W`` and ``∂b`` and walks all row
    blocks in order: ``grad_weight[cols_j] += Σ_i dZ_ijᵀ h_i``, ``grad_bias[cols_j] += Σ dZ``.
    No other program writes these elements, so no atomics and a fixed summation order."""
    ACC: tl.constexpr = ref2_ptr.dtype.element_ty
    cols, col_ok = _tile_cols(tl.program_id(0) * BLOCK_N, vocab, BLOCK_N)
    cols64 = cols.to(tl.int64)
    inv_t, scale = row_scales(inv_temperature, inv_temperature_lo, ACC)
    kk = tl.arange(0, BLOCK_K)
    gw_ptrs = grad_weight_ptr + (cols64[:, None] * hidden_size + kk[None, :])
    gb = tl.zeros((BLOCK_N,), ACC)
    for r0 in range(0, n_rows, BLOCK_M):
        rows64, row_ok = _row_block(r0, n_rows, BLOCK_M)
        live, label_col, shift, ref2, e_z, c, g_lp, g_ent = _row_grad_consts(
            labels_ptr, shift_ptr, ref2_ptr, ez_ptr, grad_logprobs_ptr, grad_entropy_ptr,
            grad_lse_ptr, rows64, row_ok, vocab, ignore_index, inv_t, ACC, HAS_GRAD_LP,
            HAS_GRAD_ENT, HAS_GRAD_LSE)
        x = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows64, row_ok, cols, col_ok,
                         hidden_size, stride_hidden_0, stride_weight_0, ACC, BLOCK_M, BLOCK_N,
                         BLOCK_K, HAS_BIAS, INPUT_PRECISION, UPCAST_DOT)
        dz = _dx_tile(x, cols, col_ok, live, label_col, shift, ref2, e_z, c, g_lp, g_ent,
                      scale, inv_t, softcap, SOFTCAP, HAS_GRAD_LP, HAS_GRAD_ENT)
        if HAS_GRAD_BIAS:
            gb += tl.sum(dz, axis=0)
        if HAS_GRAD_WEIGHT:
            dz_t = tl.trans(dz.to(hidden_ptr.dtype.element_ty))  # (BLOCK_N, BLOCK_M)
            h_ptrs = hidden_ptr + (rows64[:, None] * stride_hidden_0 + kk[None, :])
            _add_product(gw_ptrs, col_ok, dz_t, h_ptrs, row_ok, hidden_size, BLOCK_K,
                         INPUT_PRECISION, UPCAST_DOT)
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


