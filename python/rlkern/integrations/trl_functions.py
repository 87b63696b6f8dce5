"""Drop-ins for TRL's log-probability helpers in ``trl.trainer.utils`` (TRL 1.16).

TRL's trainers and many hand-written loops score tokens with three functions of
``trl.trainer.utils``; this module has each one, same name, signature and result shape, computed
by :func:`rlkern.token_logprobs` (one pass over the logits, float32 accumulation, no ``(N, V)``
temporary in the forward):

* :func:`selective_log_softmax` ``(logits, index, temperature=1.0, row_mask=None)``
* :func:`entropy_from_logits` ``(logits, chunk_size=128)``
* :func:`selective_log_softmax_and_entropy` ``(logits, index, entropy_requires_grad=True,
  temperature=1.0, row_mask=None)``

:func:`patch_trainer_utils` swaps them into ``trl.trainer.utils`` and into every loaded ``trl.*``
module that imported them by name (TRL's experimental trainers: SDPO, SDFT, A2PO, ORPO, CPO,
TPO); :func:`unpatch_trainer_utils` restores TRL's. ``GRPOTrainer`` does not call them (its
head is served by :func:`rlkern.integrations.trl.apply`).

**Result dtype: TRL's.** TRL returns float32 where its fused Triton kernel runs (CUDA / XPU
tensors of 1 to 3 dims, 16-bit or float32, one index per row) and the logits' dtype elsewhere;
so do these functions, from rlkern's fp32-accumulated values. Where the result is 16-bit,
TRL's CPU path calls ``log_softmax`` in that dtype, whose kernel rounds ``Σ exp`` and its log
to it before the last subtraction; the log-probabilities here take the same roundings (from
the fold's sums, plus one read of the logits for the row max), so at ``T = 1`` they are TRL's
bit for bit. The 16-bit entropy is the correctly rounded value (TRL's rounds every term of its
sum, and is further from the exact value); TRL's GPU kernel computes both in float32, as these
do (docs/integrations/trl.md).

**Temperature** divides the logits in float32 inside the kernel, as TRL's GPU kernel does
(TRL's CPU path first rounds ``logits / T`` to the logits' dtype; at ``T ≠ 1`` 16-bit
log-probabilities are therefore rlkern's, rounded once, not TRL's bits).

TRL is not imported by this module; :func:`patch_trainer_utils` imports it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlkern.integrations._fold import fold, row_entropy
from rlkern.integrations._swap import FunctionSwap

__all__ = [
    "entropy_from_logits",
    "patch_trainer_utils",
    "selective_log_softmax",
    "selective_log_softmax_and_entropy",
    "unpatch_trainer_utils",
]

# A label no index equals (TRL's gather refuses negative indices, so -100 must not be taken for
# rlkern's default ignore_index): the rows that ``row_mask`` skips get it.
_SKIP = -(2**63)
_TRL_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _trl_dtype(logits: Tensor, index: Tensor | None, row_mask: Tensor | None) -> torch.dtype:
    """The dtype TRL 1.16 returns for this call: float32 where its fused Triton kernel serves it
    (the conditions of ``trl.trainer.utils._supports_trl_loss_kernel``), else the logits'."""
    kernel = (logits.device.type in ("cuda", "xpu") and logits.dtype in _TRL_KERNEL_DTYPES
              and 1 <= logits.ndim <= 3 and logits.stride(-1) == 1 and logits.shape[-1] > 0)
    if index is not None:
        kernel = (kernel and index.shape == logits.shape[:-1]
                  and index.dtype in (torch.int32, torch.int64) and index.device == logits.device)
    if row_mask is not None:
        kernel = (kernel and index is not None and row_mask.shape == index.shape
                  and row_mask.dtype in (torch.bool, torch.int32, torch.int64)
                  and row_mask.device == logits.device)
    return torch.float32 if kernel else logits.dtype


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError("temperature must be positive")  # TRL's message


def _skipped(index: Tensor, row_mask: Tensor | None) -> Tensor:
    """``index`` with the rows ``row_mask`` zeroes relabelled so that rlkern skips them."""
    if row_mask is None:
        return index
    return torch.where(row_mask == 0, _SKIP, index.to(torch.int64))


def _check_mask(row_mask: Tensor | None, index: Tensor) -> Tensor | None:
    if row_mask is None:
        return None
    try:
        return row_mask.expand(index.shape)
    except RuntimeError:
        raise ValueError(f"row_mask of shape {tuple(row_mask.shape)} does not broadcast to "
                         f"index's shape {tuple(index.shape)}") from None


