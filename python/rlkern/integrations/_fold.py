"""The one call every trainer drop-in makes: :func:`rlkern.token_logprobs` on ``(..., V)``.

Trainers' helpers take logits of any rank (TRL and OpenRLHF accept a single ``(V,)`` row);
``token_logprobs`` takes two or more dims. :func:`fold` bridges that, and :func:`row_entropy`
is the entropy of each row, for the helpers that take no labels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlkern.ops.logprobs import TokenLogprobs, token_logprobs

__all__ = ["fold", "row_entropy"]


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


def row_entropy(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(x)`` for each row ``x`` of ``logits (..., V)``: float32 (float64 for
    float64 logits), differentiable. The fold needs a label per row; any id in range does."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    return fold(logits, labels, entropy=True).entropy
