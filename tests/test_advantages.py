"""group_advantages on the compiled CPU backend (and the torch reference) against float64 truth.

Every estimator × every group layout × every score kind; the documented edge cases (singleton,
zero variance, NaN), row-order independence, and every bad input the issue lists. The Triton
kernels run the same checks in test_advantages_triton.py (interpreter).
"""

from __future__ import annotations

import math

import pytest
import torch

import rlkern
from advantages_cases import (
    ESTIMATORS,
    LAYOUTS,
    SCORE_KINDS,
    check_against_reference,
    estimator_case,
    estimator_inputs,
    make_layout,
    make_scores,
)
from conftest import stable_seed

BACKENDS = ["cpu", "torch"]


def _layout_args(layout: dict) -> dict:
    return {k: v for k, v in layout.items() if k != "n"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("layout_kind", LAYOUTS)
@pytest.mark.parametrize("score_kind", SCORE_KINDS)
def test_estimators_match_reference(backend, estimator, layout_kind, score_kind):
    case = estimator_case(stable_seed(estimator, layout_kind, score_kind), estimator,
                          layout_kind, score_kind)
    check_against_reference(case.scores, backend=backend, estimator=estimator,
                            what=f"{layout_kind}/{score_kind}", **case.layout, **case.extra)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["grpo", "unlikely", "xrpo"])
@pytest.mark.parametrize("std", ["unbiased", "biased", "none"])
def test_batch_std_scope_and_std_modes(backend, estimator, std):
    case = estimator_case(3, estimator)
    for scope in ("group", "batch"):
        check_against_reference(case.scores, backend=backend, estimator=estimator, std=std,
                                std_scope=scope, **case.layout, **case.extra)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", [e for e in ESTIMATORS if e != "grpo_passk"])
@pytest.mark.parametrize("std", ["unbiased", "biased", "none"])
def test_singleton_verl_and_std_modes(backend, estimator, std):
    case = estimator_case(4, estimator, score_kind="integer")
    check_against_reference(case.scores, backend=backend, estimator=estimator, std=std,
                            singleton="verl", eps=1e-4, **case.layout, **case.extra)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("layout_kind", ["contiguous", "uneven"])
def test_nan_omit(backend, estimator, layout_kind):
    gen = torch.Generator().manual_seed(5)
    layout = make_layout(layout_kind, gen)
    scores = make_scores(layout["n"], "normal", gen, layout)
    scores[::7] = math.nan
    scores[3] = math.inf
    if layout_kind == "contiguous":
        scores[8:16] = math.nan  # a group with no valid score at all
    extra = estimator_inputs(estimator, layout["n"], gen)
    out = check_against_reference(scores.float(), backend=backend, estimator=estimator,
                                  nan_policy="omit", **_layout_args(layout), **extra)
    adv = out.advantages if out.advantages.dim() == 1 else out.advantages[:, 0]
    assert torch.all(adv[~torch.isfinite(scores)] == 0)
    if layout_kind == "contiguous":
        assert torch.isnan(out.group_mean[8:16]).all() and torch.isnan(out.group_std[8:16]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_input_dtypes(backend, dtype):
    gen = torch.Generator().manual_seed(6)
    layout = make_layout("shuffled", gen)
    scores = make_scores(layout["n"], "normal", gen, layout).to(dtype)
    out = check_against_reference(scores, backend=backend, estimator="grpo",
                                  **_layout_args(layout))
    assert out.advantages.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_level_rewards_and_mask_broadcast(backend):
    gen = torch.Generator().manual_seed(7)
    rewards = torch.zeros(16, 5)
    rewards[:, -1] = torch.randint(0, 2, (16,), generator=gen).float()
    rewards[:, 1] = torch.rand(16, generator=gen)  # a process reward: scores are row sums
    mask = torch.rand(16, 5, generator=gen) > 0.3
    out = check_against_reference(rewards, backend=backend, estimator="grpo", group_size=4,
                                  mask=mask)
    assert out.advantages.shape == (16, 5)
    assert torch.all(out.advantages[~mask] == 0)
    flat = rlkern.group_advantages(rewards.sum(-1), group_size=4, backend=backend)
    torch.testing.assert_close(out.advantages, flat.advantages.unsqueeze(-1) * mask)


# ------------------------------------------------------------------ documented edge cases


def test_ngrpo_check_values_from_algorithms_md():
    one_hit = torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0])
    out = rlkern.group_advantages(one_hit, group_size=8, estimator="ngrpo")
    torch.testing.assert_close(out.advantages[0], torch.tensor(1.7638), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.advantages[1:], torch.full((7,), -0.5040), atol=1e-4, rtol=0)
    none = rlkern.group_advantages(torch.zeros(8), group_size=8, estimator="ngrpo")
    # −(1/9) / (1/3 + eps): −1/3 up to the eps in the denominator.
    torch.testing.assert_close(none.advantages, torch.full((8,), -1 / 3), atol=2e-6, rtol=0)
    assert bool(none.zero_variance_mask.all())  # flagged, yet NGRPO's signal is not zero