def selective_log_softmax(logits: Tensor, index: Tensor, temperature: float = 1.0,
                          row_mask: Tensor | None = None) -> Tensor:
    r"""``log_softmax(logits / T)`` gathered at ``index``: TRL's ``selective_log_softmax``.

    Formula (per row ``x`` of length ``V``): ``lp_k = x[index_k] / T − log Σ_v exp(x_v / T)``.

    Args:
        logits: ``(..., V)`` bfloat16 / float16 / float32 / float64; only the last dim must be
            contiguous.
        index: int64 / int32, shape ``(...)`` (one id per row, the usual case) or ``(..., K)``
            (K ids per row, e.g. top-K), each in ``[0, V)``.
        temperature: ``T > 0``.
        row_mask: optional, broadcastable to ``index``'s shape; where it is 0 the result is 0
            (with a zero gradient), and a row whose every entry is masked is not computed.

    Returns:
        ``index``'s shape; float32 or the logits' dtype, as TRL returns (module docstring).
        Differentiable wrt ``logits``. With ``(..., K)`` indices the backward adds a scatter
        of the K gathered entries to the fold's gradient (one more ``(N, V)`` buffer).

    Raises:
        ValueError: ``temperature <= 0``, an index shape that is neither ``(...)`` nor
            ``(..., K)``, a ``row_mask`` that does not broadcast, ids out of range (while
            checks are on, :func:`rlkern.set_checks`).
    """
    _check_temperature(temperature)
    lead = tuple(logits.shape[:-1])
    one_per_row = tuple(index.shape) == lead
    if not one_per_row and (index.dim() != logits.dim() or tuple(index.shape[:-1]) != lead):
        raise ValueError(f"index must have shape {lead} (one id per row) or {(*lead, 'K')}, "
                         f"got {tuple(index.shape)} for logits of shape {tuple(logits.shape)}")
    mask = _check_mask(row_mask, index)
    dtype = _trl_dtype(logits, index, row_mask)
    if one_per_row:
        out = fold(logits, _skipped(index, mask), temperature=temperature, ignore_index=_SKIP)
        return _trl_rounding(out.logprobs, out.lse, logits, index, mask, temperature, dtype)
    first = index[..., 0] if index.shape[-1] > 0 else index.new_zeros(lead)
    # a row is computed unless every one of its K entries is masked
    labels = _skipped(first, None if mask is None else (mask != 0).any(-1))
    lse = fold(logits, labels, temperature=temperature, ignore_index=_SKIP).lse
    picked = torch.gather(logits, -1, index.to(torch.int64)).to(lse.dtype) / temperature
    out = picked - lse.unsqueeze(-1)
    if mask is not None:
        out = out.masked_fill(mask == 0, 0.0)
    return _trl_rounding(out, lse.unsqueeze(-1), logits, index, mask, temperature, dtype)


def _row_max_16bit(x: Tensor) -> Tensor:
    """``x.amax(-1)`` of 16-bit floats, as float32, by integer compares of the bit patterns
    (torch reduces int16 faster than bf16 / fp16 on the CPU). bf16 and fp16 are
    sign-magnitude: as int16, non-negative floats keep
    their order, so a row with one holds its maximum at the largest int16; in a row of
    negative floats only, the largest float has the smallest magnitude, the smallest int16."""
    bits = x.view(torch.int16)
    top = bits.amax(-1)
    negative = top < 0
    # rows with no float ≥ +0 are rare in logits: the second pass only when one exists (a
    # data-dependent branch, which a compiled graph cannot take: there, always)
    if torch.compiler.is_compiling() or bool(negative.any()):
        top = torch.where(negative, bits.amin(-1), top)
    return top.view(x.dtype).float()


