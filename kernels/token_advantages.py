"""Triton kernels for the token-, step- and turn-level helpers of ALGORITHMS.md §2.1.

* ``_discounted_returns_kernel`` — one program per row, a reverse linear-recurrence scan with
  ``tl.associative_scan``;
* ``_gae_kernel`` — one program per block of rows, a sequential reverse loop over T (GAE with
  verl's carry over masked tokens);
* ``_position_sums_kernel`` — per group × block of positions: the IGPO baseline or the GTPO
  weights;
* ``_empg_kernel`` — one program: two reductions and the modulation.

GiGPO reuses the group kernels of ``rlkern.kernels.advantages`` (prompt groups, then step
groups). This module imports only triton; the launchers take tensors (anything Triton accepts
as a pointer). ``AOT_SPECS`` lists configurations for ahead-of-time compilation
(``rlkern aot-report``).
"""

from __future__ import annotations

import struct
from typing import Any

import triton
import triton.language as tl

__all__ = ["AOT_SPECS", "discounted_returns", "empg_modulate", "gae", "position_sums"]


@triton.jit
def _discount_product(a, g):
    # a·g, exactly 0 where either factor is 0 (discount_product of rlkern/group_stats.h): a
    # reset (a = 0) drops the carry even when it is ±inf or NaN, so nothing leaks across it.
    return tl.where(a == 0.0, 0.0, tl.where(g == 0.0, 0.0, a * g))


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    # f2 ∘ f1 for f(G) = b + a·G: applying the earlier (a1, b1) first.
    return _discount_product(a1, a2), b2 + _discount_product(a2, b1)


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
    """One program per row: G[t] = r[t] + a[t]·G[t + 1], a = γ·(1 − reset[t]), scanned from
    the end (a zero a drops the carry, whatever it holds).

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
        g = b_acc + _discount_product(a_acc, carry)
        tl.store(out_ptr + base + t, g, mask=ok)
        carry = tl.sum(tl.where(k == BLOCK_T - 1, g, 0.0), axis=0)  # the chunk's last (= t0)


@triton.jit
def _gae_kernel(
    rewards_ptr,  # (N, T) fp32 / fp64, contiguous
    values_ptr,  # (N, T) like rewards, read when HAS_VALUES
    mask_ptr,  # (N, T) bool
    adv_ptr,  # (N, T) like rewards
    ret_ptr,  # (N, T) like rewards
    n_rows,
    seq_len,
    gamma,  # γ rounded to fp32 ...
    gamma_lo,  # ... and its residual (Triton float arguments are fp32)
    gamma_lam,  # γλ, likewise
    gamma_lam_lo,
    HAS_VALUES: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program per block of BLOCK_N rows, positions from last to first (gae_step of
    rlkern/group_stats.h)::

        g = (r_t + γ·nv − V_t) + γλ·lg;   where mask_t: nv ← V_t, lg ← g
        advantages_t = lg,   returns_t = lg + V_t

    The carry is sequential in t; the rows of a block advance together (the loads of one step
    are strided by T: each element is read once). Accumulation is float64."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    g64 = tl.cast(gamma, tl.float64) + tl.cast(gamma_lo, tl.float64)
    gl64 = tl.cast(gamma_lam, tl.float64) + tl.cast(gamma_lam_lo, tl.float64)
    next_value = tl.zeros((BLOCK_N,), tl.float64)
    last_gae = tl.zeros((BLOCK_N,), tl.float64)
    for k in range(0, seq_len):
        offs = rows * seq_len + (seq_len - 1 - k)
        r = tl.load(rewards_ptr + offs, mask=row_ok, other=0.0).to(tl.float64)
        if HAS_VALUES:
            v = tl.load(values_ptr + offs, mask=row_ok, other=0.0).to(tl.float64)
        else:
            v = tl.zeros((BLOCK_N,), tl.float64)
        valid = tl.load(mask_ptr + offs, mask=row_ok, other=0) != 0
        g = (r + _discount_product(g64, next_value) - v) + _discount_product(gl64, last_gae)
        next_value = tl.where(valid, v, next_value)
        last_gae = tl.where(valid, g, last_gae)
        tl.store(adv_ptr + offs, last_gae, mask=row_ok)
        tl.store(ret_ptr + offs, last_gae + v, mask=row_ok)


@triton.jit
def _floor(x, eps):
    # max(x, eps) that keeps a NaN x NaN, as std::max(x, eps) in C++ and clamp_min in torch
    # (tl.maximum returns eps for a NaN x).
    return tl.where(x < eps, eps, x)


@triton.jit
def _position_values(x_ptr, mask_ptr, perm_ptr, k, t, t_ok, seq_len, CONTIGUOUS: tl.constexpr):
    """The k-th row of the segments (rows perm[k], or k itself): its index, validity and values
    (float64) at the positions t."""
    row = k if CONTIGUOUS else tl.load(perm_ptr + k)
    v = tl.load(mask_ptr + row * seq_len + t, mask=t_ok, other=0) != 0
    return row, v, tl.load(x_ptr + row * seq_len + t, mask=t_ok & v, other=0.0).to(tl.float64)


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
    start = g * group_size if CONTIGUOUS else tl.load(offsets_ptr + g)
    count = group_size if CONTIGUOUS else tl.load(offsets_ptr + g + 1) - start
    sum_a = tl.zeros((BLOCK_T,), tl.float64)
    sum_b = tl.zeros((BLOCK_T,), tl.float64)
    for j in range(0, count):
        row, v, x = _position_values(x_ptr, mask_ptr, perm_ptr, start + j, t, t_ok, seq_len,
                                     CONTIGUOUS)
        if GTPO:
            sum_a += tl.where(v, x, 0.0)
            sum_b += tl.where(v, 1.0 / _floor(x, eps), 0.0)
        else:
            sum_a += tl.where(v, x, 0.0)
            sum_b += v.to(tl.float64)
    for j in range(0, count):
        row, v, x = _position_values(x_ptr, mask_ptr, perm_ptr, start + j, t, t_ok, seq_len,
                                     CONTIGUOUS)
        if GTPO:
            w = tl.where(v & (sum_a != 0.0), x / tl.where(sum_a != 0.0, sum_a, 1.0), 0.0)
            w_inv = tl.where(v, (1.0 / _floor(x, eps)) / tl.where(v, sum_b, 1.0), 0.0)
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


def discounted_returns(rewards: Any, reset: Any | None, out: Any, *, gamma: float) -> None:
    """``out`` = discounted returns of contiguous ``(N, T)`` rewards (float64 accumulation)."""
    n, t = rewards.shape
    if n * t == 0:
        return
    block_t = max(16, min(1024, triton.next_power_of_2(t)))
    _discounted_returns_kernel[(n,)](
        rewards, reset if reset is not None else rewards, out, t, *_split_fp32(gamma),
        HAS_RESET=reset is not None, BLOCK_T=block_t, num_warps=4)


def gae(rewards: Any, values: Any | None, mask: Any, adv: Any, ret: Any, *, gamma: float,
        lam: float) -> None:
    """``adv``, ``ret`` = GAE advantages and returns of contiguous ``(N, T)`` inputs (float64
    accumulation); ``values`` None means V = 0."""
    n, t = rewards.shape
    if n * t == 0:
        return
    block_n = 64 if n >= 64 else max(16, triton.next_power_of_2(n))
    _gae_kernel[(triton.cdiv(n, block_n),)](
        rewards, values if values is not None else rewards, mask, adv, ret, n, t,
        *_split_fp32(gamma), *_split_fp32(float(gamma) * float(lam)),
        HAS_VALUES=values is not None, BLOCK_N=block_n, num_warps=2)


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
    """The helpers at their largest blocks, float32 inputs."""
    specs: list[dict[str, Any]] = []
    specs.append({"name": "discounted_returns BLOCK_T=1024", "fn": _discounted_returns_kernel,
                  "signature": {"rewards_ptr": "*fp32", "reset_ptr": "*i1", "out_ptr": "*fp32",
                                "seq_len": "i32", "gamma": "fp32", "gamma_lo": "fp32",
                                "HAS_RESET": "constexpr",
                                "BLOCK_T": "constexpr"},
                  "constexprs": {"HAS_RESET": True, "BLOCK_T": 1024}, "num_warps": 4,
                  "divisible_by_16": ["rewards_ptr", "reset_ptr", "out_ptr"]})
    specs.append({"name": "gae BLOCK_N=64", "fn": _gae_kernel,
                  "signature": {"rewards_ptr": "*fp32", "values_ptr": "*fp32",
                                "mask_ptr": "*i1", "adv_ptr": "*fp32", "ret_ptr": "*fp32",
                                "n_rows": "i32", "seq_len": "i32", "gamma": "fp32",
                                "gamma_lo": "fp32", "gamma_lam": "fp32",
                                "gamma_lam_lo": "fp32", "HAS_VALUES": "constexpr",
                                "BLOCK_N": "constexpr"},
                  "constexprs": {"HAS_VALUES": True, "BLOCK_N": 64}, "num_warps": 2,
                  "divisible_by_16": ["rewards_ptr", "values_ptr", "mask_ptr", "adv_ptr",
                                      "ret_ptr"]})
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
