"""Shared inputs for the group-advantage tests: group layouts, score kinds, estimator inputs.

Layouts cover what trainers hand over: TRL's contiguous groups, verl's shuffled uids (here:
arbitrary int64, negative and huge, not dense), uneven group sizes, singletons.
"""

from __future__ import annotations

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


def gigpo_steps(seed: int, steps: int, *, groups: int, group_stride: int, states: int,
                state_stride: int = 1) -> tuple[torch.Tensor, ...]:
    """GiGPO inputs: (prompt group ids, binary episode returns, step returns, state keys)."""
    gen = torch.Generator().manual_seed(seed)
    group = torch.randint(0, groups, (steps,), generator=gen) * group_stride
    episode = torch.randint(0, 2, (steps,), generator=gen).float()
    step = torch.randn(steps, generator=gen)
    keys = torch.randint(0, states, (steps,), generator=gen) * state_stride
    return group, episode, step, keys


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


__all__ = ["ESTIMATORS", "LAYOUTS", "OUT_TOL", "SCORE_KINDS", "check_against_reference",
           "estimator_inputs", "gigpo_steps", "make_layout", "make_scores"]
