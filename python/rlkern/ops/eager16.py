"""torch's eager CPU ops on 16-bit logits, reproduced bit for bit without their tensors.

Trainers that score tokens in the logits' own 16-bit dtype get values that every op has
rounded to it. TRL's CPU path, for example, computes::

    lp = log_softmax(x)                 # bf16 / fp16: torch rounds Σ exp, its log and lp
    logprobs = lp.gather(-1, ids)
    entropy = -(exp(lp) * lp).sum(-1)   # every op rounds again

A drop-in that returns the same bits needs what torch's ``log_softmax`` keeps between its
passes, per row: the max ``shift`` and ``log_s = round(log(round(Σ exp(x − shift))))``, so that
``lp = round((x − shift) − log_s)``. :func:`log_softmax_stats_16bit` gives them: from
:func:`rlkern.token_logprobs`' float32 log-sum-exp where that decides the two roundings, and
from the C++ kernel that repeats torch's summation order (csrc/cpu/eager16.h) for the rows
where it does not (S or its log within the log-sum-exp's error of a 16-bit rounding midpoint:
about 1 % of fp16 rows, fewer in bf16). :func:`eager_entropy_16bit` forms the entropy's rounded
terms for a chunk of rows in one C++ pass and hands the chunk to torch's own ``sum``, whose
reduction order is then the trainer's.

CPU only: these are the roundings of torch's CPU kernels. The kernels use Sleef's exp and log
from libtorch_cpu, as torch's vector kernels do, so the bits are torch's where the build's
vector width is the one torch dispatches to.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from rlkern import backends
from rlkern.ops import eager
from rlkern.ops.logprobs import rows3d

__all__ = ["eager_entropy_16bit", "log_softmax_stats_16bit", "row_max_16bit"]

_16BIT = (torch.bfloat16, torch.float16)
# The error of S = exp(lse − shift) recovered from the fold's float32 log-sum-exp, relative:
# the two sums' roundings (the fold's within 5.5e-7 of float64's, torch's within 4e-7, on
# randn rows up to V = 151,936) and two units in the last place of lse (whose rounding alone
# reached 3.8e-6 at |lse| ≈ 70). Rows within it of a 16-bit rounding midpoint (1-1.5 % of fp16
# rows on randn logits, 0-0.15 % of bf16 ones) take the exact kernel.
_S_REL_ERR, _LSE_ULPS = 2e-6, 2 * 2.0**-23
_LOG_ULPS = 2 * 2.0**-23  # torch's log and Sleef's differ by at most an ulp


@eager.custom_op("rlkern::eager16_log_softmax_stats", mutates_args=())
def _stats_op(logits: Tensor) -> tuple[Tensor, Tensor]:
    """``(shift, log_s)``, float32 ``(rows,)``, of the rows of ``(N, V)`` / ``(B, L, V)``."""
    rows = math.prod(logits.shape[:-1])
    shift = torch.empty(rows, dtype=torch.float32, device=logits.device)
    log_s = torch.empty(rows, dtype=torch.float32, device=logits.device)
    backends.cpp_ops().eager16_log_softmax_stats_out(logits, shift, log_s)
    return shift, log_s


@_stats_op.register_fake
def _(logits):
    rows = math.prod(logits.shape[:-1])
    return (logits.new_empty(rows, dtype=torch.float32),
            logits.new_empty(rows, dtype=torch.float32))


@eager.custom_op("rlkern::eager16_entropy_terms", mutates_args=())
def _terms_op(logits: Tensor, shift: Tensor, log_s: Tensor, first: int, count: int) -> Tensor:
    """The ``(count, V)`` terms of rows ``first … first + count − 1`` of ``(N, V)`` /
    ``(B, L, V)`` logits (rows counted over the leading dims), from all rows' stats."""
    terms = logits.new_empty((count, logits.shape[-1]))
    backends.cpp_ops().eager16_entropy_terms_out(logits, shift, log_s, first, terms)
    return terms


@_terms_op.register_fake
def _(logits, shift, log_s, first, count):
    return logits.new_empty((count, logits.shape[-1]))


