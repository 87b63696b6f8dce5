"""Benchmark case ``token_baseline``: verl's optimal token baselines on
:func:`rlkern.optimal_token_baseline` against verl's own functions.

B responses of T tokens in groups of 8 (float32, shuffled uuid-string uids as verl's trainer
passes them): sparse rewards, a multi-turn response mask (ragged lengths, an observation span
in every response), old log-probabilities and Σπ² drawn from random distributions, rollout IS
weights. Two modes, each timed as verl's trainer calls the estimator (uid strings → group ids
included):

* ``optimal_token_baseline`` — ``rlkern_optimal_token_baseline`` vs verl's
  ``compute_optimal_token_baseline_advantage`` (a Python loop over groups);
* ``tir_optimal_token_baseline`` — ``rlkern_tir_optimal_token_baseline`` vs verl's
  ``compute_multi_turn_optimal_token_baseline_advantage`` (Python loops over rows and groups).

The floor is one read of the five (B, T) inputs and two (B, T) writes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from rlkern.bench.cases import Case, CaseOptions, Outputs, Size, register
from rlkern.bench.kit import (
    ADVANTAGES_AND_RETURNS,
    VERL_CORE,
    RlkernBackend,
    multi_turn_mask,
    traffic_floor,
    verl_peer_case,
)

ESTIMATORS = ("optimal_token_baseline", "tir_optimal_token_baseline")
GROUP = 8


class OtbInputs(NamedTuple):
    rewards: Tensor  # (B, T) float32
    mask: Tensor  # (B, T) float32 0/1
    old_log_probs: Tensor  # (B, T) float32
    sum_pi_squared: Tensor  # (B, T) float32
    rollout_is_weights: Tensor  # (B, T) float32
    uid: np.ndarray  # (B,) object array of uid strings


def make_inputs(size: Size, dtype: torch.dtype, device: torch.device) -> OtbInputs:
    """float32 whatever ``dtype`` (verl keeps these in float32)."""
    b, t = size["B"], size["T"]
    gen = torch.Generator().manual_seed(b * 37 + t)
    mask, lengths = multi_turn_mask(b, t, gen)
    rewards = torch.zeros(b, t)
    rewards[torch.arange(b), lengths - 1] = torch.randint(0, 2, (b,), generator=gen).float()
    # π of the sampled token and Σπ² of a peaked distribution: Σπ² ∈ [π², 1]
    pi = torch.rand(b, t, generator=gen).clamp_min(1e-4)
    spi2 = pi**2 + (1 - pi) ** 2 * torch.rand(b, t, generator=gen)
    rho = torch.rand(b, t, generator=gen).clamp(0.5, 1.0) * 2
    order = torch.randperm(b, generator=gen).numpy()
    uid = np.array([f"{g:08x}-uid" for g in (np.arange(b) // GROUP)[order]], dtype=object)
    tensors = (rewards, mask.float(), pi.log(), spi2, rho)
    return OtbInputs(*(x.to(device) for x in tensors), uid)


#: verl's core_algos (shared by the verl cases).
VERL = VERL_CORE
_VERL_FN = {"optimal_token_baseline": "compute_optimal_token_baseline_advantage",
            "tir_optimal_token_baseline": "compute_multi_turn_optimal_token_baseline_advantage"}


def _verl(mode: str) -> Callable[[OtbInputs], Outputs]:
    def call(inp: OtbInputs) -> Outputs:
        fn = getattr(VERL.get(), _VERL_FN[mode])
        adv, ret = fn(inp.rewards, inp.mask, inp.uid, inp.old_log_probs, inp.sum_pi_squared,
                      rollout_is_weights=inp.rollout_is_weights)
        return {"advantages": adv, "returns": ret}

    return call


def _rlkern(mode: str, backend: str) -> Callable[[OtbInputs], Outputs]:
    from rlkern.integrations.verl import group_ids_from_index
    from rlkern.ops.token_baseline import optimal_token_baseline

    def call(inp: OtbInputs) -> Outputs:
        out = optimal_token_baseline(
            inp.rewards, inp.mask, inp.old_log_probs, inp.sum_pi_squared,
            group_ids=group_ids_from_index(inp.uid, inp.rewards.device),
            rollout_is_weights=inp.rollout_is_weights,
            multi_turn=mode == "tir_optimal_token_baseline", backend=backend)
        return {"advantages": out.advantages, "returns": out.returns}

    return call


@register("token_baseline")
def token_baseline_case(options: CaseOptions) -> Case:
    backend = RlkernBackend.choose(options)
    name, notes = backend.name, backend.notes
    if backend.concrete == "cuda":
        # no CUDA C++ kernel: the Triton kernels, what rlkern_<name> runs on GPU tensors
        name, notes = "triton", (*notes, "optimal_token_baseline has no CUDA C++ kernel: the "
                                 "rlkern rows run backend='triton'")

    return verl_peer_case(
        name="token_baseline", backend=backend, rlkern=lambda mode: _rlkern(mode, name),
        verl=_verl, floor=traffic_floor(
            ("rewards", "mask", "old_log_probs", "sum_pi_squared", "rollout_is_weights"),
            ("rewards", "rewards")),
        floor_note="one read of the five (B, T) inputs; two (B, T) writes",
        sizes=[Size({"B": 512, "T": 1024}), Size({"B": 2048, "T": 4096})],
        quick_sizes=[Size({"B": 64, "T": 256})],
        modes=ESTIMATORS,
        make_inputs=make_inputs,
        # verl sums the group's G·W and W in float32 (T positions of O(T) cumulative weights),
        # rlkern in float64: a few 1e-6 relative.
        tolerances=ADVANTAGES_AND_RETURNS,
        notes=("issue 16: each estimator against verl's own function (uid strings → group "
               "ids inside the timed call)", *notes),
        warnings=notes,
        environment={"rlkern_backend": backend.concrete if name == backend.name else name},
    )
