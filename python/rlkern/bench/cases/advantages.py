"""Benchmark cases ``advantages`` (GRPO group advantages) and ``gigpo`` (GiGPO's two levels).

``advantages`` — N responses in groups of 8 (float32 outcome rewards in {0, 1}), three modes:

* ``shuffled ids`` — verl's layout: rows in random order, each with its prompt's uid. rlkern
  gets arbitrary int64 ids (random 63-bit values: the hash path); the peers get what they take
  for the same grouping:

  - ``verl loop`` — ``core_algos.compute_grpo_outcome_advantage`` (a Python loop over rows),
    called as verl's trainer calls it: token rewards ``(N, 1)``, the mask, a numpy array of
    uid strings;
  - ``verl vectorized (uid strings)`` — ``compute_grpo_vectorized_outcome_advantage`` with the
    same uid strings (it factorises them with ``np.unique``);
  - ``torch scatter`` — the best plain-torch version for the same arbitrary ids:
    ``torch.unique(return_inverse, return_counts)``, ``index_add_`` for the sums and the
    squared deviations, ``index_select`` to gather back.

* ``dense ids`` — the same rows, but every implementation gets dense int ids 0..K−1 (e.g.
  prompt indices): verl's vectorised estimator then indexes with them directly (its most
  favourable input), ``torch scatter`` skips ``unique``, rlkern skips hashing.

* ``contiguous`` — TRL's layout (``group_size=8``): rlkern vs TRL's formula
  (``view(-1, 8)``, ``mean``, ``std``, ``(r − mean)/(std + 1e-4)``) in eager torch.

* ``contiguous G=5`` — the same with groups of 5 (e.g. verl's ``rollout.n = 5``) on the first
  ``5·⌊N/5⌋`` rows: a group size that is not a multiple of the kernel's 8 lanes, so every
  group ends in a partial vector.

``gigpo`` — S environment steps, prompt groups of 64 steps (8 episodes × 8 steps), 16 distinct
state hashes per prompt group: rlkern vs a plain-torch implementation (``torch.unique`` of the
prompt ids and of the (prompt id, state key) pairs, then ``index_add_`` statistics).

Targets of the issue (CPU, groups of 8, shuffled ids, same run): ≥ 100× the verl loop at
N = 65,536; ≥ 5× verl's vectorised estimator and ≥ 3× the best plain-torch scatter at
N = 1,048,576; GiGPO ≥ 10× plain torch at 1M steps. The floor is one read of the inputs and
one write of the four outputs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from rlkern.bench.cases import Case, CaseOptions, Impl, Outputs, Size, Tolerance, register
from rlkern.bench.kit import Peer, RlkernBackend, read_once, write_once

GROUP = 8
ODD_GROUP = 5  # the ``contiguous G=5`` mode's group size
TARGETS = (
    "targets (issue 4): rlkern >= 100x 'verl loop' at N=65536; >= 5x 'verl vectorized' and "
    ">= 3x 'torch scatter' at N=1048576; gigpo >= 10x 'torch' at S=1048576",
)
SHUFFLED, DENSE, CONTIGUOUS = "shuffled ids", "dense ids", "contiguous"
CONTIGUOUS_ODD = f"contiguous G={ODD_GROUP}"


def _contiguous(mode: str, scores: Tensor) -> tuple[Tensor, int]:
    """The scores and group size of a contiguous mode (the odd one takes whole groups only)."""
    if mode == CONTIGUOUS_ODD:
        return scores[: scores.numel() // ODD_GROUP * ODD_GROUP], ODD_GROUP
    return scores, GROUP


class AdvInputs(NamedTuple):
    scores: Tensor  # (N,) float32
    ids: Tensor  # (N,) int64, arbitrary 63-bit values, shuffled
    dense_ids: Tensor  # (N,) int64 in [0, K), same grouping
    uid: np.ndarray  # (N,) object array of uid strings (what verl's trainer passes)
    token_rewards: Tensor  # (N, 1): the reward on the single response token
    mask: Tensor  # (N, 1) ones


def make_inputs(size: Size, dtype: torch.dtype, device: torch.device) -> AdvInputs:
    """Rewards in {0, 1} (float32 whatever ``dtype``: rewards are not stored in bf16)."""
    n = size["N"]
    k = n // GROUP
    gen = torch.Generator().manual_seed(n)
    keys = torch.randint(-(2**62), 2**62, (k,), generator=gen)
    perm = torch.randperm(n, generator=gen)
    dense = torch.arange(k).repeat_interleave(GROUP)[perm]
    ids = keys[dense]
    scores = torch.randint(0, 2, (n,), generator=gen).float()
    uid = np.array([f"{int(x) & (2**64 - 1):016x}-uid" for x in keys.tolist()], dtype=object)
    return AdvInputs(scores.to(device), ids.to(device), dense.to(device), uid[dense.numpy()],
                     scores.unsqueeze(-1).to(device), torch.ones(n, 1, device=device))


# -------------------------------------------------------------------------------- peers


def torch_scatter_grpo(scores: Tensor, ids: Tensor, eps: float = 1e-6,
                       dense_k: int | None = None) -> Tensor:
    """The best plain-torch GRPO for arbitrary ids: one ``unique`` (a sort), then fused
    ``index_add_`` / ``index_select`` passes; singletons get 0 (rlkern's default)."""
    if dense_k is None:
        _, inv, counts = torch.unique(ids, return_inverse=True, return_counts=True)
        k = counts.numel()
    else:
        inv, k = ids, dense_k
        counts = torch.bincount(inv, minlength=k)
    c = counts.to(scores.dtype)
    mean = torch.zeros(k, dtype=scores.dtype, device=scores.device).index_add_(0, inv, scores)
    mean /= c
    d = scores - mean.index_select(0, inv)
    var = torch.zeros_like(mean).index_add_(0, inv, d * d) / (c - 1).clamp_min(1)
    scale = torch.where(c > 1, 1.0 / (var.sqrt() + eps), 0.0)
    return d * scale.index_select(0, inv)


def trl_formula(scores: Tensor, group: int) -> Tensor:
    """TRL's GRPO advantages for contiguous groups (its eps 1e-4)."""
    grouped = scores.view(-1, group)
    mean = grouped.mean(1).repeat_interleave(group)
    std = grouped.std(1).repeat_interleave(group)
    return (scores - mean) / (std + 1e-4)


#: verl's core_algos.
VERL = Peer("verl", lambda: importlib.import_module("verl.trainer.ppo.core_algos"),
            hint="optional: pip install -e '.[parity]' && pip install --no-deps verl")


def _verl_impl(name: str, fn_name: str, index: Callable[[AdvInputs], Any]) -> Impl:
    def call(inp: AdvInputs) -> Outputs:
        fn = getattr(VERL.get(), fn_name)
        adv, _ = fn(inp.token_rewards.clone(), inp.mask, index(inp))
        return {"advantages": adv.reshape(-1)}

    return Impl(name, call, skip=VERL.missing())


def _rlkern(backend: str, mode: str) -> Callable[[AdvInputs], Outputs]:
    from rlkern import group_advantages

    def call(inp: AdvInputs) -> Outputs:
        if mode == SHUFFLED:
            out = group_advantages(inp.scores, group_ids=inp.ids, backend=backend)
        elif mode == DENSE:
            out = group_advantages(inp.scores, group_ids=inp.dense_ids, backend=backend)
        else:
            scores, group = _contiguous(mode, inp.scores)
            out = group_advantages(scores, group_size=group, eps=1e-4, backend=backend)
        return {"advantages": out.advantages}

    return call


def _floor(mode: str) -> Callable[[AdvInputs], Outputs]:
    """Read the op's inputs once (the contiguous layout takes no ids); write advantages, mean,
    std (float32) and the mask (bool)."""

    def floor(inp: AdvInputs) -> Outputs:
        if mode in (CONTIGUOUS, CONTIGUOUS_ODD):
            scores, _ = _contiguous(mode, inp.scores)
            read_once(scores)
        else:
            scores = inp.scores
            read_once(scores, inp.ids)
        for dtype in (torch.float32, torch.float32, torch.float32, torch.bool):
            write_once(scores, dtype)
        return {}

    return floor


@register("advantages")
def advantages_case(options: CaseOptions) -> Case:
    backend = RlkernBackend.choose(options)

    def implementations(mode: str) -> list[Impl]:
        rlkern = Impl.rlkern(_rlkern(backend.name, mode), note=backend.note)
        floor = Impl.floor(_floor(mode))
        if mode in (CONTIGUOUS, CONTIGUOUS_ODD):
            return [
                rlkern,
                Impl("trl formula",
                     lambda inp: {"advantages": trl_formula(*_contiguous(mode, inp.scores))}),
                floor,
            ]
        if mode == DENSE:
            return [
                rlkern,
                _verl_impl("verl vectorized", "compute_grpo_vectorized_outcome_advantage",
                           lambda i: i.dense_ids.cpu().numpy()),
                Impl("torch scatter",
                     lambda inp: {"advantages": torch_scatter_grpo(
                         inp.scores, inp.dense_ids, dense_k=inp.scores.numel() // GROUP)}),
                floor,
            ]
        return [
            rlkern,
            _verl_impl("verl loop", "compute_grpo_outcome_advantage", lambda i: i.uid),
            _verl_impl("verl vectorized (uid strings)",
                       "compute_grpo_vectorized_outcome_advantage", lambda i: i.uid),
            Impl("torch scatter",
                 lambda inp: {"advantages": torch_scatter_grpo(inp.scores, inp.ids)}),
            floor,
        ]

    return Case(
        name="advantages",
        sizes=[Size({"N": 65536}), Size({"N": 1048576})],
        quick_sizes=[Size({"N": 4096}), Size({"N": 65536})],
        modes=(SHUFFLED, DENSE, CONTIGUOUS, CONTIGUOUS_ODD),
        make_inputs=make_inputs,
        implementations=implementations,
        # float32 peers against rlkern's float64-accumulated result: a few float32 ulps.
        tolerances={"advantages": Tolerance(atol=1e-5, rtol=1e-5)},
        notes=(*TARGETS, "floor: one read of the scores (and the ids, except contiguous), one "
               "write of the four outputs", *backend.notes),
        warnings=backend.notes,
        environment=backend.environment,
    )


# ------------------------------------------------------------------------------------ GiGPO


class GigpoInputs(NamedTuple):
    episode: Tensor  # (S,) episode return of each step
    step: Tensor  # (S,) discounted return from each step
    keys: Tensor  # (S,) int64 state hash
    group: Tensor  # (S,) int64 prompt-group id


STEPS_PER_GROUP, STATES_PER_GROUP = 64, 16


def make_gigpo_inputs(size: Size, dtype: torch.dtype, device: torch.device) -> GigpoInputs:
    s = size["S"]
    gen = torch.Generator().manual_seed(s + 1)
    groups = torch.randint(0, 2**62, (s // STEPS_PER_GROUP + 1,), generator=gen)
    g_idx = torch.arange(s) // STEPS_PER_GROUP
    perm = torch.randperm(s, generator=gen)
    group = groups[g_idx][perm]
    keys = torch.randint(0, STATES_PER_GROUP, (s,), generator=gen) * 0x9E3779B97F4A7C15 % 2**62
    episode = torch.randint(0, 2, (s,), generator=gen).float()
    step = episode * 0.9 ** torch.randint(0, 8, (s,), generator=gen).float()
    return GigpoInputs(episode.to(device), step.to(device), keys.to(device), group.to(device))


def _norm_in_groups(x: Tensor, inv: Tensor, k: int, eps: float) -> Tensor:
    # float64: step groups often hold equal returns (0.9^t), and a float32 mean of equal values
    # may miss them by an ulp, which 1/(σ + eps) would blow up to O(0.1) instead of 0.
    x = x.double()
    c = torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, inv, torch.ones_like(x))
    mean = torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, inv, x) / c
    d = x - mean.index_select(0, inv)
    var = torch.zeros_like(mean).index_add_(0, inv, d * d) / (c - 1).clamp_min(1)
    scale = torch.where(c > 1, 1.0 / (var.sqrt() + eps), 0.0)
    return (d * scale.index_select(0, inv)).float()


def torch_gigpo(inp: GigpoInputs, omega: float = 1.0, eps: float = 1e-6) -> Tensor:
    """Plain-torch GiGPO (std_norm at both levels): unique ids, unique (id, key) pairs."""
    _, prompt = torch.unique(inp.group, return_inverse=True)
    pairs = torch.stack([inp.group, inp.keys], dim=1)
    _, state = torch.unique(pairs, dim=0, return_inverse=True)
    a_ep = _norm_in_groups(inp.episode, prompt, int(prompt.max()) + 1, eps)
    a_st = _norm_in_groups(inp.step, state, int(state.max()) + 1, eps)
    return a_ep + omega * a_st


@register("gigpo")
def gigpo_case(options: CaseOptions) -> Case:
    backend = RlkernBackend.choose(options)
    from rlkern import gigpo_advantages

    def rlkern_call(inp: GigpoInputs) -> Outputs:
        out = gigpo_advantages(inp.episode, inp.step, inp.keys, group_ids=inp.group, omega=1.0,
                               mode="std_norm", backend=backend.name)
        return {"advantages": out.advantages}

    def floor(inp: GigpoInputs) -> Outputs:
        read_once(inp.group, inp.keys, inp.episode, inp.step)
        for x in (inp.episode, inp.step, inp.step):
            write_once(x)
        return {}

    def implementations(mode: str) -> list[Impl]:
        return [
            Impl.rlkern(rlkern_call, note=backend.note),
            Impl("torch", lambda inp: {"advantages": torch_gigpo(inp)}),
            Impl.floor(floor),
        ]

    return Case(
        name="gigpo",
        sizes=[Size({"S": 65536}), Size({"S": 1048576})],
        quick_sizes=[Size({"S": 8192})],
        modes=("std_norm",),
        make_inputs=make_gigpo_inputs,
        implementations=implementations,
        tolerances={"advantages": Tolerance(atol=1e-5, rtol=1e-5)},
        notes=(*TARGETS, "floor: one read of the four inputs, one write of the three outputs"),
        warnings=backend.notes,
        environment=backend.environment,
    )
