"""The one call every trainer drop-in makes: :func:`rlkern.token_logprobs` on ``(..., V)``.

Trainers' helpers take logits of any rank (TRL and OpenRLHF accept a single ``(V,)`` row);
``token_logprobs`` takes two or more dims. :func:`fold` bridges that, and :func:`row_entropy`
is the entropy of each row, for the helpers that take no labels.

Trainers that take 16-bit logits on the CPU through torch's ``log_softmax`` in that dtype (TRL,
OpenRLHF) get its roundings; :func:`eager16_logprobs` gives the fold's log-probabilities those
bits (:mod:`rlkern.ops.eager16`), where :func:`eager16_applies`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlkern.ops.eager16 import log_softmax_stats_16bit
from rlkern.ops.logprobs import TokenLogprobs, token_logprobs

__all__ = ["eager16_applies", "eager16_logprobs", "eager16_stats", "fold", "row_entropy",
           "row_fold"]


def fold(logits: Tensor, labels: Tensor, *, temperature: float = 1.0, entropy: bool = False,
         ignore_index: int = -100) -> TokenLogprobs:
    """:func:`rlkern.token_logprobs` on ``logits (..., V)`` of any rank ≥ 1 and ``labels`` of
    shape ``logits.shape[:-1]`` (1-D logits are one row: 0-dim results)."""
    if logits.dim() == 1:
        out = token_logprobs(logits.unsqueeze(0), labels.reshape(1), temperature=temperature,
                             return_entropy=entropy, ignore_index=ignore_index)
        return TokenLogprobs(*(t.reshape(()) if t is not None else None for t in out))
    return token_logprobs(logits, labels, temperature=temperature, return_entropy=entropy,
                          ignore_index=ignore_index)


def row_fold(logits: Tensor) -> TokenLogprobs:
    """The fold of ``logits (..., V)`` with its entropy, for helpers that take no labels (the
    fold needs a label per row; any id in range does: its log-probability is not used)."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    return fold(logits, labels, entropy=True)


def row_entropy(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(x)`` for each row ``x`` of ``logits (..., V)``: float32 (float64 for
    float64 logits), differentiable."""
    return row_fold(logits).entropy


def eager16_applies(logits: Tensor, dtype: torch.dtype, temperature: float) -> bool:
    """Whether a trainer's result in ``dtype`` comes from torch's 16-bit CPU ops that
    :func:`eager16_logprobs` repeats bit for bit: 16-bit, on the CPU, at ``T = 1`` (a trainer
    that divides 16-bit logits by ``T`` first rounds them, which the fold does not)."""
    return (dtype in (torch.bfloat16, torch.float16) and temperature == 1.0
            and logits.device.type == "cpu" and logits.numel() > 0)


def eager16_stats(logits: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    """``(shift, log_s)`` of torch's 16-bit CPU ``log_softmax`` for each row of ``logits
    (..., V)``, each of shape ``logits.shape[:-1]`` (:func:`log_softmax_stats_16bit`, decided
    by the fold's ``lse`` where it can; a view such as ``logits[:, :-1, :]`` is read in place)."""
    return log_softmax_stats_16bit(logits.detach(), lse.detach())


def eager16_logprobs(logprobs: Tensor, stats: tuple[Tensor, Tensor], logits: Tensor,
                     index: Tensor, mask: Tensor | None = None) -> Tensor:
    """The fold's ``logprobs`` (float32, differentiable) as torch's 16-bit ``log_softmax``
    gives them, in the logits' dtype.

    Its value at ``x_v`` is ``round((x_v − shift) − log_s)`` with ``stats = (shift, log_s)`` of
    each row (:func:`eager16_stats`): the trainer's bits, through rlkern's autograd node (the
    gradient stays the fold's). ``index`` is one id per row (``logits.shape[:-1]``) or K
    (``(..., K)``); where ``mask`` is 0 the result is 0. For :func:`eager16_applies` calls.
    """
    with torch.no_grad():
        x = logits.detach()
        shift, log_s = stats
        ids = index
        if index.shape == logits.shape[:-1]:  # one id per row: (...) → (..., 1)
            ids = index.unsqueeze(-1)
        else:
            shift, log_s = shift.unsqueeze(-1), log_s.unsqueeze(-1)
        safe = ids.to(torch.int64) if mask is None else torch.where(
            (mask != 0).reshape(ids.shape), ids.to(torch.int64), 0)
        picked = torch.gather(x, -1, safe).float().reshape(logprobs.shape)
        value = picked - shift - log_s
        if mask is not None:
            value = value.masked_fill(mask == 0, 0.0)
        # where the fold's value is not finite (a label at −inf: −inf; a NaN row: NaN) it is
        # the trainer's already, and −inf − (−inf) would make it NaN
        current = logprobs.detach()
        delta = torch.where(torch.isfinite(current), value - current, 0.0)
    return (logprobs + delta).to(logits.dtype)
