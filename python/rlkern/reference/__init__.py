"""Readable pure-torch references: the ground truth the kernels are tested against.

Each function here states the math of ``ALGORITHMS.md`` line by line, in the input's own
floating dtype promoted to at least float32 (float64 inputs stay float64 so that gradcheck and
tight float64 comparisons are possible).
"""

from rlkern.reference.advantages import group_advantages_reference, trl_grpo_advantages
from rlkern.reference.linear_logprobs import linear_logprobs_reference
from rlkern.reference.logprobs import token_logprobs_reference
from rlkern.reference.policy_loss import (
    agg_loss_reference,
    kl_penalty_reference,
    policy_loss_reference,
)
from rlkern.reference.sample import sample_reference
from rlkern.reference.token_advantages import (
    discounted_returns_reference,
    empg_modulate_reference,
    gae_reference,
    gigpo_advantages_reference,
    gtpo_weights_reference,
    position_baseline_reference,
)

__all__ = [
    "agg_loss_reference",
    "discounted_returns_reference",
    "empg_modulate_reference",
    "gae_reference",
    "gigpo_advantages_reference",
    "group_advantages_reference",
    "gtpo_weights_reference",
    "kl_penalty_reference",
    "linear_logprobs_reference",
    "policy_loss_reference",
    "position_baseline_reference",
    "sample_reference",
    "token_logprobs_reference",
    "trl_grpo_advantages",
]