def _trl_rounding(logprobs: Tensor, lse: Tensor, logits: Tensor, index: Tensor,
                  mask: Tensor | None, temperature: float, dtype: torch.dtype) -> Tensor:
    """``logprobs`` (float32, differentiable) as TRL returns them in ``dtype``.

    Where that is a 16-bit dtype TRL's CPU path calls ``log_softmax`` in it, and torch's CPU
    kernel rounds twice before its last subtraction: ``round(round(log round(S)))`` with
    ``S = Σ exp(x − m)`` and ``m`` the row max. The same roundings are applied here to ``S``
    (recovered from rlkern's ``lse`` as ``exp(lse − m)``: its float32 error is far below a
    16-bit rounding step), so the values are TRL's bit for bit, while the gradient stays the
    fold's. At ``T ≠ 1`` TRL first rounds ``logits / T`` to the 16-bit dtype, which only a
    rounded copy of the logits could reproduce: there the values are rlkern's, rounded once.
    """
    if dtype not in (torch.bfloat16, torch.float16) or temperature != 1.0:
        return logprobs.to(dtype)
    with torch.no_grad():
        x = logits.detach()
        shift = _row_max_16bit(x).unsqueeze(-1)
        ids = index
        if index.shape == logits.shape[:-1]:  # one id per row: (...) → (..., 1)
            shift, ids = shift.squeeze(-1), index.unsqueeze(-1)
        safe = ids.to(torch.int64) if mask is None else torch.where(
            (mask != 0).reshape(ids.shape), ids.to(torch.int64), 0)
        picked = torch.gather(x, -1, safe).float().reshape(logprobs.shape)
        log_s = torch.log(torch.exp(lse - shift).to(dtype).float()).to(dtype).float()
        value = picked - shift - log_s
        if mask is not None:
            value = value.masked_fill(mask == 0, 0.0)
        # TRL's values, through rlkern's autograd node; where the fold's value is not finite
        # (a label at −inf: −inf; a NaN row: NaN) it is TRL's already, and −inf − (−inf) would
        # make it NaN
        current = logprobs.detach()
        delta = torch.where(torch.isfinite(current), value - current, 0.0)
    return (logprobs + delta).to(dtype)


def entropy_from_logits(logits: Tensor, chunk_size: int = 128) -> Tensor:
    r"""Entropy of ``softmax(logits)`` per row: TRL's ``entropy_from_logits``.

    Formula: ``H = log Σ_v exp(x_v) − Σ_v p_v x_v``, ``p = softmax(x)``.

    Args:
        logits: ``(..., V)`` bfloat16 / float16 / float32 / float64.
        chunk_size: accepted for TRL's signature and ignored: rlkern never materialises the
            ``(N, V)`` probabilities that TRL's chunking bounds.

    Returns:
        ``logits.shape[:-1]``; float32 or the logits' dtype, as TRL returns. Differentiable.

    Raises:
        ValueError: rows of no logits (V = 0; TRL returns 0 for them).
    """
    if logits.shape[-1] == 0 and math.prod(logits.shape[:-1]) > 0:
        raise ValueError("logits has an empty vocab dim (V = 0): no distribution to take the "
                         "entropy of")
    return row_entropy(logits).to(_trl_dtype(logits, None, None))


def selective_log_softmax_and_entropy(
    logits: Tensor,
    index: Tensor,
    entropy_requires_grad: bool = True,
    temperature: float = 1.0,
    row_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Log-probabilities at ``index`` and the entropy of ``softmax(logits / T)`` in one pass:
    TRL's ``selective_log_softmax_and_entropy``.

    Args:
        logits: ``(..., V)`` bfloat16 / float16 / float32 / float64.
        index: int64 / int32 of shape ``(...)``: one id per row.
        entropy_requires_grad: if False, the entropy is returned detached.
        temperature: ``T > 0``.
        row_mask: optional, broadcastable to ``index``'s shape; rows where it is 0 give 0 for
            both outputs (and a zero gradient) and are not computed.

    Returns:
        ``(logprobs, entropy)``, each of ``index``'s shape; float32 or the logits' dtype, as
        TRL returns.
    """
    _check_temperature(temperature)
    if tuple(index.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"index must have shape {tuple(logits.shape[:-1])} (one id per row), "
                         f"got {tuple(index.shape)}")
    mask = _check_mask(row_mask, index)
    out = fold(logits, _skipped(index, mask), temperature=temperature, entropy=True,
               ignore_index=_SKIP)
    dtype = _trl_dtype(logits, index, row_mask)
    entropy = out.entropy if entropy_requires_grad else out.entropy.detach()
    logprobs = _trl_rounding(out.logprobs, out.lse, logits, index, mask, temperature, dtype)
    return logprobs, entropy.to(dtype)


_TRAINER_UTILS = FunctionSwap("trl.trainer.utils", {
    "selective_log_softmax": selective_log_softmax,
    "entropy_from_logits": entropy_from_logits,
    "selective_log_softmax_and_entropy": selective_log_softmax_and_entropy,
})


def patch_trainer_utils() -> list[str]:
    """Swap the three drop-ins into ``trl.trainer.utils`` and every loaded ``trl.*`` module that
    imported TRL's function by name. Idempotent; returns the ``module.attribute`` names
    replaced. Modules imported later read the patched ``trl.trainer.utils``."""
    return _TRAINER_UTILS.apply()


def unpatch_trainer_utils() -> None:
    """Restore TRL's functions wherever :func:`patch_trainer_utils` replaced them."""
    _TRAINER_UTILS.undo()
