"""Triton kernels of verl's optimal token baseline (OTB / TIR-OTB), see
``rlkern.ops.token_baseline`` for the formula.

* ``_otb_rows_kernel`` — one program per row, chunks of T: the reward-to-go ``G`` (the
  ``returns`` output; a reverse scan, chunks back to front) and the cumulative weight ``W``,
  both written into float64 scratch rows at the aligned index ``k`` of each valid token
  (``k = t``, or its rank among the row's valid tokens for TIR-OTB, whose position is kept in
  ``pos``), and the row's valid-token count;
* ``_otb_groups_kernel`` — one program per (group, block of k): the zero-tail bookkeeping of
  the group (its rows' lengths), the sums ``Σ G·W`` and ``Σ W`` over its rows, then
  ``A = G − B`` written at each member's valid tokens.

Accumulation is float64. Rows are visited group after group through ``perm`` / ``offsets``
(``rlkern.ops.advantages_segmented.segments``). This module imports only triton.
"""

from __future__ import annotations

import struct
from typing import Any

import triton
import triton.language as tl

__all__ = ["AOT_SPECS", "optimal_token_baseline"]


@triton.jit
def _otb_rows_kernel(
    rewards_ptr,  # (N, T) fp32 / fp64
    mask_ptr,  # (N, T) bool
    logp_ptr,  # (N, T) like rewards
    spi2_ptr,  # (N, T) like rewards
    rho_ptr,  # (N, T) like rewards, read when HAS_RHO
    ret_ptr,  # (N, T) like rewards: G
    g_ptr,  # (N, T) fp64 scratch, zero-initialised: G at aligned index k
    w_ptr,  # (N, T) fp64 scratch, zero-initialised: W at aligned index k
    pos_ptr,  # (N, T) int32 scratch: the position of aligned index k (MULTI only)
    len_ptr,  # (N,) int64: valid tokens per row
    seq_len,
    HAS_RHO: tl.constexpr,
    MULTI: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * seq_len
    num_chunks = tl.cdiv(seq_len, BLOCK_T)
    # the row's valid-token count L (TIR-OTB's aligned index of t is L − #valid at ≥ t)
    length = tl.zeros((), tl.int64)
    for c in range(0, num_chunks):
        t = c * BLOCK_T + tl.arange(0, BLOCK_T)
        length += tl.sum((tl.load(mask_ptr + base + t, mask=t < seq_len, other=0) != 0)
                         .to(tl.int64))
    # G, chunks back to front: a reverse scan, so a non-finite reward reaches only the
    # positions before it (as the sequential sum does)
    carry_g = tl.zeros((), tl.float64)
    carry_n = tl.zeros((), tl.int64)
    for c in range(0, num_chunks):
        t = (num_chunks - 1 - c) * BLOCK_T + tl.arange(0, BLOCK_T)
        ok = t < seq_len
        v = tl.load(mask_ptr + base + t, mask=ok, other=0) != 0
        r = tl.load(rewards_ptr + base + t, mask=v, other=0.0).to(tl.float64)
        g = carry_g + tl.cumsum(r, axis=0, reverse=True)
        tl.store(ret_ptr + base + t, g, mask=ok)
        at_or_after = carry_n + tl.cumsum(v.to(tl.int64), axis=0, reverse=True)
        k = length - at_or_after if MULTI else t.to(tl.int64)
        tl.store(g_ptr + base + k, g, mask=v)
        carry_g += tl.sum(r)
        carry_n += tl.sum(v.to(tl.int64))
    # W, chunks front to back
    carry_w = tl.zeros((), tl.float64)
    carry_c = tl.zeros((), tl.int64)
    for c in range(0, num_chunks):
        t = c * BLOCK_T + tl.arange(0, BLOCK_T)
        ok = t < seq_len
        v = tl.load(mask_ptr + base + t, mask=ok, other=0) != 0
        lp = tl.load(logp_ptr + base + t, mask=v, other=0.0).to(tl.float64)
        sp = tl.load(spi2_ptr + base + t, mask=v, other=0.0).to(tl.float64)
        w = 1.0 - 2.0 * tl.exp(lp) + sp
        if HAS_RHO:
            rho = tl.load(rho_ptr + base + t, mask=v, other=0.0).to(tl.float64)
            w = w * rho * rho
        w = tl.where(v, w, 0.0)
        cw = carry_w + tl.cumsum(w, axis=0)
        k = carry_c + tl.cumsum(v.to(tl.int64), axis=0) - 1 if MULTI else t.to(tl.int64)
        tl.store(w_ptr + base + k, cw, mask=v)
        if MULTI:
            tl.store(pos_ptr + base + k, t, mask=v)
        carry_w += tl.sum(w)
        carry_c += tl.sum(v.to(tl.int64))
    tl.store(len_ptr + row, carry_c)


@triton.jit
def _otb_groups_kernel(
    g_ptr,  # (N, T) fp64 scratch of _otb_rows_kernel
    w_ptr,  # (N, T) fp64 scratch
    pos_ptr,  # (N, T) int32 scratch (MULTI only)
    len_ptr,  # (N,) int64
    mask_ptr,  # (N, T) bool
    perm_ptr,  # (N,) int64: rows group after group
    offsets_ptr,  # (K + 1,) int64
    adv_ptr,  # (N, T) zero-initialised output
    seq_len,
    eps,  # eps rounded to fp32 (Triton float arguments are fp32) ...
    eps_lo,  # ... and its residual: together ~48 bits of eps
    MULTI: tl.constexpr,
    ZERO_TAIL: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    grp = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    k_ok = k < seq_len
    start = tl.load(offsets_ptr + grp)
    count = tl.load(offsets_ptr + grp + 1) - start
    # the group's members (TIR-OTB: rows with a valid token), its longest length, the number
    # of rows of that length, the next length and the longest row
    size = tl.zeros((), tl.int64)
    longest = tl.full((), -1, tl.int64)
    second = tl.full((), -1, tl.int64)
    ties = tl.zeros((), tl.int64)
    tail_row = tl.full((), -1, tl.int64)
    num = tl.zeros((BLOCK_T,), tl.float64)
    den = tl.zeros((BLOCK_T,), tl.float64)
    for j in range(0, count):
        row = tl.load(perm_ptr + start + j)
        length = tl.load(len_ptr + row)
        if MULTI:
            member = length > 0
        else:
            member = length >= 0  # every row
        lm = tl.where(member, length, -1)
        gt = lm > longest
        eq = member & (lm == longest)
        second = tl.where(gt | eq, longest, tl.where(lm > second, lm, second))
        ties = tl.where(gt, tl.full((), 1, tl.int64), tl.where(eq, ties + 1, ties))
        tail_row = tl.where(gt, row, tail_row)
        longest = tl.where(gt, lm, longest)
        size += member.to(tl.int64)
        # scratch entries are 0 at invalid aligned indices: plain sums
        g = tl.load(g_ptr + row * seq_len + k, mask=k_ok, other=0.0)
        w = tl.load(w_ptr + row * seq_len + k, mask=k_ok, other=0.0)
        num += g * w
        den += w
    b = num / (den + (tl.cast(eps, tl.float64) + tl.cast(eps_lo, tl.float64)))
    if ZERO_TAIL:
        tail = (ties == 1) & (longest > second) & (size >= 2)
    else:
        tail = size < 0  # never
    for j in range(0, count):
        row = tl.load(perm_ptr + start + j)
        length = tl.load(len_ptr + row)
        if MULTI:
            ok = k_ok & (k < length)
            t = tl.load(pos_ptr + row * seq_len + k, mask=ok, other=0).to(tl.int64)
        else:
            ok = k_ok & (tl.load(mask_ptr + row * seq_len + k, mask=k_ok, other=0) != 0)
            t = k.to(tl.int64)
        g = tl.load(g_ptr + row * seq_len + k, mask=ok, other=0.0)
        zero = (size < 2) | (tail & (row == tail_row) & (k >= second))
        tl.store(adv_ptr + row * seq_len + t, g - tl.where(zero, 0.0, b), mask=ok)


def _split_fp32(value: float) -> tuple[float, float]:
    """``value`` as an fp32 number plus its fp32 residual (Triton float arguments are fp32)."""
    hi = struct.unpack("f", struct.pack("f", float(value)))[0]
    return hi, float(value) - hi


def optimal_token_baseline(rewards: Any, mask: Any, logp: Any, spi2: Any, rho: Any | None,
                           perm: Any, offsets: Any, num_groups: int, adv: Any, ret: Any,
                           g_scratch: Any, w_scratch: Any, pos_scratch: Any, lengths: Any, *,
                           multi_turn: bool, zero_tail: bool, eps: float) -> None:
    """Fill ``ret`` (G) and ``adv`` (zero-initialised by the caller) for ``(N, T)`` inputs;
    the scratch tensors (zero-initialised fp64 ``(N, T)`` ×2, int32 ``(N, T)``, int64
    ``(N,)``) are the caller's."""
    n, t = rewards.shape
    if n * t == 0:
        return
    block_t = max(16, min(1024, triton.next_power_of_2(t)))
    _otb_rows_kernel[(n,)](rewards, mask, logp, spi2, rho if rho is not None else rewards, ret,
                           g_scratch, w_scratch, pos_scratch, lengths, t, HAS_RHO=rho is not None,
                           MULTI=multi_turn, BLOCK_T=block_t, num_warps=4)
    block_k = max(16, min(256, triton.next_power_of_2(t)))
    _otb_groups_kernel[(num_groups, triton.cdiv(t, block_k))](
        g_scratch, w_scratch, pos_scratch, lengths, mask, perm, offsets, adv, t, *_split_fp32(eps),
        MULTI=multi_turn, ZERO_TAIL=zero_tail, BLOCK_T=block_k, num_warps=2)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation specs (consumed by rlkern.aot)


def _aot_specs() -> list[dict[str, Any]]:
    """Both kernels, float32 inputs, multi-turn (the superset of the code paths)."""
    return [
        {"name": "otb rows BLOCK_T=1024", "fn": _otb_rows_kernel,
         "signature": {"rewards_ptr": "*fp32", "mask_ptr": "*i1", "logp_ptr": "*fp32",
                       "spi2_ptr": "*fp32", "rho_ptr": "*fp32", "ret_ptr": "*fp32",
                       "g_ptr": "*fp64", "w_ptr": "*fp64", "pos_ptr": "*i32",
                       "len_ptr": "*i64", "seq_len": "i32", "HAS_RHO": "constexpr",
                       "MULTI": "constexpr", "BLOCK_T": "constexpr"},
         "constexprs": {"HAS_RHO": True, "MULTI": True, "BLOCK_T": 1024}, "num_warps": 4,
         "divisible_by_16": ["rewards_ptr", "mask_ptr", "logp_ptr", "spi2_ptr", "rho_ptr",
                             "ret_ptr", "g_ptr", "w_ptr", "pos_ptr", "len_ptr"]},
        {"name": "otb groups BLOCK_T=256", "fn": _otb_groups_kernel,
         "signature": {"g_ptr": "*fp64", "w_ptr": "*fp64", "pos_ptr": "*i32", "len_ptr": "*i64",
                       "mask_ptr": "*i1", "perm_ptr": "*i64", "offsets_ptr": "*i64",
                       "adv_ptr": "*fp32", "seq_len": "i32", "eps": "fp32", "eps_lo": "fp32",
                       "MULTI": "constexpr", "ZERO_TAIL": "constexpr", "BLOCK_T": "constexpr"},
         "constexprs": {"MULTI": True, "ZERO_TAIL": True, "BLOCK_T": 256}, "num_warps": 2,
         "divisible_by_16": ["g_ptr", "w_ptr", "pos_ptr", "len_ptr", "mask_ptr", "perm_ptr",
                             "offsets_ptr", "adv_ptr"]},
    ]


AOT_SPECS: list[dict[str, Any]] = _aot_specs()
