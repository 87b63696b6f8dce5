"""Triton sampler (ALGORITHMS.md §4): one program per output row.

The same algorithm as the CPU kernel (csrc/cpu/sample.cpp), in a form that suits a GPU:

1. a pass over the row for the max of the logits, one for the normaliser / entropy of
   ``z = (x − max x) / T`` (shifted before the temperature scales, so finite rows never overflow);
2. filters as lengths of a prefix of the order "value descending, index ascending"; the
   threshold of a prefix is found by a bit-by-bit search over the 32-bit order key of ``z``
   (each probe is one pass counting the tokens / summing the mass at or above a key) — no sort;
3. an inverse-CDF draw over the kept set in vocabulary order with the row's Philox-4x32-10
   uniform (the rounds of csrc/include/rlkern/philox.h, so the uniform is bit-identical to the
   CPU and CUDA backends; the token agrees with theirs except when ``u · S`` falls within
   rounding of a CDF step, since the sums are accumulated in a different order).

This module imports only triton; the launcher receives tensors as pointers.
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

from rlkern.kernels._common import FLT_MAX, FLT_MIN, LN2, aot_signature, aot_spec, row_scales
from rlkern.kernels.logprobs import launch_config, merge_summaries, row_summary

__all__ = ["AOT_SPECS", "sample"]


@triton.jit
def _philox_uniform(seed, step, index):
    """Uniform in [0, 1) (float64) for (seed, step, index): Philox-4x32-10, 53 bits (counter
    word 0 = index: draw j of a row with num_samples uses index j)."""
    s = seed.to(tl.uint64, bitcast=True)
    t = step.to(tl.uint64, bitcast=True)
    k0 = (s & 0xFFFFFFFF).to(tl.uint32)
    k1 = (s >> 32).to(tl.uint32)
    c0 = (tl.zeros((), tl.int64) + index).to(tl.uint32)
    c1 = tl.zeros((), tl.uint32)
    c2 = (t & 0xFFFFFFFF).to(tl.uint32)
    c3 = (t >> 32).to(tl.uint32)
    m0 = tl.full((), 0xD2511F53, tl.uint32)
    m1 = tl.full((), 0xCD9E8D57, tl.uint32)
    w0 = tl.full((), 0x9E3779B9, tl.uint32)
    w1 = tl.full((), 0xBB67AE85, tl.uint32)
    for r in tl.static_range(10):
        if r > 0:
            k0 = k0 + w0
            k1 = k1 + w1
        hi0 = tl.umulhi(m0, c0)
        lo0 = m0 * c0
        hi1 = tl.umulhi(m1, c2)
        lo1 = m1 * c2
        n0 = hi1 ^ c1 ^ k0
        n2 = hi0 ^ c3 ^ k1
        c0 = n0
        c1 = lo1
        c2 = n2
        c3 = lo0
    bits = ((c0 >> 5).to(tl.uint64) << 26) | (c1 >> 6).to(tl.uint64)
    return bits.to(tl.float64) * 1.1102230246251565e-16


@triton.jit
def _order_key(z):
    """Monotone int64 key in [0, 2³²) of fp32 values (larger value → larger key); −0 takes
    +0's key (one value: ties kept in index order; rlkern/kept_key.h's order_key)."""
    b = tl.where(z == 0.0, 0, z.to(tl.int32, bitcast=True))
    k = b ^ ((b >> 31) & 0x7FFFFFFF)  # signed order: flip the magnitude bits of negatives
    return k.to(tl.int64) + 2147483648


@triton.jit
def _load_z(row, start, vocab, shift, inv_t, BLOCK_V: tl.constexpr):
    """Block ``[start, start + BLOCK_V)`` of a row: its indices, in-vocabulary mask and
    ``z = (x − shift) · inv_t`` in fp32 (−inf past the end, where it weighs 0). The shift is
    the row's raw max, subtracted before the temperature scales: huge logits or a tiny T then
    neither overflow nor lose their differences (``x · inv_t`` would)."""
    offs = start + tl.arange(0, BLOCK_V)
    mask = offs < vocab
    x = tl.load(row + offs, mask=mask, other=float("-inf"))
    return offs, mask, _shifted(x, shift, inv_t)


@triton.jit
def _shifted(x, shift, inv_t):
    """``(x − shift) · inv_t`` as fp32: float64 logits (which may lie beyond the float range)
    are shifted and scaled in float64 first, the others widened to fp32 exactly."""
    if x.dtype == tl.float64:
        return ((x - shift) * inv_t).to(tl.float32)
    return (x.to(tl.float32) - shift) * inv_t


@triton.jit
def _kept(z, mask, tkey, ties_keep, ties_seen):
    """Which tokens of a block the filters keep: every key above the threshold ``tkey`` and,
    among the ties at it, the first ``ties_keep`` in vocabulary order (``ties_seen`` of them
    came in earlier blocks). Returns the mask and the ties seen so far."""
    key = _order_key(z)
    eq = (key == tkey) & mask
    rank = ties_seen + tl.cumsum(eq.to(tl.int64), 0) - 1
    keep = mask & ((key > tkey) | (eq & (rank < ties_keep)))
    return keep, ties_seen + tl.sum(eq.to(tl.int64), 0)


@triton.jit
def _row_max(row, vocab, BLOCK_V: tl.constexpr):
    """The max of the raw logits of a row, in fp64 for fp64 logits and fp32 otherwise (NaN may
    or may not survive it; a NaN makes the normaliser NaN further on, which is where bad rows
    are detected)."""
    ACC: tl.constexpr = tl.float64 if row.dtype.element_ty == tl.float64 else tl.float32
    mvec = tl.full((BLOCK_V,), float("-inf"), ACC)
    for start in range(0, vocab, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(row + offs, mask=offs < vocab, other=float("-inf")).to(ACC)
        mvec = tl.maximum(mvec, x)
    return tl.max(mvec, 0)


@triton.jit
def _measure_at_least(row, vocab, shift, inv_t, m, key, BY_MASS: tl.constexpr,
                      BLOCK_V: tl.constexpr):
    """Count (or Σ exp(z − m)) of the tokens whose key is ≥ ``key``."""
    acc = tl.zeros((), tl.float64)
    for start in range(0, vocab, BLOCK_V):
        _, mask, z = _load_z(row, start, vocab, shift, inv_t, BLOCK_V)
        sel = (_order_key(z) >= key) & mask
        if BY_MASS:
            acc += tl.sum(tl.where(sel, tl.exp(z - m), 0.0).to(tl.float64), 0)
        else:
            acc += tl.sum(sel.to(tl.float64), 0)
    return acc


@triton.jit
def _select(row, vocab, shift, inv_t, m, target, BY_MASS: tl.constexpr,
            BLOCK_V: tl.constexpr):
    """Largest key t with measure(key ≥ t) ≥ target; returns (t, count_gt, mass_gt, count_eq,
    w_eq). A bit-by-bit search, most significant bit first (32 probes)."""
    res = tl.zeros((), tl.int64)
    for b in range(32):  # a runtime loop: 32 inlined probes would bloat the kernel
        cand = res | (tl.full((), 1, tl.int64) << (31 - b))
        if _measure_at_least(row, vocab, shift, inv_t, m, cand, BY_MASS, BLOCK_V) >= target:
            res = cand
    count_gt = tl.zeros((), tl.int64)
    mass_gt = tl.zeros((), tl.float64)
    count_eq = tl.zeros((), tl.int64)
    w_eq = tl.zeros((), tl.float32)
    for start in range(0, vocab, BLOCK_V):
        _, mask, z = _load_z(row, start, vocab, shift, inv_t, BLOCK_V)
        k = _order_key(z)
        w = tl.exp(z - m)
        gt = (k > res) & mask
        eq = (k == res) & mask
        count_gt += tl.sum(gt.to(tl.int64), 0)
        mass_gt += tl.sum(tl.where(gt, w, 0.0).to(tl.float64), 0)
        count_eq += tl.sum(eq.to(tl.int64), 0)
        w_eq = tl.maximum(w_eq, tl.max(tl.where(eq, w, 0.0), 0))
    return res, count_gt, mass_gt, count_eq, w_eq


@triton.jit
def _row_sums(row, vocab, temp, BLOCK_V: tl.constexpr):
    """Step 1 of the sampler for one row (shared with kernels/truncated_logprobs.py):
    ``(shift, inv_t, s_tot, lse, entropy)`` with ``z = (x − shift)·inv_t`` (``m = max z =
    0``), ``s_tot = Σ exp(z)``, and the whole row's lse and entropy (fp32)."""
    # 1/T: in float64 for float64 logits; else as a float kept normal and finite (T = 1e300
    # would round it to 0, and −inf · 0 is NaN): beyond the float range a temperature acts as
    # the largest one within it.
    if row.dtype.element_ty == tl.float64:
        inv_t = 1.0 / temp
    else:
        inv_t = tl.minimum(tl.maximum((1.0 / temp).to(tl.float32), FLT_MIN), FLT_MAX)
    # 1. the raw max (the shift), then Σ w and Σ w z with z = (x − max)/T ≤ 0, w = exp(z)
    #    (the max of z is m = 0 exactly). An all −inf row is shifted by 0 (z = −inf, S = 0,
    #    lse = −inf); NaN or +inf make S NaN.
    x_max = _row_max(row, vocab, BLOCK_V)
    shift = tl.where(x_max == float("-inf"), 0.0, x_max)
    m = tl.zeros((), tl.float32)
    s_tot = tl.zeros((), tl.float64)
    t_tot = tl.zeros((), tl.float64)
    for start in range(0, vocab, BLOCK_V):
        _, mask, z = _load_z(row, start, vocab, shift, inv_t, BLOCK_V)
        w = tl.where(mask, tl.exp(z - m), 0.0)
        s_tot += tl.sum(w.to(tl.float64), 0)
        t_tot += tl.sum(tl.where(w > 0, w * (z - m), 0.0).to(tl.float64), 0)
    # The whole row's lse and entropy, as floats now: fewer registers live through the filters.
    log_s = tl.log(s_tot)
    lse = (shift.to(tl.float64) / temp + log_s).to(tl.float32)
    ent = (log_s - t_tot / s_tot).to(tl.float32)
    return shift, inv_t, s_tot, lse, ent