def _check_rows(logits: Tensor) -> Tensor:
    """``logits (..., V)`` as the kernels read it, in place where it can be: a ``(B, L, V)``
    view (any strides of the leading dims, as the fold's) of 16-bit CPU logits whose vocab dim
    is contiguous (else a contiguous copy)."""
    if logits.dtype not in _16BIT:
        raise TypeError(f"logits must be bfloat16 or float16, got {logits.dtype}")
    if logits.dim() == 0 or logits.device.type != "cpu":
        raise ValueError(f"logits must be a (..., V) CPU tensor, got shape "
                         f"{tuple(logits.shape)} on {logits.device}")
    if logits.shape[-1] == 0 and math.prod(logits.shape[:-1]) > 0:
        raise ValueError("logits has an empty vocab dim (V = 0)")
    rows = rows3d(logits.reshape(1, -1) if logits.dim() == 1 else logits)
    return rows if rows.shape[-1] <= 1 or rows.stride(-1) == 1 else rows.contiguous()


def _check_stats(shape: torch.Size, **stats: Tensor) -> None:
    for name, t in stats.items():
        if t.dtype != torch.float32 or t.shape != shape:
            raise ValueError(f"{name} must be float32 of shape {tuple(shape)}, got {t.dtype} "
                             f"{tuple(t.shape)}")


def row_max_16bit(x: Tensor) -> Tensor:
    """``x.amax(-1)`` of 16-bit floats ``(..., V)``, as float32, by integer compares of the bit
    patterns (torch reduces int16 faster than bf16 / fp16 on the CPU). bf16 and fp16 are
    sign-magnitude: as int16, non-negative floats keep their order, so a row with one holds
    its maximum at the largest int16; in a row of negative floats only, the largest float has
    the smallest magnitude, the smallest int16."""
    bits = x.view(torch.int16)
    top = bits.amax(-1)
    negative = top < 0
    # rows with no float ≥ +0 are rare in logits: the second pass only when one exists (a
    # data-dependent branch, which a compiled graph cannot take: there, always)
    if torch.compiler.is_compiling() or bool(negative.any()):
        top = torch.where(negative, bits.amin(-1), top)
    return top.view(x.dtype).float()


def _straddles(value: Tensor, err: Tensor, dtype: torch.dtype) -> Tensor:
    """Whether ``value ± err`` round to different ``dtype`` values (NaN counts as straddling)."""
    return (value - err).to(dtype) != (value + err).to(dtype)


