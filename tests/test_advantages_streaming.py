"""GroupStats: streaming per-group (n, mean, M2) with Chan's merge; advantages from merged
statistics equal the one-shot group_advantages result to float32 rounding."""

from __future__ import annotations

import math

import pytest
import torch

import rlkern
from advantages_cases import make_layout, make_scores
from rlkern.reference.advantages import group_moments_reference

BACKENDS = ["cpu", "torch"]
F32 = {"rtol": 1.2e-7, "atol": 1e-6}  # float32 rounding of the same float64 result


def _micro_batches(n: int, gen: torch.Generator, parts: int) -> list[torch.Tensor]:
    """Rows split into `parts` random micro-batches of random sizes."""
    perm = torch.randperm(n, generator=gen)
    cuts = sorted(torch.randint(0, n + 1, (parts - 1,), generator=gen).tolist())
    return [perm[a:b] for a, b in zip([0, *cuts], [*cuts, n], strict=True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "gpg", "ngrpo"])
@pytest.mark.parametrize("score_kind", ["binary", "normal", "constant_groups"])
@pytest.mark.parametrize("parts", [1, 3, 7])
def test_streamed_equals_one_shot(backend, estimator, score_kind, parts):
    gen = torch.Generator().manual_seed(parts)
    layout = make_layout("uneven", gen, n_groups=20)
    ids = layout["group_ids"]
    scores = make_scores(layout["n"], score_kind, gen, layout).float()
    stats = rlkern.GroupStats()
    for rows in _micro_batches(layout["n"], gen, parts):
        stats.update(scores[rows], ids[rows])
    got = stats.advantages(scores, ids, estimator=estimator, backend=backend)
    want = rlkern.group_advantages(scores, group_ids=ids, estimator=estimator)
    for a, b in zip(got, want, strict=True):
        if a.dtype == torch.bool:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, equal_nan=True, **F32)


@pytest.mark.parametrize("std_scope", ["group", "batch"])
@pytest.mark.parametrize("singleton", ["zero", "verl"])
@pytest.mark.parametrize("std", ["unbiased", "biased", "none"])
def test_merge_of_workers_equals_one_shot(std_scope, singleton, std):
    gen = torch.Generator().manual_seed(1)
    layout = make_layout("uneven", gen, n_groups=15)
    ids = layout["group_ids"]
    scores = (torch.randn(layout["n"], generator=gen) * 5 + 100).float()
    workers = []
    for rows in _micro_batches(layout["n"], gen, 4):
        workers.append(rlkern.GroupStats().update(scores[rows], ids[rows]))
    # Merge in a tree, in an order that differs from the row order.
    merged = workers[3].merge(workers[1]).merge(workers[0].merge(workers[2]))
    kw = {"std_scope": std_scope, "singleton": singleton, "std": std, "eps": 1e-4}
    got = merged.advantages(scores, ids, **kw)
    want = rlkern.group_advantages(scores, group_ids=ids, **kw)
    for a, b in zip(got, want, strict=True):
        if a.dtype == torch.bool:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, equal_nan=True, **F32)


def test_moments_match_two_pass_float64():
    gen = torch.Generator().manual_seed(2)
    layout = make_layout("uneven", gen, n_groups=30)
    ids = layout["group_ids"]
    scores = torch.randn(layout["n"], generator=gen, dtype=torch.float64) * 1e3 + 1e6
    stats = rlkern.GroupStats()
    for rows in _micro_batches(layout["n"], gen, 5):
        stats.update(scores[rows], ids[rows])
    keys, ref = group_moments_reference(scores, ids)
    assert torch.equal(stats.ids, keys)
    torch.testing.assert_close(stats.moments, ref, rtol=1e-12, atol=1e-9)
    assert stats.num_groups == keys.numel()
    torch.testing.assert_close(stats.std(), torch.where(ref[:, 0] < 2, 0.0,
                                                        (ref[:, 2] / (ref[:, 0] - 1)).sqrt()))


def test_zero_variance_survives_merges():
    ids = torch.tensor([4, 4, 4, 4, 4, 4])
    scores = torch.full((6,), 0.1)
    stats = rlkern.GroupStats()
    for i in range(6):
        stats.update(scores[i:i + 1], ids[i:i + 1])
    out = stats.advantages(scores, ids)
    assert bool(out.zero_variance_mask.all()) and torch.all(out.advantages == 0)
    assert torch.all(out.group_mean == scores) and torch.all(out.group_std == 0)


def test_nan_policy():
    scores = torch.tensor([1.0, math.nan, 0.0])
    ids = torch.tensor([1, 1, 1])
    with pytest.raises(ValueError, match="row 1"):
        rlkern.GroupStats().update(scores, ids)
    stats = rlkern.GroupStats(nan_policy="omit").update(scores, ids)
    assert stats.count.tolist() == [2.0]
    out = stats.advantages(scores, ids)
    assert out.advantages[1] == 0


def test_bad_input():
    stats = rlkern.GroupStats().update(torch.tensor([1.0, 2.0]), torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="no statistics"):
        stats.advantages(torch.tensor([1.0]), torch.tensor([5]))
    with pytest.raises(ValueError, match="estimator"):
        stats.advantages(torch.tensor([1.0]), torch.tensor([3]), estimator="opo")
    with pytest.raises(TypeError, match="int64"):
        stats.update(torch.tensor([1.0]), torch.tensor([3.0]))
    with pytest.raises(ValueError, match="shape"):
        stats.update(torch.tensor([1.0, 2.0]), torch.tensor([3]))
    with pytest.raises(TypeError, match="GroupStats"):
        stats.merge(object())
    with pytest.raises(ValueError, match="nan_policy"):
        rlkern.GroupStats(nan_policy="skip")