@triton.jit
def _kept_set(row, vocab, shift, inv_t, s_tot, i, top_k_ptr, top_p_ptr, min_p_ptr,
              HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr, HAS_MIN_P: tl.constexpr,
              JOINT: tl.constexpr, BLOCK_V: tl.constexpr):
    """Steps 2–3 of the sampler for one row (shared with kernels/truncated_logprobs.py, so that
    both find the kept set — and sum its mass — the same way): ``(tkey, ties_keep, s_kept)``,
    the threshold key and how many ties at it are kept (see :func:`_kept`), and the kept mass.
    The filters of row ``i`` are read at ``i`` of their arrays."""
    m = tl.zeros((), tl.float32)
    # 2. filters → length M of the kept prefix.
    M = vocab.to(tl.int64)
    if HAS_TOP_K:
        k = tl.load(top_k_ptr + i)
        M = tl.where(k < M, tl.maximum(k, 1), M)
    if HAS_TOP_P:
        p = tl.load(top_p_ptr + i)
        base = s_tot
        if not JOINT:
            if M < vocab:
                _, cg, mg, _ce, we = _select(row, vocab, shift, inv_t, m, M.to(tl.float64),
                                             False, BLOCK_V)
                base = mg + (M - cg).to(tl.float64) * we.to(tl.float64)
        if p < 1.0:
            target = p * base
            _, cg, mg, ce, we = _select(row, vocab, shift, inv_t, m, target, True, BLOCK_V)
            take = tl.where(we > 0, tl.ceil((target - mg) / we.to(tl.float64)).to(tl.int64), ce)
            take = tl.minimum(tl.maximum(take, 1), ce)
            M = tl.minimum(M, cg + take)
    if HAS_MIN_P:
        mp = tl.load(min_p_ptr + i).to(tl.float32)
        if mp > 0:
            cnt = tl.zeros((), tl.int64)
            for start in range(0, vocab, BLOCK_V):
                _, mask, z = _load_z(row, start, vocab, shift, inv_t, BLOCK_V)
                cnt += tl.sum(((tl.exp(z - m) >= mp) & mask).to(tl.int64), 0)
            M = tl.minimum(M, tl.maximum(cnt, 1))
    tkey = tl.zeros((), tl.int64)
    ties_keep = vocab.to(tl.int64)
    if M < vocab:
        tkey, cg, _mg, _ce, _we = _select(row, vocab, shift, inv_t, m, M.to(tl.float64),
                                          False, BLOCK_V)
        ties_keep = M - cg

    # 3. the kept mass.
    s_kept = tl.zeros((), tl.float64)
    ties_seen = tl.zeros((), tl.int64)
    for start in range(0, vocab, BLOCK_V):
        _, mask, z = _load_z(row, start, vocab, shift, inv_t, BLOCK_V)
        keep, ties_seen = _kept(z, mask, tkey, ties_keep, ties_seen)
        s_kept += tl.sum(tl.where(keep, tl.exp(z - m), 0.0).to(tl.float64), 0)
    return tkey, ties_keep, s_kept


