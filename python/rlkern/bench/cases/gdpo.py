"""Benchmark case ``gdpo``: ``rlkern_gdpo`` against verl's ``compute_gdpo_outcome_advantage``.

N responses of T tokens in groups of 8 (shuffled uuid-string uids), K = 3 reward components
per response in ``non_tensor_batch`` (as verl's reward manager leaves them), a ragged response
mask; called as verl's trainer calls gdpo (config with ``gdpo_reward_keys`` and
``gdpo_reward_weights``, ``non_tensor_batch``, ``batch``). rlkern normalises all K components
in one :func:`rlkern.group_advantages` call, then verl's weighted sum and whitening; verl runs
its GRPO loop once per component. The floor is one read of the mask and one (N, T) write.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from rlkern.bench.cases import Case, CaseOptions, Outputs, Size, Tolerance, register
from rlkern.bench.kit import VERL_CORE, RlkernBackend, traffic_floor, verl_peer_case

GROUP = 8
KEYS = ("format_reward", "accuracy_reward", "length_reward")


class GdpoInputs(NamedTuple):
    rewards: Tensor  # (N, T) float32 token-level rewards
    mask: Tensor  # (N, T) float32 0/1
    uid: np.ndarray  # (N,) uid strings
    non_tensor_batch: dict[str, Any]
    batch: dict[str, Tensor]
    config: dict[str, Any]


def make_inputs(size: Size, dtype: torch.dtype, device: torch.device) -> GdpoInputs:
    n, t, p = size["N"], size["T"], 16
    gen = torch.Generator().manual_seed(n * 41 + t)
    rng = np.random.default_rng(n * 41 + t)
    lengths = torch.randint(1, t + 1, (n,), generator=gen)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).float()
    rewards = torch.zeros(n, t)
    rewards[torch.arange(n), lengths - 1] = torch.rand(n, generator=gen)
    order = rng.permutation(n)
    uid = np.array([f"{g:08x}-uid" for g in (np.arange(n) // GROUP)[order]], dtype=object)
    ntb: dict[str, Any] = {"uid": uid,
                           KEYS[0]: rng.integers(0, 2, n).astype(np.float32),
                           KEYS[1]: rng.random(n).astype(np.float32),
                           KEYS[2]: rng.normal(size=n).astype(np.float32)}
    batch = {"prompts": torch.zeros(n, p, dtype=torch.long, device=device),
             "attention_mask": torch.cat([torch.ones(n, p), mask], 1).long().to(device)}
    config = {"gdpo_reward_keys": list(KEYS), "gdpo_reward_weights": [1.0, 0.5, 0.25]}
    return GdpoInputs(rewards.to(device), mask.to(device), uid, ntb, batch, config)


#: verl's core_algos (shared by the verl cases).
VERL = VERL_CORE


def _verl(inp: GdpoInputs) -> Outputs:
    adv, _ = VERL.get().compute_gdpo_outcome_advantage(
        inp.rewards, inp.mask, inp.uid, config=inp.config,
        non_tensor_batch=inp.non_tensor_batch, batch=inp.batch)
    return {"advantages": adv}


def _rlkern(backend: str) -> Callable[[GdpoInputs], Outputs]:
    from rlkern.integrations.verl_estimators import gdpo_advantages

    def call(inp: GdpoInputs) -> Outputs:
        adv, _ = gdpo_advantages(inp.rewards, inp.mask, inp.uid, 1e-6, True, inp.config,
                                 inp.non_tensor_batch, inp.batch, backend=backend)
        return {"advantages": adv}

    return call


@register("gdpo")
def gdpo_case(options: CaseOptions) -> Case:
    backend = RlkernBackend.choose(options)
    return verl_peer_case(
        name="gdpo", backend=backend, rlkern=lambda mode: _rlkern(backend.name),
        verl=lambda mode: _verl, floor=traffic_floor(("mask",), (), copies=("rewards",)),
        floor_note="one read of the mask and of the rewards; one (N, T) write",
        sizes=[Size({"N": 4096, "T": 1024}), Size({"N": 16384, "T": 2048})],
        quick_sizes=[Size({"N": 256, "T": 128})],
        modes=("gdpo",),
        make_inputs=make_inputs,
        # both whiten in float32; rlkern's group statistics are float64, verl's float32
        tolerances={"advantages": Tolerance(atol=1e-5, rtol=1e-5)},
        notes=("issue 16: gdpo against verl's own function (K = 3 components, uid strings → "
               "group ids inside the timed call)", *backend.notes),
    )
