"""The layouts of the logprobs family (:func:`rlkern.token_logprobs`,
:func:`rlkern.linear_logprobs`), as ``csrc/include/rlkern/logprobs.h`` defines them (read through
:mod:`rlkern.config.layout`).

* :func:`outputs`: the per-row outputs ``logprobs, lse, entropy, self_certainty, sum_p_sq``. The
  value of each is its index in the ``outputs`` / ``grad_outputs`` lists of the compiled ops
  (``logprobs_fwd_out``, ``logprobs_bwd_out``, ``linear_logprobs_finish_out``,
  ``linear_logprobs_tile_bwd_``), in the results of ``torch.ops.rlkern.logprobs_fwd`` and in the
  output arguments of the Triton launcher ``kernels/logprobs.py:logprobs_fwd``.
* :func:`linear_stats`: the columns ``m, s, t, x_y`` of the fused linear op's per-row running
  state (``linear_logprobs_tile_fwd_``'s float64 ``stats``).
"""

from __future__ import annotations

import enum

import torch

from rlkern.config.layout import layout

__all__ = ["STATS_OUTPUTS", "linear_stats", "output_names", "outputs"]

#: The outputs that ``return_stats`` asks for: computed together (both or neither), and not
#: differentiable (statistics for rewards and baselines, not training targets).
STATS_OUTPUTS = ("self_certainty", "sum_p_sq")


def outputs() -> type[enum.IntEnum]:
    """The per-row outputs of token logprobs, valued by their index in the ops' output lists."""
    return layout("logprobs").outputs


@torch.compiler.assume_constant_result
def output_names() -> tuple[str, ...]:
    """The names of :func:`outputs` in order, as a constant torch.compile can trace (code traced
    by Dynamo, such as the public wrappers, uses this rather than the enum)."""
    return tuple(outputs().__members__)


def linear_stats() -> type[enum.IntEnum]:
    """The columns of the fused linear op's ``(n, len(linear_stats()))`` running state."""
    return layout("linear_logprobs").stats