@pytest.mark.parametrize("backend", BACKENDS)
def test_singleton_conventions(backend):
    scores = torch.tensor([3.0, 1.0, 2.0])
    ids = torch.tensor([10, 20, 20])
    zero = rlkern.group_advantages(scores, group_ids=ids, backend=backend)
    assert zero.advantages[0] == 0 and zero.group_std[0] == 0 and zero.group_mean[0] == 3
    assert not bool(zero.zero_variance_mask[0])  # singletons are not "zero variance" groups
    verl = rlkern.group_advantages(scores, group_ids=ids, singleton="verl", backend=backend)
    torch.testing.assert_close(verl.advantages[0], torch.tensor(3.0 / (1 + 1e-6)))
    torch.testing.assert_close(verl.advantages[1:], zero.advantages[1:])
    rloo = rlkern.group_advantages(scores, group_ids=ids, estimator="rloo", singleton="verl",
                                   backend=backend)
    assert rloo.advantages[0] == 3.0  # verl leaves a singleton's RLOO score as is
    with pytest.raises(ValueError, match="grpo_passk"):
        rlkern.group_advantages(scores, group_ids=ids, estimator="grpo_passk", singleton="verl",
                                backend=backend)
    passk = rlkern.group_advantages(scores, group_ids=ids, estimator="grpo_passk",
                                    backend=backend)
    assert passk.advantages[0] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "opo", "gpg", "grpo_passk",
                                       "unlikely", "xrpo"])
