"""The CPU kernel's eight-lane path for contiguous groups (csrc/cpu/advantages_lanes.h) gives
the scalar path's bits.

With k groups, the first 8·⌊k/8⌋ go through the eight-lane path and the rest through the
scalar one; a group's results depend on its own rows only (and on batch-level constants, the
same for all). So a batch whose last groups repeat some of the first ones must give the
repeated groups identical outputs — a comparison of the two paths on the same data, with no
switch to turn either off. The float64 reference is checked too (test_advantages.py checks
every estimator against it as well).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rlkern
from rlkern.reference.advantages import group_advantages_reference

ESTIMATORS = ["grpo", "dr_grpo", "rloo", "gpg"]
VALUES = [0.0, 1.0, -1.0, 0.5, 2.0, 1e-3, 1e6, -0.0, math.nan, math.inf]


def _scores(gs: int, blocks: int, draw_group) -> tuple[torch.Tensor, list[int]]:
    """8·blocks groups drawn by `draw_group`, then copies of some of them (the scalar tail)."""
    groups = [draw_group() for _ in range(8 * blocks)]
    copies = list(range(0, 8 * blocks, 3))[:7]
    rows = groups + [groups[i] for i in copies]
    return torch.tensor([v for g in rows for v in g], dtype=torch.float32), copies


@settings(max_examples=150, deadline=None)
@given(gs=st.sampled_from([1, 2, 3, 5, 7, 8, 9, 13, 16, 19, 24]), blocks=st.integers(1, 3),
       estimator=st.sampled_from(ESTIMATORS),
       std=st.sampled_from(["unbiased", "biased", "none"]),
       scope=st.sampled_from(["group", "batch"]), singleton=st.sampled_from(["zero", "verl"]),
       eps=st.sampled_from([0.0, 1e-6, 1e-4]), data=st.data())
def test_lanes_match_the_scalar_path(gs, blocks, estimator, std, scope, singleton, eps, data):
    if scope == "batch" and estimator != "grpo":
        scope = "group"  # σ_batch belongs to the grpo family
    kind = data.draw(st.sampled_from(["random", "mixed", "flat", "sparse"]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))

    def draw_group():
        if kind == "random":  # values whose moments round (Σd², the division, the sqrt)
            return (torch.randn(gs, generator=gen) * 3 + 1).tolist()
        if kind == "flat":  # zero-variance groups, and some with one valid value
            v = data.draw(st.sampled_from(VALUES[:6]))
            g = [v] * gs
        else:
            g = [data.draw(st.sampled_from(VALUES)) for _ in range(gs)]
        if kind == "sparse":
            g = [math.nan if i % 3 else x for i, x in enumerate(g)]
        return g

    scores, copies = _scores(gs, blocks, draw_group)
    out = rlkern.group_advantages(scores, group_size=gs, estimator=estimator, std=std,
                                  std_scope=scope, singleton=singleton, eps=eps,
                                  nan_policy="omit", backend="cpu")
    k0 = 8 * blocks
    for j, i in enumerate(copies):
        lane = slice(i * gs, (i + 1) * gs)
        tail = slice((k0 + j) * gs, (k0 + j + 1) * gs)
        for name in ("advantages", "group_mean", "group_std"):
            a, b = getattr(out, name)[lane], getattr(out, name)[tail]
            assert torch.equal(a.isnan(), b.isnan()), name
            assert torch.equal(a.nan_to_num(), b.nan_to_num()), name
            assert torch.equal(a.signbit(), b.signbit()), name
        assert torch.equal(out.zero_variance_mask[lane], out.zero_variance_mask[tail])


@pytest.mark.parametrize("gs", [6, 8, 16])  # gathers; 8×8 transposes (group sizes of 8k)
def test_lanes_against_the_reference(gs):
    g = torch.Generator().manual_seed(gs)
    n = 8 * 40 * gs + 3 * gs  # 40 blocks of eight groups, then three groups on the scalar path
    scores = (torch.rand(n, generator=g) > 0.5).float() + 0.1 * torch.randn(n, generator=g)
    for estimator in ESTIMATORS:
        got = rlkern.group_advantages(scores, group_size=gs, estimator=estimator, backend="cpu")
        want = group_advantages_reference(scores.double(), group_size=gs, estimator=estimator)
        for name in ("advantages", "group_mean", "group_std"):
            torch.testing.assert_close(getattr(got, name), want[name].float(), rtol=1e-6,
                                       atol=1e-6)


@pytest.mark.parametrize("gs", [1, 3, 4, 5, 12])  # a partial step in every group
@pytest.mark.parametrize("alias", ["advantages", "group_mean", "group_std"])
def test_lanes_outputs_written_over_the_scores(gs, alias):
    """An output that is the scores tensor itself (the out op allows it) gets the bits of a
    call with separate outputs: the eight-lane path stores whole vectors past a group's end
    only where no output overlaps the scores, whose later groups it has yet to read."""
    g = torch.Generator().manual_seed(gs)
    n = 8 * 5 * gs + 2 * gs  # five blocks of eight groups, then two on the scalar path
    scores = torch.randn(n, generator=g)
    scores[::7] = 0.25  # ties and zero-variance groups among the rest
    flags, hparams = rlkern.AdvantageConfig().kernel_args()

    def outputs():
        return {"advantages": torch.full((n,), math.nan), "group_mean": torch.full((n,), math.nan),
                "group_std": torch.full((n,), math.nan),
                "zero_variance_mask": torch.zeros(n, dtype=torch.bool)}

    want = outputs()
    torch.ops.rlkern.group_advantages_out(scores, None, gs, None, None, flags, hparams,
                                          *want.values())
    got = outputs()
    shared = scores.clone()
    got[alias] = shared
    torch.ops.rlkern.group_advantages_out(shared, None, gs, None, None, flags, hparams,
                                          *got.values())
    for name in want:
        assert torch.equal(got[name], want[name]), name
