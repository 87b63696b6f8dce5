"""The dtype tables of every op, defined once."""

from __future__ import annotations

import torch

__all__ = ["FLOAT_DTYPES", "INDEX_DTYPES", "acc_dtype"]

#: Floating-point inputs every op accepts (logits, log-probabilities, scores, rewards).
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
#: Integer inputs (labels, group ids).
INDEX_DTYPES = (torch.int32, torch.int64)


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The accumulation (and output) dtype for inputs of ``dtypes``: float64 when any input is
    float64 (the reference and the gradchecks run there), float32 otherwise (bf16 / fp16 / fp32
    inputs accumulate in fp32, DESIGN.md "Numerics conventions")."""
    return torch.float64 if torch.float64 in dtypes else torch.float32