@triton.jit
def _kept_logprob(x_tok, shift, inv_t, s_kept):
    """log(w_tok / S_kept) of a kept token (fp32): the processed log-prob of the sampler and
    the truncated log-prob of kernels/truncated_logprobs.py, one expression. A weight that
    underflowed to 0 (z below about −103) takes z itself for its log: finite
    (rlkern/kept_key.h's kept_log_weight)."""
    z_tok = _shifted(x_tok, shift, inv_t)
    w_tok = tl.exp(z_tok - tl.zeros((), tl.float32)).to(tl.float64)
    log_w = tl.where(w_tok > 0.0, tl.log(w_tok), z_tok.to(tl.float64))
    return (log_w - tl.log(s_kept)).to(tl.float32)


@triton.jit
def _source_row(logits_ptr, indices_ptr, stride_row, HAS_INDICES: tl.constexpr):
    """This program's source row ``i`` and its logits (row ``indices[i]``, or ``i``)."""
    i = tl.program_id(0).to(tl.int64)
    if HAS_INDICES:
        r = tl.load(indices_ptr + i)
    else:
        r = i
    return i, logits_ptr + r * stride_row


@triton.jit
def _sample_kernel(
    logits_ptr,  # (R, V) bf16/fp16/fp32/fp64, unit vocab stride
    indices_ptr,  # (N,) int64; unused unless HAS_INDICES
    temperature_ptr,  # (N,) fp64
    top_k_ptr,  # (N,) int64; unused unless HAS_TOP_K
    top_p_ptr,  # (N,) fp64; unused unless HAS_TOP_P
    min_p_ptr,  # (N,) fp64; unused unless HAS_MIN_P
    seeds_ptr,  # (N,) int64
    steps_ptr,  # (N,) int64
    tokens_ptr,  # (N·G,) int64 out
    raw_ptr,  # (N·G,) fp32 out
    proc_ptr,  # (N·G,) fp32 out
    entropy_ptr,  # (N·G,) fp32 out; untouched unless HAS_ENTROPY
    lse_ptr,  # (N·G,) fp32 out
    vocab,
    stride_row,
    num_samples,  # G: draws per row (draw j: Philox index j, output row i·G + j)
    # Which optional inputs / outputs exist (the matching pointers are placeholders otherwise),
    # the filter order (JOINT: filter_order == joint, rlkern/sample.h), the raw-logprob
    # convention and the vocabulary block.
    HAS_INDICES: tl.constexpr, HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr,
    HAS_MIN_P: tl.constexpr, HAS_ENTROPY: tl.constexpr,
    JOINT: tl.constexpr, RAW_TEMPERATURE: tl.constexpr, BLOCK_V: tl.constexpr,
    # Whether this kernel writes the raw log-probs (float64 logits; the others get them from
    # _raw_logprobs_kernel, the token-logprobs forward's arithmetic).
    RAW_HERE: tl.constexpr,
    MULTI: tl.constexpr,  # num_samples > 1
):
    i, row = _source_row(logits_ptr, indices_ptr, stride_row, HAS_INDICES)
    temp = tl.load(temperature_ptr + i)
    shift, inv_t, s_tot, lse, ent = _row_sums(row, vocab, temp, BLOCK_V)
    # Stored now: fewer values live below.
    if MULTI:
        for j in range(num_samples):
            tl.store(lse_ptr + i * num_samples + j, lse)
            if HAS_ENTROPY:
                tl.store(entropy_ptr + i * num_samples + j, ent)
    else:
        tl.store(lse_ptr + i, lse)
        if HAS_ENTROPY:
            tl.store(entropy_ptr + i, ent)
    tkey, ties_keep, s_kept = _kept_set(row, vocab, shift, inv_t, s_tot, i, top_k_ptr,
                                        top_p_ptr, min_p_ptr, HAS_TOP_K, HAS_TOP_P, HAS_MIN_P,
                                        JOINT, BLOCK_V)
    log_s = tl.log(s_tot)
    sr = tl.zeros((), tl.float64)
    if RAW_HERE and not RAW_TEMPERATURE:
        # The untempered logits: z with inv_t = 1 (an exact multiply), shifted by the max.
        for start in range(0, vocab, BLOCK_V):
            _, _, x = _load_z(row, start, vocab, shift, 1.0, BLOCK_V)
            sr += tl.sum(tl.exp(x).to(tl.float64), 0)
    seed = tl.load(seeds_ptr + i)
    step = tl.load(steps_ptr + i)

    # 4. one inverse-CDF draw in vocabulary order per sample, over the kept set. One draw
    #    (MULTI off) without the loop over draws: the loop costs registers (spills on sm_90).
    if MULTI:
        for j in range(num_samples):
            _draw_one(row, vocab, shift, inv_t, tkey, ties_keep, s_tot, s_kept, log_s, sr,
                      _philox_uniform(seed, step, j), i * num_samples + j, tokens_ptr,
                      raw_ptr, proc_ptr, RAW_TEMPERATURE, RAW_HERE, BLOCK_V)
    else:
        _draw_one(row, vocab, shift, inv_t, tkey, ties_keep, s_tot, s_kept, log_s, sr,
                  _philox_uniform(seed, step, 0), i, tokens_ptr, raw_ptr, proc_ptr,
                  RAW_TEMPERATURE, RAW_HERE, BLOCK_V)


