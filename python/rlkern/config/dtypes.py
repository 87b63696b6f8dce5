"""The dtype tables of every op, defined once."""

from __future__ import annotations

import torch

__all__ = ["FLOAT_DTYPES", "INDEX_DTYPES", "acc_dtype", "bool_mask"]

#: Floating-point inputs every op accepts (logits, log-probabilities, scores, rewards).
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
#: Integer inputs (labels, group ids).
INDEX_DTYPES = (torch.int32, torch.int64)


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The accumulation (and output) dtype for inputs of ``dtypes``: float64 when any input is
    float64 (the reference and the gradchecks run there), float32 otherwise (bf16 / fp16 / fp32
    inputs accumulate in fp32, DESIGN.md "Numerics conventions")."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def bool_mask(mask: torch.Tensor) -> torch.Tensor:
    """A mask of any dtype as the bool tensor the kernels read (nonzero → True; NaN → True),
    contiguous. Trainers pass float (verl's ``response_mask``) or integer (TRL's
    ``completion_mask``) masks: ``mask.bool()`` is the same test as ``mask != 0`` but a plain
    cast, which torch's CPU kernels run several times faster than the comparison."""
    return (mask if mask.dtype == torch.bool else mask.bool()).contiguous()
