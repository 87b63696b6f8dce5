"""Triton token log-probs under the sampler's truncated distribution (ALGORITHMS.md §4, §1):
one program per row.

The kept set and the kept mass come from the sampler's own helpers (``_row_sums``,
``_kept_set`` of kernels/sample.py: the same passes, the same block size, the same summation
order), and the label's log-prob is the sampler's expression ``_kept_logprob`` — so
``logprobs`` equal the Triton sampler's processed log-probs bit for bit. Then::

    logprobs = log q_y  (−inf for y ∉ K),   entropy = log S_K − Σ_K w z / S_K,
    lse      = max x / T + log S

Backward (K fixed), one more pass that writes the gradient::

    ∂/∂x_v = ( g_lse p_v + [v ∈ K] q_v (g_ent (E − z_v) − g_lp') + [v = y] g_lp' ) / T

with ``E = Σ_K q z`` and ``g_lp' = g_lp`` when ``y ∈ K`` (else 0). This module imports only
triton; the launchers receive tensors as pointers.
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

from rlkern.kernels._common import aot_signature, aot_spec
from rlkern.kernels.sample import _block_v, _kept, _kept_logprob, _kept_set, _load_z, _row_sums

__all__ = ["AOT_SPECS", "truncated_logprobs_bwd", "truncated_logprobs_fwd"]


@triton.jit
def _kept_pass(row, vocab, shift, inv_t, tkey, ties_keep, y, BLOCK_V: tl.constexpr):
    """One pass over the kept set: ``(Σ_K w z, whether label y is kept with z_y > −inf)`` (w =
    exp(z), z ≤ 0). A kept label whose weight underflowed to 0 is kept: its log-prob is
    finite (``_kept_logprob``) and so is its gradient; a −inf logit's is not."""
    e = tl.zeros((), tl.float64)
    y_kept = tl.zeros((), tl.int64)
    ties_seen = tl.zeros((), tl.int64)
    for start in range(0, vocab, BLOCK_V):
        offs, mask, z = _load_z(row, start, vocab, shift, inv_t, BLOCK_V)
        keep, ties_seen = _kept(z, mask, tkey, ties_keep, ties_seen)
        w = tl.exp(z)
        e += tl.sum(tl.where(keep & (w > 0), w * z, 0.0).to(tl.float64), 0)
        y_kept += tl.sum((keep & (z > float("-inf")) & (offs == y)).to(tl.int64), 0)
    return e, y_kept > 0