@triton.jit
def _draw_one(row, vocab, shift, inv_t, tkey, ties_keep, s_tot, s_kept, log_s, sr, u, o,
              tokens_ptr, raw_ptr, proc_ptr, RAW_TEMPERATURE: tl.constexpr,
              RAW_HERE: tl.constexpr, BLOCK_V: tl.constexpr):
    """The inverse-CDF draw for the uniform ``u`` over the kept set, in vocabulary order, into
    output row ``o``: token, processed log-prob and (RAW_HERE) raw log-prob."""
    m = tl.zeros((), tl.float32)
    target = u * s_kept
    acc = tl.zeros((), tl.float64)
    tok = tl.full((), -1, tl.int64)
    last = tl.full((), -1, tl.int64)
    ties_seen = tl.zeros((), tl.int64)
    for start in range(0, vocab, BLOCK_V):
        offs, mask, z = _load_z(row, start, vocab, shift, inv_t, BLOCK_V)
        keep, ties_seen = _kept(z, mask, tkey, ties_keep, ties_seen)
        w = tl.exp(z - m)
        keep = keep & (w > 0)
        wk = tl.where(keep, w, 0.0).to(tl.float64)
        cs = acc + tl.cumsum(wk, 0)
        hit = keep & (cs > target)
        first = tl.min(tl.where(hit, offs.to(tl.int64), vocab.to(tl.int64)), 0)
        tok = tl.where((tok < 0) & (first < vocab), first, tok)
        last = tl.maximum(last, tl.max(tl.where(keep, offs.to(tl.int64), -1), 0))
        acc += tl.sum(wk, 0)
    tok = tl.where(tok < 0, last, tok)  # u · S rounded above the last step: last kept token
    # A row that cannot be sampled (NaN or +inf: S is NaN; all −inf: S = 0) gets token −1 and
    # NaN logprobs; its logits are not read at −1.
    tok = tl.where(s_tot > 0, tok, -1)
    tok_ok = tok >= 0
    tl.store(tokens_ptr + o, tok)
    x_tok = tl.load(row + tok, mask=tok_ok, other=float("nan"))
    tl.store(proc_ptr + o, _kept_logprob(x_tok, shift, inv_t, s_kept))
    if RAW_HERE:
        if RAW_TEMPERATURE:
            z_tok = _shifted(x_tok, shift, inv_t)
            tl.store(raw_ptr + o, ((z_tok - m).to(tl.float64) - log_s).to(tl.float32))
        else:
            tl.store(raw_ptr + o, (_shifted(x_tok, shift, 1.0).to(tl.float64) - tl.log(sr))
                     .to(tl.float32))


