"""Readable pure-torch references: the ground truth the kernels are tested against.

Each function here states the math of ``ALGORITHMS.md`` line by line, in the input's own
floating dtype promoted to at least float32 (float64 inputs stay float64 so that gradcheck and
tight float64 comparisons are possible).
"""

from rlkern.reference.linear_logprobs import linear_logprobs_reference
from rlkern.reference.logprobs import token_logprobs_reference

__all__ = ["linear_logprobs_reference", "token_logprobs_reference"]