def test_zero_variance_groups_are_exactly_zero(backend, estimator):
    gen = torch.Generator().manual_seed(8)
    layout = make_layout("shuffled", gen)
    scores = make_scores(layout["n"], "constant_groups", gen, layout).float()
    if estimator == "unlikely":
        scores = torch.zeros_like(scores)  # r' = r (1 − λ rank) is constant only for r = 0
    extra = estimator_inputs(estimator, layout["n"], gen)
    out = rlkern.group_advantages(scores, estimator=estimator, backend=backend,
                                  **_layout_args(layout), **extra)
    assert bool(out.zero_variance_mask.all())
    assert torch.all(out.advantages == 0)
    assert torch.all(out.group_std == 0)
    assert torch.equal(out.group_mean, scores)  # the mean of equal scores is that score


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "opo", "ngrpo", "gpg", "xrpo"])
def test_row_order_independence(estimator):
    """Permuting the rows permutes the outputs, up to float32 rounding (double accumulation)."""
    gen = torch.Generator().manual_seed(9)
    layout = make_layout("uneven", gen, n_groups=40)
    scores = (torch.randn(layout["n"], generator=gen) * 100 + 1e4).float()
    extra = estimator_inputs(estimator, layout["n"], gen)
    out = rlkern.group_advantages(scores, estimator=estimator, **_layout_args(layout), **extra)
    perm = torch.randperm(layout["n"], generator=gen)
    permuted = {k: (v[perm] if isinstance(v, torch.Tensor) else v) for k, v in extra.items()}
    out_p = rlkern.group_advantages(scores[perm], estimator=estimator,
                                    group_ids=layout["group_ids"][perm], **permuted)
    for a, b in zip(out, out_p, strict=True):
        a = a[perm]
        if a.dtype == torch.bool:
            assert torch.equal(a, b)
        else:  # one float32 ulp
            torch.testing.assert_close(b, a, rtol=1.2e-7, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_passk_top_row_and_gap(backend):
    scores = torch.tensor([0.2, 0.9, 0.5, 0.9, 1.0, 0.0, 0.3])
    ids = torch.tensor([1, 1, 1, 2, 2, 2, 2])
    out = rlkern.group_advantages(scores, group_ids=ids, estimator="grpo_passk", std="none",
                                  backend=backend)
    expected = torch.tensor([0.0, 0.4, 0.0, 0.0, 0.1, 0.0, 0.0])
    torch.testing.assert_close(out.advantages, expected, atol=1e-6, rtol=0)
    tie = rlkern.group_advantages(torch.tensor([1.0, 1.0, 0.0]), group_size=3,
                                  estimator="grpo_passk", backend=backend)
    assert torch.all(tie.advantages == 0)  # a tie at the top: s_max − s_second = 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_unlikely_ranks_least_likely_first(backend):
    scores = torch.ones(4)
    old = torch.tensor([[-0.1], [-3.0], [-1.0], [-1.0]])  # ranks 3, 0, 1, 2 (tie by row)
    out = rlkern.group_advantages(scores, group_size=4, estimator="unlikely", old_logprobs=old,
                                  mask=torch.ones(4, 1), std="none", backend=backend)
    r = 1 - 0.25 * torch.tensor([3.0, 0.0, 1.0, 2.0]) / 4
    torch.testing.assert_close(out.advantages[:, 0], r - r.mean())


@pytest.mark.parametrize("ids", [[-(2**63), 2**63 - 1, -(2**63)], [5, 5, 2**40], [0, 1, 0]])
def test_id_extremes(ids):
    """Ids at the int64 extremes (the dense-range check must not overflow) and ids that are
    dense or not give the same grouping."""
    ids = torch.tensor(ids)
    scores = torch.tensor([1.0, 2.0, 4.0])
    check_against_reference(scores, backend="cpu", estimator="grpo", group_ids=ids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    out = rlkern.group_advantages(torch.zeros(0), group_ids=torch.zeros(0, dtype=torch.long),
                                  backend=backend)
    assert all(t.shape == (0,) for t in out)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "either group_ids"),
        ({"group_size": 4, "group_ids": torch.zeros(8, dtype=torch.long)}, ValueError, "not both"),
        ({"group_size": 3}, ValueError, "divisor"),
        ({"group_size": 0}, ValueError, "divisor"),
        ({"group_size": 2.0}, TypeError, "int"),
        ({"group_ids": torch.zeros(8)}, TypeError, "int64"),
        ({"group_ids": torch.zeros(7, dtype=torch.long)}, ValueError, r"shape \(N,\)"),
        ({"group_ids": torch.zeros(8, 1, dtype=torch.long)}, ValueError, r"shape \(N,\)"),
        ({"group_ids": [0] * 8}, TypeError, "torch.Tensor"),
        ({"group_size": 4, "estimator": "ppo"}, ValueError, "estimator"),
        ({"group_size": 4, "estimator": "opo"}, ValueError, "lengths"),
        ({"group_size": 4, "lengths": torch.ones(8)}, ValueError, "only applies to"),
        ({"group_size": 4, "estimator": "unlikely"}, ValueError, "old_logprobs"),
        ({"group_size": 4, "estimator": "xrpo", "old_logprobs": torch.zeros(8, 2),
          "mask": torch.ones(8, 2)}, ValueError, "lam"),
        ({"group_size": 4, "estimator": "rloo", "std_scope": "batch"}, ValueError, "batch"),
        ({"group_size": 4, "std": "population"}, ValueError, "std"),
        ({"group_size": 4, "singleton": "drop"}, ValueError, "singleton"),
        ({"group_size": 4, "nan_policy": "ignore"}, ValueError, "nan_policy"),
        ({"group_size": 4, "eps": -1.0}, ValueError, "eps"),
        ({"group_size": 4, "kappa": 0.1}, ValueError, "kappa"),
        ({"group_size": 4, "mask": torch.ones(7, 3)}, ValueError, "mask"),
        ({"group_size": 4, "backend": "mps"}, ValueError, "backend"),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        rlkern.group_advantages(torch.rand(8), **kwargs)


def test_bad_scores():
    with pytest.raises(TypeError, match="scores"):
        rlkern.group_advantages(torch.ones(8, dtype=torch.long), group_size=4)
    with pytest.raises(TypeError, match="scores"):
        rlkern.group_advantages([1.0, 2.0], group_size=1)
    with pytest.raises(ValueError, match="mask"):
        rlkern.group_advantages(torch.rand(8, 3), group_size=4)
    with pytest.raises(ValueError, match="shape"):
        rlkern.group_advantages(torch.rand(2, 2, 2), group_size=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("layout", [{"group_size": 4}, {"group_ids": torch.arange(8) % 3}])
def test_nan_raise_names_the_row(backend, bad, layout):
    scores = torch.rand(8)
    scores[5] = bad
    with pytest.raises(ValueError, match="row 5"):
        rlkern.group_advantages(scores, backend=backend, **layout)


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_lengths_rejected(backend):
    with pytest.raises(ValueError, match="lengths"):
        rlkern.group_advantages(torch.rand(4), group_size=2, estimator="opo",
                                lengths=torch.tensor([1, -2, 3, 4]), backend=backend)


def _float64_grpo(scores: torch.Tensor, ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO in float64 by scatter (the large-batch truth; the reference loops over groups)."""
    _, inv, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    x = scores.double()
    c = counts.double()
    mean = torch.zeros_like(c).index_add_(0, inv, x) / c
    d = x - mean[inv]
    var = torch.zeros_like(c).index_add_(0, inv, d * d) / (c - 1).clamp_min(1)
    scale = torch.where(c > 1, 1.0 / (var.sqrt() + eps), 0.0)
    return d * scale[inv]


@pytest.mark.parametrize("n", [2**15 + 3, 2**17 + 5])
@pytest.mark.parametrize("pattern", ["distinct", "pairs", "adjacent", "with_int64_min",
                                     "narrow_prefix"])
def test_hashed_ids_number_like_dense_ids(n, pattern):
    """The ids path's hash numbering (linear probing, grown when there are more groups than
    n / 8; no key value reserved, INT64_MIN included) against dense ids of the same grouping:
    bitwise the same outputs, and GRPO within float32 of the float64 truth. "narrow_prefix":
    the first 64 rows' ids are small (the range pass runs, then finds the ids not dense).
    Sizes past 2^15 rows (the compact pass and records on two threads) and 2^17 (the numbering
    split over two tables)."""
    gen = torch.Generator().manual_seed(n)
    if pattern == "distinct":  # singletons: the table grows from n / 8 expected groups
        dense = torch.randperm(n, generator=gen)
    elif pattern == "pairs":
        dense = torch.randperm(n, generator=gen) // 2
    elif pattern == "adjacent":  # verl's layout before a shuffle: a prompt's rows together
        dense = torch.arange(n) // 8
    else:
        dense = torch.randint(0, n // 8, (n,), generator=gen)
    k = int(dense.max()) + 1
    keys = torch.randint(-(2**62), 2**62, (k,), generator=gen)
    if pattern == "with_int64_min":
        keys[int(dense[5])] = -(2**63)  # the table's old empty marker, as an id
    elif pattern == "narrow_prefix":
        keys[dense[:64]] = dense[:64]
    scores = torch.randn(n, generator=gen).float()
    hashed = rlkern.group_advantages(scores, group_ids=keys[dense])
    by_dense = rlkern.group_advantages(scores, group_ids=dense)
    for a, b in zip(hashed, by_dense, strict=True):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    torch.testing.assert_close(hashed.advantages.double(), _float64_grpo(scores, dense),
                               rtol=1e-5, atol=1e-5)


def _compact_option_cases():
    """(estimator, std, options) of the estimators centred on the group mean, every option
    they take: std_scope="batch" only for grpo (the others reject it), eps=0 only with a σ."""
    for estimator in ("grpo", "dr_grpo", "rloo", "gpg", "ngrpo"):
        for std in ("unbiased", "biased", "none"):
            for options in ({}, {"std_scope": "batch"}, {"singleton": "verl"}, {"eps": 0.0},
                            {"nan_policy": "omit"}):
                if "std_scope" in options and estimator != "grpo":
                    continue
                if "eps" in options and std == "none":
                    continue
                yield estimator, std, options


@pytest.mark.parametrize(("estimator", "std", "options"), list(_compact_option_cases()))
@pytest.mark.parametrize("size", [8, 1])
def test_ids_path_matches_contiguous_bitwise(estimator, std, options, size):
    """The ids path (hashed and dense ids: chunked moments, per-group records computed eight
    at a time, the compact row pass) against the contiguous path (groups summarised eight at a
    time in vector lanes, or one at a time) on the same groups, each group's rows in the same
    order: bitwise the same outputs, for every option of the estimators centred on the mean.
    Groups of 8 (zero-variance groups, NaN and ±inf rows under nan_policy="omit") and
    singletons."""
    k = 4099 if size == 8 else 30_011  # not a multiple of 8: the scalar tails too
    gen = torch.Generator().manual_seed(k + size)
    n = k * size
    scores = torch.randint(0, 4, (n,), generator=gen).float() * 0.3
    scores[: 8 * size] = 1.5  # zero-variance groups
    if options.get("nan_policy") == "omit":
        # NaN and ±inf: the ids path's vector filter drops every non-finite row
        u = torch.rand(n, generator=gen)
        scores[u < 0.05] = math.nan
        scores[(u >= 0.05) & (u < 0.07)] = math.inf
        scores[(u >= 0.07) & (u < 0.09)] = -math.inf
    contiguous = rlkern.group_advantages(scores, group_size=size, estimator=estimator, std=std,
                                         **options)
    # Row r of the ids layout is row j of group g, r = j·k + g: the groups interleave, each
    # keeping its rows' order (hence its sums' rounding).
    order = torch.arange(n).view(k, size).t().reshape(-1)
    keys = torch.randint(-(2**62), 2**62, (k,), generator=gen)
    # Dense ids from 0 and from −2^40 (id − min in 64 bits, then 32), then hashed ids.
    for ids in (order // size, order // size - 2**40, keys[order // size]):
        by_ids = rlkern.group_advantages(scores[order], group_ids=ids, estimator=estimator,
                                         std=std, **options)
        for a, b in zip(by_ids, contiguous, strict=True):
            assert torch.equal(a.view(torch.uint8), b[order].view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hash_table_reused_across_calls(dtype):
    """The numbering tables live across calls (one per thread) and are emptied lazily, through
    the list of slots the previous call filled, and grow or shrink with the batch. A sequence of
    calls whose sizes and group counts rise and fall, all drawing their ids from one pool (so
    that a call meets keys an earlier call numbered, in other groups and another order), each
    against dense ids of its grouping (bitwise): a slot left over from an earlier call would
    hand a key its old group number, merging two groups."""
    gen = torch.Generator().manual_seed(7)
    pool = torch.randint(-(2**63), 2**63 - 1, (2**18 + 1,), generator=gen)
    layouts = [(2**15 + 3, 1), (2**15 + 3, 8), (40, 8), (2**17 + 5, 2), (2**17 + 5, 8),
               (1000, 1), (2**15, 8), (3, 1), (2**18 + 1, 8), (70_000, 1), (70_000, 4)]
    for n, size in layouts:
        dense = torch.randperm(n, generator=gen) // size
        keys = pool[torch.randperm(pool.numel(), generator=gen)[: int(dense.max()) + 1]]
        scores = torch.randn(n, generator=gen).to(dtype)
        hashed = rlkern.group_advantages(scores, group_ids=keys[dense])
        by_dense = rlkern.group_advantages(scores, group_ids=dense)
        for a, b in zip(hashed, by_dense, strict=True):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (n, size)


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "opo"])
def test_large_batch_layouts_and_thread_counts(estimator):
    """2^20 + 37 shuffled rows (groups of ~8, singletons, zero-variance groups, NaN rows):
    the chunked moments and the compact row pass of the C++ ids path. Dense ids, arbitrary
    63-bit ids and sorted ids vs group_size give bitwise the same results, on 1 or 2 threads."""
    gen = torch.Generator().manual_seed(4)
    n = 2**20 + 37
    k = n // 8
    dense = torch.randint(0, k, (n,), generator=gen)  # uneven groups, some singletons
    dense[:8] = k  # one zero-variance group
    keys = torch.randint(-(2**62), 2**62, (k + 1,), generator=gen)
    scores = (torch.randn(n, generator=gen) * 100 + 1e4).float()
    scores[:8] = 3.0
    scores[9] = math.nan
    extra = estimator_inputs(estimator, n, gen)
    threads = torch.get_num_threads()
    outs = []
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            for ids in (dense, keys[dense]):
                outs.append(rlkern.group_advantages(scores, group_ids=ids, estimator=estimator,
                                                    nan_policy="omit", **extra))
    finally:
        torch.set_num_threads(threads)
    for out in outs[1:]:
        for a, b in zip(outs[0], out, strict=True):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    out = outs[0]
    assert float(out.advantages[9]) == 0.0
    assert torch.equal(out.advantages[:8], torch.zeros(8))
    assert torch.equal(out.group_mean[:8], torch.full((8,), 3.0))
    assert bool(out.zero_variance_mask[:8].all())
    if estimator == "grpo":
        valid = torch.isfinite(scores)
        want = _float64_grpo(scores[valid], dense[valid])
        torch.testing.assert_close(out.advantages[valid].double(), want, rtol=1e-5, atol=1e-5)
    # Sorted rows: ids and contiguous groups take different C++ paths, same arithmetic.
    m = n - n % 8
    sorted_scores = scores[:m].nan_to_num(0.0)
    extra = {key: v[:m] for key, v in extra.items()}
    by_size = rlkern.group_advantages(sorted_scores, group_size=8, estimator=estimator, **extra)
    by_ids = rlkern.group_advantages(sorted_scores, group_ids=torch.arange(m) // 8,
                                     estimator=estimator, **extra)
    for a, b in zip(by_size, by_ids, strict=True):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)