@triton.jit
def _raw_logprobs_kernel(
    logits_ptr,  # (R, V) bf16/fp16/fp32, unit vocab stride
    indices_ptr,  # (N,) int64; unused unless HAS_INDICES
    temperature_ptr,  # (N,) fp64
    tokens_ptr,  # (N·G,) int64: the sampler's draws (−1: a row that cannot be sampled)
    raw_ptr,  # (N·G,) fp32 out
    vocab,
    stride_row,
    num_samples,
    HAS_INDICES: tl.constexpr, RAW_TEMPERATURE: tl.constexpr,
    BLOCK_V: tl.constexpr, SEG_V: tl.constexpr, VEC: tl.constexpr,
):
    """Raw log-probs of the drawn tokens by the token-logprobs forward's own row summary and
    formula (kernels/logprobs.py, launched with the same launch_config), so that they equal
    ``rlkern.token_logprobs(..., temperature=T)`` (``T = 1`` without raw_temperature) bit for
    bit. 1/T is split into the fp32 pair the logprobs launcher passes (split_inv_temperature).
    A separate launch: in the sampler kernel the summary's tiles would spill registers."""
    i, row = _source_row(logits_ptr, indices_ptr, stride_row, HAS_INDICES)
    if RAW_TEMPERATURE:
        inv_raw = tl.minimum(1.0 / tl.load(temperature_ptr + i), FLT_MAX)
    else:
        inv_raw = tl.full((), 1.0, tl.float64)
    hi = inv_raw.to(tl.float32)
    lo = (inv_raw - hi.to(tl.float64)).to(tl.float32)
    _, scale = row_scales(hi, lo, tl.float32)
    m, s, _t, _u, _rel, _cnt = row_summary(row, vocab, vocab, scale, tl.float32, BLOCK_V, SEG_V,
                                           VEC, False, False)
    row_m, _ref, _delta, _beta, _s_row, log2_s = merge_summaries(m, s, scale)
    for j in range(num_samples):
        o = i * num_samples + j
        tok = tl.load(tokens_ptr + o)
        x_tok = tl.load(row + tok, mask=tok >= 0, other=float("nan")).to(tl.float32)
        tl.store(raw_ptr + o, ((x_tok - row_m) * scale - log2_s) * LN2)


