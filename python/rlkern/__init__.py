"""rlkern: fused kernels for the hot path of group-based RL training of language models."""

from rlkern.backends import BackendUnavailableError
from rlkern.config.advantages import AdvantageConfig
from rlkern.config.policy_loss import PolicyLossConfig
from rlkern.ops.advantages import GroupAdvantages, group_advantages
from rlkern.ops.group_stats import GroupStats
from rlkern.ops.linear_grpo_loss import LinearGRPOLoss, linear_grpo_loss
from rlkern.ops.linear_logprobs import (
    LinearLogprobsWithGrad,
    linear_logprobs,
    linear_logprobs_with_grad,
)
from rlkern.ops.logprobs import TokenLogprobs, set_checks, token_logprobs
from rlkern.ops.policy_loss import PolicyLossOutput, kl_penalty, policy_loss
from rlkern.ops.rollout_correction import RolloutCorrectionOutput, rollout_correction
from rlkern.ops.sample import SampleOutput, sample
from rlkern.ops.token_advantages import (
    GAEAdvantages,
    GiGPOAdvantages,
    GTPOWeights,
    discounted_returns,
    empg_modulate,
    gae,
    gigpo_advantages,
    gtpo_weights,
    position_baseline,
)
from rlkern.ops.token_baseline import TokenBaseline, optimal_token_baseline
from rlkern.sampling import GroupRollouts, generate_groups

__version__ = "0.1.0"

__all__ = [
    "AdvantageConfig",
    "BackendUnavailableError",
    "GAEAdvantages",
    "GTPOWeights",
    "GiGPOAdvantages",
    "GroupAdvantages",
    "GroupRollouts",
    "GroupStats",
    "LinearGRPOLoss",
    "LinearLogprobsWithGrad",
    "PolicyLossConfig",
    "PolicyLossOutput",
    "RolloutCorrectionOutput",
    "SampleOutput",
    "TokenBaseline",
    "TokenLogprobs",
    "discounted_returns",
    "empg_modulate",
    "gae",
    "generate_groups",
    "gigpo_advantages",
    "group_advantages",
    "gtpo_weights",
    "kl_penalty",
    "linear_grpo_loss",
    "linear_logprobs",
    "linear_logprobs_with_grad",
    "optimal_token_baseline",
    "policy_loss",
    "position_baseline",
    "rollout_correction",
    "sample",
    "set_checks",
    "token_logprobs",
]
