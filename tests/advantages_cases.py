"""Shared inputs for the group-advantage tests: group layouts, score kinds, estimator inputs.

Layouts cover what trainers hand over: TRL's contiguous groups, verl's shuffled uids (here:
arbitrary int64, negative and huge, not dense), uneven group sizes, singletons.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

import rlkern
from rlkern.reference.advantages import ESTIMATORS, group_advantages_reference

LAYOUTS = ("contiguous", "contiguous_g1", "shuffled", "uneven", "dense_ids")
SCORE_KINDS = ("binary", "normal", "integer", "constant_groups")

# float32 outputs against the float64 reference: DESIGN.md's 1e-5 relative; the atol covers
# advantages near 0 (the difference of two O(1) terms).
OUT_TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-10, 1e-10)}


def make_layout(kind: str, gen: torch.Generator, n_groups: int = 12) -> dict:
    """``{"group_ids": ...}`` or ``{"group_size": ...}`` and the row count ``n``."""
    if kind == "contiguous":
        return {"group_size": 8, "n": 8 * n_groups}
    if kind == "contiguous_g1":
        return {"group_size": 1, "n": n_groups}
    sizes = (torch.full((n_groups,), 8) if kind == "shuffled"
             else torch.randint(1, 11, (n_groups,), generator=gen))  # uneven, dense_ids
    if kind in ("uneven", "dense_ids"):
        sizes[0] = 1  # always at least one singleton group
    if kind == "dense_ids":  # prompt indices: near-dense ids take the no-hash path on CPU
        ids = torch.randperm(n_groups + 3, generator=gen)[:n_groups] - 7
    else:
        ids = torch.randint(-(2**62), 2**62, (n_groups,), generator=gen)
    rows = ids.repeat_interleave(sizes)
    rows = rows[torch.randperm(rows.numel(), generator=gen)]
    return {"group_ids": rows, "n": rows.numel()}


def make_scores(n: int, kind: str, gen: torch.Generator, layout: dict) -> torch.Tensor:
    if kind == "binary":
        return torch.randint(0, 2, (n,), generator=gen).double()
    if kind == "integer":
        return torch.randint(0, 5, (n,), generator=gen).double()
    if kind == "normal":
        return torch.randn(n, generator=gen, dtype=torch.float64) * 3 + 1
    # constant_groups: every group has all-equal scores (zero variance), values that are not
    # exact in binary (0.1) so a naive mean would not return them exactly.
    values = torch.tensor([0.1, -2.7, 1e3 + 0.3, 5.0], dtype=torch.float64)
    if "group_ids" in layout:
        _, inv = torch.unique(layout["group_ids"], return_inverse=True)
    else:
        inv = torch.arange(n) // layout["group_size"]
    return values[inv % values.numel()]


def estimator_inputs(estimator: str, n: int, gen: torch.Generator, t: int = 6) -> dict:
    """The extra arguments each estimator needs (mask, lengths, old_logprobs, lam, kappa)."""
    extra: dict = {}
    if estimator == "opo":
        extra["lengths"] = torch.randint(0, 30, (n,), generator=gen)
    if estimator == "reinforce_pp_baseline":
        lengths = torch.randint(0, t + 1, (n,), generator=gen)
        extra["mask"] = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    if estimator in ("unlikely", "xrpo"):
        lengths = torch.randint(1, t + 1, (n,), generator=gen)
        extra["mask"] = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
        extra["old_logprobs"] = -torch.rand(n, t, generator=gen, dtype=torch.float64) * 3
        # Ties in the log-likelihood: ranks must then follow the row order.
        extra["old_logprobs"][::5] = -1.0
    if estimator == "xrpo":
        extra.update(lam=0.5, kappa=0.3)
    return extra


def check_against_reference(scores: torch.Tensor, *, backend: str, estimator: str,
                            what: str = "", **kwargs) -> rlkern.GroupAdvantages:
    out = rlkern.group_advantages(scores, estimator=estimator, backend=backend, **kwargs)
    ref = group_advantages_reference(scores.double(), estimator=estimator, **kwargs)
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    rtol, atol = OUT_TOL[dtype]
    assert out.advantages.dtype == dtype and out.group_mean.dtype == dtype
    msg = lambda m: f"{what} {estimator} ({backend}): {m}"
    torch.testing.assert_close(out.advantages.double(), ref["advantages"], rtol=rtol, atol=atol,
                               msg=msg)
    torch.testing.assert_close(out.group_mean.double(), ref["group_mean"], rtol=rtol, atol=atol,
                               equal_nan=True, msg=msg)
    torch.testing.assert_close(out.group_std.double(), ref["group_std"], rtol=rtol, atol=atol,
                               equal_nan=True, msg=msg)
    assert torch.equal(out.zero_variance_mask, ref["zero_variance_mask"]), what
    return out


class EstimatorCase(NamedTuple):
    """One estimator's inputs: float32 ``scores`` (n,), the ``layout`` as keyword arguments
    (``group_ids`` or ``group_size``), the estimator's ``extra`` inputs, and the generator they
    were drawn from."""

    scores: torch.Tensor
    layout: dict
    extra: dict
    gen: torch.Generator


def estimator_case(seed: int, estimator: str, layout_kind: str = "uneven",
                   score_kind: str = "normal", n_groups: int = 12) -> EstimatorCase:
    """Layout, float32 scores and the estimator's inputs, drawn in that order from one
    generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    layout = make_layout(layout_kind, gen, n_groups)
    scores = make_scores(layout["n"], score_kind, gen, layout).float()
    extra = estimator_inputs(estimator, layout["n"], gen)
    return EstimatorCase(scores, {k: v for k, v in layout.items() if k != "n"}, extra, gen)


def gigpo_inputs(seed: int, steps: int, *, groups: int, group_stride: int, states: int,
                 key_stride: int = 1) -> tuple[torch.Tensor, ...]:
    """``(episode, step, keys, group_ids)`` for ``steps`` environment steps: 0/1 episode returns,
    N(0, 1) step returns, ``states`` distinct state keys and ``groups`` prompt groups (ids and
    keys spread by the strides, so that they are not dense)."""
    gen = torch.Generator().manual_seed(seed)
    group = torch.randint(0, groups, (steps,), generator=gen) * group_stride
    episode = torch.randint(0, 2, (steps,), generator=gen).float()
    step = torch.randn(steps, generator=gen)
    keys = torch.randint(0, states, (steps,), generator=gen) * key_stride
    return episode, step, keys, group


__all__ = ["ESTIMATORS", "LAYOUTS", "OUT_TOL", "SCORE_KINDS", "EstimatorCase",
           "check_against_reference", "estimator_case", "estimator_inputs", "gigpo_inputs",
           "make_layout", "make_scores"]
