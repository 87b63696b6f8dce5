"""rlkern: fused kernels for the hot path of group-based RL training of language models."""

from rlkern.backends import BackendUnavailableError
from rlkern.ops.logprobs import TokenLogprobs, set_checks, token_logprobs

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "TokenLogprobs",
    "set_checks",
    "token_logprobs",
]