def _block_v(vocab: int) -> int:
    return min(4096, max(16, triton.next_power_of_2(vocab)))


def sample(logits, indices, temperature, top_k, top_p, min_p, seeds, steps, joint,
           raw_temperature, tokens, raw, proc, entropy, lse, num_samples: int = 1) -> None:
    """Launch one program per source row (``seeds.numel()`` rows, ``num_samples`` draws each
    into ``tokens.numel()`` output rows); fills the outputs."""
    n = seeds.numel()
    if n == 0:
        return
    vocab = logits.shape[1]
    dummy = tokens
    # Raw log-probs: float64 logits in the sampler kernel (shifted in float64, exact at any
    # magnitude and temperature, as the CPU kernel); the others by _raw_logprobs_kernel with
    # the logprobs forward's launch_config (its warps too: its row summary's cross-segment
    # sums then reduce in the same order on a GPU).
    raw_here = logits.element_size() == 8
    cfg = launch_config(vocab, logits.element_size())
    _sample_kernel[(n,)](
        logits, indices if indices is not None else dummy, temperature,
        top_k if top_k is not None else dummy, top_p if top_p is not None else temperature,
        min_p if min_p is not None else temperature, seeds, steps, tokens, raw, proc,
        entropy if entropy is not None else raw, lse, vocab,
        logits.stride(0) if logits.shape[0] > 1 else vocab, num_samples,
        HAS_INDICES=indices is not None, HAS_TOP_K=top_k is not None,
        HAS_TOP_P=top_p is not None, HAS_MIN_P=min_p is not None,
        HAS_ENTROPY=entropy is not None, JOINT=bool(joint),
        RAW_TEMPERATURE=bool(raw_temperature), BLOCK_V=_block_v(vocab), RAW_HERE=raw_here,
        MULTI=num_samples > 1,
    )
    if not raw_here:
        _raw_logprobs_kernel[(n,)](
            logits, indices if indices is not None else dummy, temperature, tokens, raw, vocab,
            logits.stride(0) if logits.shape[0] > 1 else vocab, num_samples,
            HAS_INDICES=indices is not None, RAW_TEMPERATURE=bool(raw_temperature),
            BLOCK_V=cfg.block_v, SEG_V=cfg.seg_v, VEC=cfg.vec, num_warps=cfg.num_warps,
        )


