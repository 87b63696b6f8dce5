"""Benchmark case ``gae``: verl's token-level estimators on :func:`rlkern.gae` against verl's.

B responses of T tokens (float32): small dense rewards plus an outcome reward at each
response's last token, critic values, a multi-turn response mask (ragged lengths, an
observation span in every response). Three modes, one per verl estimator, each timed as verl's
trainer calls it (whitening included):

* ``gae`` (γ = 1, λ = 0.95) — ``rlkern_gae`` (:func:`rlkern.integrations.verl.scan_estimator`,
  what the registered function runs: the fused scan, then verl's whitening in torch) vs verl's
  ``compute_gae_advantage_return`` (a Python loop over T of eager torch ops on (B,) columns);
* ``reinforce_plus_plus`` (γ = 0.99) — the same pair for REINFORCE++;
* ``remax`` — vs verl's ``flip · cumsum · flip`` (already vectorised: the fair peer).

The floor is one read of the inputs and one write of the two outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

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

GAMMA, LAM, GAMMA_RPP = 1.0, 0.95, 0.99
ESTIMATORS = ("gae", "reinforce_plus_plus", "remax")


class GaeInputs(NamedTuple):
    rewards: Tensor  # (B, T) float32
    values: Tensor  # (B, T) float32
    mask: Tensor  # (B, T) float32 0/1, as verl's trainer passes it
    baselines: Tensor  # (B,) float32 greedy-rollout rewards (remax)


def make_inputs(size: Size, dtype: torch.dtype, device: torch.device) -> GaeInputs:
    """float32 whatever ``dtype`` (verl keeps rewards and values in float32)."""
    b, t = size["B"], size["T"]
    gen = torch.Generator().manual_seed(b * 31 + t)
    mask, lengths = multi_turn_mask(b, t, gen)
    rewards = torch.randn(b, t, generator=gen) * 0.01
    rewards[torch.arange(b), lengths - 1] += torch.randint(0, 2, (b,), generator=gen).float()
    values = torch.randn(b, t, generator=gen) * 0.1
    baselines = torch.rand(b, generator=gen)
    return GaeInputs(*(x.to(device) for x in (rewards, values, mask.float(), baselines)))


#: verl's core_algos (shared by the verl cases).
VERL = VERL_CORE


class _AlgoConfig(dict):
    """What verl's estimators read of its AlgoConfig (``config.gamma``, ``config.get``)."""

    def __init__(self, gamma: float) -> None:
        super().__init__(gamma=gamma)
        self.gamma = gamma


def _verl(mode: str) -> Callable[[GaeInputs], Outputs]:
    def call(inp: GaeInputs) -> Outputs:
        core_algos = VERL.get()
        if mode == "gae":
            adv, ret = core_algos.compute_gae_advantage_return(inp.rewards, inp.values, inp.mask,
                                                               GAMMA, LAM)
        elif mode == "reinforce_plus_plus":
            adv, ret = core_algos.compute_reinforce_plus_plus_outcome_advantage(
                inp.rewards, inp.mask, config=_AlgoConfig(GAMMA_RPP))
        else:
            adv, ret = core_algos.compute_remax_outcome_advantage(inp.rewards, inp.baselines,
                                                                  inp.mask)
        return {"advantages": adv, "returns": ret}

    return call


def _rlkern(mode: str, backend: str) -> Callable[[GaeInputs], Outputs]:
    from rlkern.integrations.verl import scan_estimator

    gamma, lam = {"gae": (GAMMA, LAM), "reinforce_plus_plus": (GAMMA_RPP, 1.0)}.get(mode,
                                                                                  (1.0, 1.0))

    def call(inp: GaeInputs) -> Outputs:
        adv, ret = scan_estimator(mode, inp.rewards, inp.mask, values=inp.values, gamma=gamma,
                                  lam=lam, reward_baselines=inp.baselines, backend=backend)
        return {"advantages": adv, "returns": ret}

    return call


@register("gae")
def gae_case(options: CaseOptions) -> Case:
    backend = RlkernBackend.choose(options)
    return verl_peer_case(
        name="gae", backend=backend, rlkern=lambda mode: _rlkern(mode, backend.name),
        verl=_verl, floor=traffic_floor(("rewards", "values", "mask"), ("rewards", "rewards")),
        floor_note="one read of rewards, values, mask; two (B, T) writes",
        sizes=[Size({"B": 512, "T": 1024}), Size({"B": 1024, "T": 8192})],
        quick_sizes=[Size({"B": 64, "T": 256})],
        modes=ESTIMATORS,
        make_inputs=make_inputs,
        # verl accumulates the scan and the whitening statistics in float32, rlkern the scan in
        # float64: over T = 8192 steps the float32 sums drift by a few 1e-5 of O(1) values.
        tolerances=ADVANTAGES_AND_RETURNS,
        notes=("issue 16: each fused estimator against verl's own function",
               "rlkern = the rlkern_<name> functions verl's registry hands out (whitening "
               "included)", *backend.notes),
    )
