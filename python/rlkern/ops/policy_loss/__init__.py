"""The clipped-surrogate family of policy losses, fused: one kernel pass forward, one backward.

Public entry points: :func:`policy_loss`, :func:`kl_penalty`, and for fused callers (the fused
linear GRPO loss) :func:`policy_loss_chunk` / :func:`finish_metrics`. How it is split
(ALGORITHMS.md §3; the per-token math is csrc/include/rlkern/policy_loss.h, the Triton kernels
of rlkern.kernels.policy_loss and the reference rlkern.reference.policy_loss):

* :mod:`~rlkern.ops.policy_loss.inputs` — checks the arguments and turns them into the ops'
  (compute-dtype tensors, the optional inputs by slot, the kernels' flags / hparams);
* :mod:`~rlkern.ops.policy_loss.register` — the registered ops ``rlkern::policy_loss_fwd`` /
  ``policy_loss_bwd`` (per-row statistics forward, ∂/∂logprobs backward), their fake
  implementations, autograd and the dispatch to the backends;
* :mod:`~rlkern.ops.policy_loss.fused` — the CPU's fused path: the forward also writes each
  token's gradient factor, the backward scales it in place (same bits as the two-pass form);
* :mod:`~rlkern.ops.policy_loss.aggregate` — the O(B) aggregation of the per-row sums into the
  loss (token-mean, seq-mean-*, sum; gvpo's group centring) and the metrics;
* :mod:`~rlkern.ops.policy_loss.api` — :func:`policy_loss` and :func:`policy_loss_chunk`;
* :mod:`~rlkern.ops.policy_loss.kl` — the KL estimator op and :func:`kl_penalty`.

The layouts (codes, hyperparameter fields, optional-input slots, row statistics) are the C++
header's, read through :func:`rlkern.config.layout`.
"""

from rlkern.ops.policy_loss.aggregate import finish_metrics, metric_names
from rlkern.ops.policy_loss.api import (
    PolicyLossChunk,
    PolicyLossOutput,
    policy_loss,
    policy_loss_chunk,
    run,
)
from rlkern.ops.policy_loss.inputs import entropy_quantile_threshold, prepare
from rlkern.ops.policy_loss.kl import kl_penalty

__all__ = [
    "PolicyLossChunk",
    "PolicyLossOutput",
    "entropy_quantile_threshold",
    "finish_metrics",
    "kl_penalty",
    "metric_names",
    "policy_loss",
    "policy_loss_chunk",
    "prepare",
    "run",
]