@triton.jit
def _row_kept(logits_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, r, vocab, L,
              stride_0, stride_1, HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr,
              HAS_MIN_P: tl.constexpr, JOINT: tl.constexpr, BLOCK_V: tl.constexpr):
    """Row r of the (B, L, V) logits, its temperature and the sampler's kept set of it:
    ``(row, temp, shift, inv_t, s_tot, lse, tkey, ties_keep, s_kept)`` (see ``_row_sums``,
    ``_kept_set``)."""
    row = logits_ptr + (r // L) * stride_0 + (r % L) * stride_1
    temp = tl.load(temperature_ptr + r)
    shift, inv_t, s_tot, lse, _ent = _row_sums(row, vocab, temp, BLOCK_V)
    tkey, ties_keep, s_kept = _kept_set(row, vocab, shift, inv_t, s_tot, r, top_k_ptr, top_p_ptr,
                                        min_p_ptr, HAS_TOP_K, HAS_TOP_P, HAS_MIN_P, JOINT,
                                        BLOCK_V)
    return row, temp, shift, inv_t, s_tot, lse, tkey, ties_keep, s_kept


@triton.jit
def _truncated_fwd_kernel(
    logits_ptr,  # (B, L, V) bf16/fp16/fp32/fp64, unit vocab stride
    labels_ptr,  # (N,) int64, N = B·L
    temperature_ptr,  # (N,) fp64
    top_k_ptr,  # (N,) int64; unused unless HAS_TOP_K
    top_p_ptr,  # (N,) fp64; unused unless HAS_TOP_P
    min_p_ptr,  # (N,) fp64; unused unless HAS_MIN_P
    logprobs_ptr,  # (N,) fp32 out
    entropy_ptr,  # (N,) fp32 out; untouched unless HAS_ENTROPY
    lse_ptr,  # (N,) fp32 out
    vocab, L, stride_0, stride_1, ignore_index,
    HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr, HAS_MIN_P: tl.constexpr,
    HAS_ENTROPY: tl.constexpr, JOINT: tl.constexpr, BLOCK_V: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    y = tl.load(labels_ptr + r)
    if y == ignore_index:
        tl.store(logprobs_ptr + r, 0.0)
        tl.store(lse_ptr + r, 0.0)
        if HAS_ENTROPY:
            tl.store(entropy_ptr + r, 0.0)
    else:
        row, _temp, shift, inv_t, s_tot, lse, tkey, ties_keep, s_kept = _row_kept(
            logits_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, r, vocab, L, stride_0,
            stride_1, HAS_TOP_K, HAS_TOP_P, HAS_MIN_P, JOINT, BLOCK_V)
        # lse: NaN for NaN / +inf rows (S NaN), −inf for all −inf rows (S = 0, shift 0).
        tl.store(lse_ptr + r, lse)
        e, y_kept = _kept_pass(row, vocab, shift, inv_t, tkey, ties_keep, y, BLOCK_V)
        in_range = (y >= 0) & (y < vocab)
        x_y = tl.load(row + y, mask=in_range, other=float("nan"))
        lp = tl.where(y_kept, _kept_logprob(x_y, shift, inv_t, s_kept), float("-inf"))
        # NaN for a row that cannot be sampled or an out-of-range label (checks off).
        lp = tl.where((s_tot > 0) & in_range, lp, float("nan"))
        tl.store(logprobs_ptr + r, lp)
        if HAS_ENTROPY:
            tl.store(entropy_ptr + r, (tl.log(s_kept) - e / s_kept).to(tl.float32))


@triton.jit
def _truncated_bwd_kernel(
    logits_ptr,  # (B, L, V), unit vocab stride
    labels_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr,  # as the forward
    grad_lp_ptr,  # (N,) fp32; unused unless HAS_G_LP
    grad_ent_ptr,  # (N,) fp32; unused unless HAS_G_ENT
    grad_lse_ptr,  # (N,) fp32; unused unless HAS_G_LSE
    grad_ptr,  # (N, V) contiguous out, the logits' dtype
    vocab, L, stride_0, stride_1, ignore_index,
    HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr, HAS_MIN_P: tl.constexpr,
    HAS_G_LP: tl.constexpr, HAS_G_ENT: tl.constexpr, HAS_G_LSE: tl.constexpr,
    JOINT: tl.constexpr, BLOCK_V: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    y = tl.load(labels_ptr + r)
    out = grad_ptr + r * vocab
    if y == ignore_index:
        for start in range(0, vocab, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            tl.store(out + offs, tl.zeros((BLOCK_V,), tl.float32).to(out.dtype.element_ty),
                     mask=offs < vocab)
    else:
        row, temp, shift, inv_t, s_tot, _lse, tkey, ties_keep, s_kept = _row_kept(
            logits_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, r, vocab, L, stride_0,
            stride_1, HAS_TOP_K, HAS_TOP_P, HAS_MIN_P, JOINT, BLOCK_V)
        e, y_kept = _kept_pass(row, vocab, shift, inv_t, tkey, ties_keep, y, BLOCK_V)
        g_lp = tl.zeros((), tl.float64)
        if HAS_G_LP:
            g_lp = tl.where(y_kept, tl.load(grad_lp_ptr + r).to(tl.float64), 0.0)
        g_ent = tl.zeros((), tl.float64)
        if HAS_G_ENT:
            g_ent = tl.load(grad_ent_ptr + r).to(tl.float64)
        g_lse = tl.zeros((), tl.float64)
        if HAS_G_LSE:
            g_lse = tl.load(grad_lse_ptr + r).to(tl.float64)
        ez = e / s_kept
        log_s = tl.log(s_tot)
        # A row that cannot be sampled (S NaN or 0) gets a NaN gradient row.
        bad = tl.where(s_tot > 0, 0.0, float("nan"))
        inv_t64 = 1.0 / temp
        ties_seen = tl.zeros((), tl.int64)
        for start in range(0, vocab, BLOCK_V):
            offs, mask, z = _load_z(row, start, vocab, shift, inv_t, BLOCK_V)
            keep, ties_seen = _kept(z, mask, tkey, ties_keep, ties_seen)
            z64 = z.to(tl.float64)
            w = tl.exp(z)
            keep = keep & (w > 0)
            q = w.to(tl.float64) / s_kept
            d = g_lse * tl.exp(z64 - log_s)
            d += tl.where(keep, q * (g_ent * (ez - tl.where(keep, z64, 0.0)) - g_lp), 0.0)
            d += tl.where(offs == y, g_lp, 0.0)
            g = (d * inv_t64 + bad).to(tl.float32)
            tl.store(out + offs, g.to(out.dtype.element_ty), mask=mask)


def _opt(t, placeholder):
    return t if t is not None else placeholder


def _filter_args(logits, labels, temperature, top_k, top_p, min_p, joint):
    """The kernels' leading arguments (logits, labels, per-row temperature and filters, a
    placeholder pointer for a filter that is off) and their filter constexprs."""
    args = (logits, labels, temperature, _opt(top_k, labels), _opt(top_p, temperature),
            _opt(min_p, temperature))
    flags = dict(HAS_TOP_K=top_k is not None, HAS_TOP_P=top_p is not None,
                 HAS_MIN_P=min_p is not None, JOINT=bool(joint),
                 BLOCK_V=_block_v(logits.shape[2]))
    return args, flags


def _layout(logits):
    """``V, L, stride_0, stride_1`` of the ``(B, L, V)`` logits."""
    _, L, V = logits.shape
    return V, L, logits.stride(0), logits.stride(1)


def truncated_logprobs_fwd(logits, labels, temperature, top_k, top_p, min_p, joint,
                           ignore_index, logprobs, entropy, lse) -> None:
    """One program per row of ``logits (B, L, V)``; fills ``logprobs``, ``entropy`` (optional)
    and ``lse`` (fp32, ``B·L`` entries)."""
    n = labels.numel()
    if n == 0:
        return
    filters, flags = _filter_args(logits, labels, temperature, top_k, top_p, min_p, joint)
    _truncated_fwd_kernel[(n,)](
        *filters, logprobs, _opt(entropy, logprobs), lse, *_layout(logits), ignore_index,
        HAS_ENTROPY=entropy is not None, **flags)


def truncated_logprobs_bwd(logits, labels, temperature, top_k, top_p, min_p, joint,
                           ignore_index, grad_logprobs, grad_entropy, grad_lse,
                           grad_logits) -> None:
    """One program per row; writes the contiguous ``grad_logits (B, L, V)``."""
    n = labels.numel()
    if n == 0:
        return
    filters, flags = _filter_args(logits, labels, temperature, top_k, top_p, min_p, joint)
    _truncated_bwd_kernel[(n,)](
        *filters, _opt(grad_logprobs, temperature), _opt(grad_entropy, temperature),
        _opt(grad_lse, temperature), grad_logits, *_layout(logits), ignore_index,
        HAS_G_LP=grad_logprobs is not None, HAS_G_ENT=grad_entropy is not None,
        HAS_G_LSE=grad_lse is not None, **flags)


def _aot_specs() -> list[dict[str, Any]]:
    """Ahead-of-time configurations: bf16 logits, V = 151936, top-k + top-p, forward (with
    entropy) and backward (log-prob gradient only). Kept to two: each compile takes ~20 s on
    the 2-core build machine."""
    vocab, dtype = 151936, "bf16"
    types = {"logits_ptr": f"*{dtype}", "labels_ptr": "*i64", "temperature_ptr": "*fp64",
             "top_k_ptr": "*i64", "top_p_ptr": "*fp64", "min_p_ptr": "*fp64",
             "logprobs_ptr": "*fp32", "entropy_ptr": "*fp32", "lse_ptr": "*fp32",
             "grad_lp_ptr": "*fp32", "grad_ent_ptr": "*fp32", "grad_lse_ptr": "*fp32",
             "grad_ptr": f"*{dtype}", "vocab": "i32", "L": "i64", "stride_0": "i64",
             "stride_1": "i64", "ignore_index": "i64"}
    common = {"HAS_TOP_K": True, "HAS_TOP_P": True, "HAS_MIN_P": False, "JOINT": False,
              "BLOCK_V": _block_v(vocab)}
    specs = []
    for label, fn, extra in (
            ("fwd", _truncated_fwd_kernel, {"HAS_ENTROPY": True}),
            ("bwd", _truncated_bwd_kernel, {"HAS_G_LP": True, "HAS_G_ENT": False,
                                            "HAS_G_LSE": False})):
        signature = aot_signature(fn, types)
        specs.append(aot_spec(f"truncated_logprobs {label} {dtype} V={vocab} top_k+top_p", fn,
                              signature, {**common, **extra}, 8,
                              [k for k in signature if k.endswith("_ptr")]))
    return specs


AOT_SPECS: list[dict[str, Any]] = _aot_specs()
