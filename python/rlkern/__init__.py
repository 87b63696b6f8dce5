"""rlkern: fused kernels for the hot path of group-based RL training of language models."""

from rlkern.backends import BackendUnavailableError
from rlkern.ops.linear_logprobs import (
    LinearLogprobsWithGrad,
    linear_logprobs,
    linear_logprobs_with_grad,
)
from rlkern.ops.logprobs import TokenLogprobs, set_checks, token_logprobs

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "LinearLogprobsWithGrad",
    "TokenLogprobs",
    "linear_logprobs",
    "linear_logprobs_with_grad",
    "set_checks",
    "token_logprobs",
]