def log_softmax_stats_16bit(logits: Tensor, lse: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(shift, log_s)`` of torch's CPU ``log_softmax`` on each row of 16-bit ``logits``.

    ``shift`` is the row max and ``log_s = round(log(round(Σ_v exp(x_v − shift))))`` (rounded
    to the logits' dtype, held in float32), so ``log_softmax(x)_v = round((x_v − shift) −
    log_s)`` bit for bit.

    Args:
        logits: ``(..., V)`` bfloat16 / float16 on the CPU. Leading dims that merge into two
            (``(N, V)``, any ``(B, L, V)`` such as TRL's ``logits[:, :-1, :]``) are read in
            place; a vocab dim that is not contiguous is copied.
        lse: optional float32 of shape ``logits.shape[:-1]``, ``log Σ exp(x)`` of each row as
            :func:`rlkern.token_logprobs` returns it (at ``T = 1``). With it only the rows it
            cannot decide take the exact kernel; without it (and inside ``torch.compile``, which
            cannot branch on the data) every row does (one more pass over the logits).

    Returns:
        ``(shift, log_s)``, float32 of shape ``logits.shape[:-1]`` each.

    Raises:
        TypeError: logits not bfloat16 / float16.
        ValueError: logits 0-dim or not on the CPU, ``V = 0``, leading dims that cannot be
            merged without a copy, or ``lse`` not float32 of ``logits.shape[:-1]``.
    """
    lead = logits.shape[:-1]
    rows = _check_rows(logits)
    if lse is None or torch.compiler.is_compiling():
        shift, log_s = eager.call("rlkern::eager16_log_softmax_stats", rows)
        return shift.view(lead), log_s.view(lead)
    _check_stats(lead, lse=lse)
    dtype = logits.dtype
    lse = lse.reshape(rows.shape[:-1])
    shift = row_max_16bit(rows)
    s = torch.exp(lse - shift)
    log = torch.log(s.to(dtype).float())
    near = (_straddles(s, s * (_S_REL_ERR + lse.abs() * _LSE_ULPS), dtype)
            | _straddles(log, log.abs() * _LOG_ULPS, dtype))
    log_s = log.to(dtype).float()
    at = near.nonzero(as_tuple=True)  # (b, l) of each such row
    if at[0].numel():  # only those rows are gathered (a (k, V) copy) for the exact kernel
        log_s[at] = eager.call("rlkern::eager16_log_softmax_stats", rows[at])[1]
    return shift.view(lead), log_s.view(lead)


def _pieces(rows: int, vocab: int, chunk_size: int) -> list[tuple[int, int]]:
    """Row ranges whose ``sum(-1)`` gives each row the bits of the trainer's chunks of
    ``chunk_size`` rows, each range's terms ~4 MiB (summed from the cache, in few calls).

    torch reduces each row of a tensor of two or more rows whole and in the same order,
    whatever the row count; a tensor of one row of ≥ 32,768 values it may split between
    threads, in another order. So a trainer's chunk of one row stays one row, and a chunk of
    more is cut into ranges of two rows or more (tested against whole chunks in
    tests/test_eager16.py).
    """
    step = max(2, (1 << 21) // max(vocab, 1))
    out = []
    for start in range(0, rows, chunk_size):
        stop = min(start + chunk_size, rows)
        cuts = [*range(start, stop, step), stop]
        if len(cuts) > 2 and cuts[-1] - cuts[-2] == 1:
            del cuts[-2]  # no range of one row inside a longer chunk
        out += itertools.pairwise(cuts)
    return out


def eager_entropy_16bit(logits: Tensor, shift: Tensor, log_s: Tensor,
                        chunk_size: int = 128) -> Tensor:
    """``-(exp(lp) * lp).sum(-1)`` as torch's eager 16-bit ops give it, chunk by chunk of rows,
    with ``lp = round((x − shift) − log_s)``.

    Args:
        logits: ``(..., V)`` bfloat16 / float16 on the CPU, read in place as by
            :func:`log_softmax_stats_16bit`. Rows are counted over the leading dims in order.
        shift, log_s: float32 of shape ``logits.shape[:-1]``, from
            :func:`log_softmax_stats_16bit`.
        chunk_size: the trainer's chunks of rows (torch splits a one-row sum differently,
            :func:`_pieces`). The terms are formed ~4 MiB at a time, whatever the chunk.

    Returns:
        ``logits.shape[:-1]`` in the logits' dtype. Not differentiable (callers attach the
        value to rlkern's exact gradient). A logit at −inf adds 0 (the limit of ``p log p``),
        where torch's ops give NaN.

    Raises:
        TypeError: logits not bfloat16 / float16.
        ValueError: as :func:`log_softmax_stats_16bit`; ``chunk_size < 1``, or ``shift`` /
            ``log_s`` not float32 of ``logits.shape[:-1]``.
    """
    lead = logits.shape[:-1]
    rows = _check_rows(logits)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _check_stats(lead, shift=shift, log_s=log_s)
    shift, log_s = shift.reshape(-1).contiguous(), log_s.reshape(-1).contiguous()
    vocab = rows.shape[-1]
    pieces = _pieces(shift.numel(), vocab, chunk_size)
    with torch.no_grad():
        if eager.plain_eager(rows, shift, log_s, no_graph=True) and pieces:
            buf = rows.new_empty((max(b - a for a, b in pieces), vocab))
            sums = []
            for a, b in pieces:
                terms = buf[:b - a]
                backends.cpp_ops().eager16_entropy_terms_out(rows, shift, log_s, a, terms)
                sums.append(-terms.sum(-1))
        else:
            sums = [-eager.call("rlkern::eager16_entropy_terms", rows, shift, log_s, a,
                                b - a).sum(-1) for a, b in pieces]
    return (torch.cat(sums) if sums else rows.new_empty((0,))).view(lead)
