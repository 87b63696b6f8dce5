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
so do these functions, from rlkern's fp32-accumulated values. Where the result is 16-bit on the
CPU, TRL computes in that dtype, every op rounding (``log_softmax`` rounds ``Σ exp`` and its log
before its last subtraction; the entropy ``-(exp(lp) * lp).sum(-1)`` rounds each term and the
sum); at ``T = 1`` these functions return the same bits, log-probabilities and entropy
(:mod:`rlkern.ops.eager16`, through :mod:`rlkern.integrations._fold`). Gradients are rlkern's
exact ones. TRL's GPU kernel computes both in float32, as these do (docs/integrations/trl.md).

**Temperature** divides the logits in float32 inside the kernel, as TRL's GPU kernel does
(TRL's CPU path first rounds ``logits / T`` to the logits' dtype; at ``T ≠ 1`` 16-bit results
are therefore rlkern's, rounded once, not TRL's bits).

TRL is not imported by this module; :func:`patch_trainer_utils` imports it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlkern.integrations._fold import (
    eager16_applies,
    eager16_logprobs,
    eager16_stats,
    fold,
    row_fold,
)
from rlkern.integrations._swap import FunctionSwap
from rlkern.ops.eager16 import eager_entropy_16bit

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
        if not eager16_applies(logits, dtype, temperature):
            return out.logprobs.to(dtype)
        return eager16_logprobs(out.logprobs, eager16_stats(logits, out.lse), logits, index,
                                mask)
    first = index[..., 0] if index.shape[-1] > 0 else index.new_zeros(lead)
    # a row is computed unless every one of its K entries is masked
    labels = _skipped(first, None if mask is None else (mask != 0).any(-1))
    lse = fold(logits, labels, temperature=temperature, ignore_index=_SKIP).lse
    picked = torch.gather(logits, -1, index.to(torch.int64)).to(lse.dtype) / temperature
    out = picked - lse.unsqueeze(-1)
    if mask is not None:
        out = out.masked_fill(mask == 0, 0.0)
    if not eager16_applies(logits, dtype, temperature):
        return out.to(dtype)
    return eager16_logprobs(out, eager16_stats(logits, lse), logits, index, mask)


def entropy_from_logits(logits: Tensor, chunk_size: int = 128) -> Tensor:
    r"""Entropy of ``softmax(logits)`` per row: TRL's ``entropy_from_logits``.

    Formula: ``H = log Σ_v exp(x_v) − Σ_v p_v x_v``, ``p = softmax(x)``.

    Args:
        logits: ``(..., V)`` bfloat16 / float16 / float32 / float64.
        chunk_size: rows a chunk, ``>= 1``. Only 16-bit results on the CPU use it: their value
            is TRL's, whose sum torch splits by the chunk's shape (:func:`_trl_entropy`);
            each chunk holds one ``(chunk_size, V)`` tensor of terms, where TRL's holds four.

    Returns:
        ``logits.shape[:-1]``; float32 or the logits' dtype, as TRL returns. Differentiable.

    Raises:
        ValueError: rows of no logits (V = 0; TRL returns 0 for them), ``chunk_size < 1``.
    """
    if logits.shape[-1] == 0 and math.prod(logits.shape[:-1]) > 0:
        raise ValueError("logits has an empty vocab dim (V = 0): no distribution to take the "
                         "entropy of")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    out = row_fold(logits)
    dtype = _trl_dtype(logits, None, None)
    if not eager16_applies(logits, dtype, 1.0):
        return out.entropy.to(dtype)
    return _trl_entropy(out.entropy, eager16_stats(logits, out.lse), logits, None, dtype,
                        chunk_size)


def _trl_entropy(entropy: Tensor, stats: tuple[Tensor, Tensor], logits: Tensor,
                 mask: Tensor | None, dtype: torch.dtype, chunk_size: int) -> Tensor:
    """``entropy`` (float32, differentiable) as TRL returns it in 16-bit ``dtype``:
    ``-(exp(lp) * lp).sum(-1)`` with every op rounding, summed in chunks of ``chunk_size`` rows
    (:func:`eager_entropy_16bit`, ``stats`` from :func:`eager16_stats`), through rlkern's
    autograd node. Rows ``mask`` zeroes give 0, as TRL's ``masked_fill``."""
    with torch.no_grad():
        value = eager_entropy_16bit(logits.detach(), *stats, chunk_size).float()
        if mask is not None:
            value = value.masked_fill(mask == 0, 0.0)
        # a NaN row stays NaN; elsewhere TRL's value (a 16-bit one, which entropy + delta
        # reproduces exactly: the two are within a factor of two, so the difference is exact)
        current = entropy.detach()
        delta = torch.where(torch.isnan(current), 0.0, value - current)
    return (entropy + delta).to(dtype)


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
    if not eager16_applies(logits, dtype, temperature):
        return out.logprobs.to(dtype), entropy.to(dtype)
    stats = eager16_stats(logits, out.lse)
    # TRL takes the entropy of every row (masked ones too) in its default chunks of 128 rows
    return (eager16_logprobs(out.logprobs, stats, logits, index, mask),
            _trl_entropy(entropy, stats, logits, mask, dtype, 128))


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