def _aot_specs() -> list[dict[str, Any]]:
    """Default configurations for ahead-of-time compilation: V = 151936, bf16 logits, plain
    sampling and top-k + top-p (the filtered path) with entropy. (Each compile takes ~20 s on
    the 2-core build machine, so the list is kept to the two paths that matter.)"""
    specs: list[dict[str, Any]] = []
    for vocab in (151936,):
        for dtype in ("bf16",):
            signature = {
                "logits_ptr": f"*{dtype}", "indices_ptr": "*i64", "temperature_ptr": "*fp64",
                "top_k_ptr": "*i64", "top_p_ptr": "*fp64", "min_p_ptr": "*fp64",
                "seeds_ptr": "*i64", "steps_ptr": "*i64", "tokens_ptr": "*i64",
                "raw_ptr": "*fp32", "proc_ptr": "*fp32", "entropy_ptr": "*fp32",
                "lse_ptr": "*fp32", "vocab": "i32", "stride_row": "i64",
                "num_samples": "i32",
            }
            names = ("HAS_INDICES", "HAS_TOP_K", "HAS_TOP_P", "HAS_MIN_P", "HAS_ENTROPY",
                     "JOINT", "RAW_TEMPERATURE", "BLOCK_V", "RAW_HERE", "MULTI")
            cfg = launch_config(vocab, 2)
            signature.update({k: "constexpr" for k in names})
            for label, (has_k, has_p) in (("plain", (False, False)), ("top_k+top_p", (True, True))):
                constexprs = {"HAS_INDICES": False, "HAS_TOP_K": has_k, "HAS_TOP_P": has_p,
                              "HAS_MIN_P": False, "HAS_ENTROPY": True, "JOINT": False,
                              "RAW_TEMPERATURE": True, "BLOCK_V": _block_v(vocab),
                              "RAW_HERE": False, "MULTI": False}
                specs.append(aot_spec(f"sample {dtype} V={vocab} {label}", _sample_kernel,
                                      signature, constexprs, 8 if vocab > 4096 else 4,
                                      [k for k in signature if k.endswith("_ptr")]))
            raw_sig = aot_signature(_raw_logprobs_kernel, {
                "logits_ptr": f"*{dtype}", "indices_ptr": "*i64", "temperature_ptr": "*fp64",
                "tokens_ptr": "*i64", "raw_ptr": "*fp32", "vocab": "i32", "stride_row": "i64",
                "num_samples": "i32"})
            specs.append(aot_spec(
                f"sample raw logprobs {dtype} V={vocab}", _raw_logprobs_kernel, raw_sig,
                {"HAS_INDICES": False, "RAW_TEMPERATURE": True, "BLOCK_V": cfg.block_v,
                 "SEG_V": cfg.seg_v, "VEC": cfg.vec}, cfg.num_warps,
                [k for k in raw_sig if k.endswith("_ptr")]))
    return specs


AOT_SPECS: list[dict[str, Any]] = _aot_specs()
