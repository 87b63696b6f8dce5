"""Group advantages, GroupStats and the §2.1 helpers on the Triton backend
(kernels/advantages.py, kernels/token_advantages.py) against the float64 reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (the real kernel code,
executed by numpy); with CUDA the same tests run the compiled kernels on CUDA tensors. The
tolerances are those of the CPU tests (float32 outputs: 1e-5 relative and absolute). Sizes are
small because the interpreter is slow.
"""

from __future__ import annotations

import os

import torch

# The interpreter must be on before anything imports rlkern.kernels.advantages (conftest.py
# does the same; repeated so that the file also runs on its own).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math

import pytest

import rlkern
from advantages_cases import (
    ESTIMATORS,
    LAYOUTS,
    OUT_TOL,
    estimator_case,
    estimator_inputs,
    gigpo_inputs,
    make_layout,
    make_scores,
)
from conftest import stable_seed
from rlkern.reference.advantages import group_advantages_reference
from rlkern.reference.token_advantages import (
    discounted_returns_reference,
    empg_modulate_reference,
    gigpo_advantages_reference,
    gtpo_weights_reference,
    position_baseline_reference,
)

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = [
    # The interpreter evaluates lanes the kernels then discard with tl.where (an empty group's
    # 0/0 mean, σ of a singleton); numpy warns about those, harmlessly.
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
    pytest.mark.skipif(
        DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
        reason="Triton on CPU tensors needs TRITON_INTERPRET=1 before rlkern is imported",
    ),
]


def _dev(kwargs: dict) -> dict:
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def _check(scores, what="", **kwargs):
    out = rlkern.group_advantages(scores.to(DEVICE), backend="triton", **_dev(kwargs))
    ref = group_advantages_reference(scores.double(), **kwargs)
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    rtol, atol = OUT_TOL[dtype]
    assert out.advantages.dtype == dtype
    for field in ("advantages", "group_mean", "group_std"):
        torch.testing.assert_close(getattr(out, field).cpu().double(), ref[field], rtol=rtol,
                                   atol=atol, equal_nan=True,
                                   msg=lambda m, f=field: f"{what} {f}: {m}")
    assert torch.equal(out.zero_variance_mask.cpu(), ref["zero_variance_mask"]), what


def _layout(layout):
    return {k: v for k, v in layout.items() if k != "n"}


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("layout_kind", LAYOUTS)
def test_estimators(estimator, layout_kind):
    gen = torch.Generator().manual_seed(stable_seed(estimator, layout_kind))
    layout = make_layout(layout_kind, gen, n_groups=9)
    for kind in ("binary", "normal", "constant_groups"):
        scores = make_scores(layout["n"], kind, gen, layout).float()
        extra = estimator_inputs(estimator, layout["n"], gen)
        _check(scores, f"{layout_kind}/{kind} {estimator}", estimator=estimator,
               **_layout(layout), **extra)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_nan_omit_singleton_verl_and_std_modes(estimator):
    gen = torch.Generator().manual_seed(2)
    layout = make_layout("uneven", gen, n_groups=9)
    scores = make_scores(layout["n"], "integer", gen, layout)
    scores[::6] = math.nan
    extra = estimator_inputs(estimator, layout["n"], gen)
    singleton = "zero" if estimator == "grpo_passk" else "verl"
    for std in ("unbiased", "biased", "none"):
        _check(scores.float(), f"{estimator} {std}", estimator=estimator, nan_policy="omit",
               std=std, singleton=singleton, eps=1e-4, **_layout(layout), **extra)


@pytest.mark.parametrize("estimator", ["grpo", "unlikely", "xrpo"])
def test_batch_scope(estimator):
    case = estimator_case(3, estimator, "shuffled", n_groups=6)
    _check(case.scores, estimator=estimator, std_scope="batch", **case.layout, **case.extra)


def test_large_group_spans_several_blocks():
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 3, (300,), generator=gen) * 99991  # groups of ~100 rows
    scores = torch.randn(300, generator=gen)
    for estimator in ("grpo", "grpo_passk", "unlikely"):
        extra = estimator_inputs(estimator, 300, gen)
        _check(scores, estimator, estimator=estimator, group_ids=ids, **extra)


def test_float64_scores_and_token_rewards():
    gen = torch.Generator().manual_seed(5)
    layout = make_layout("uneven", gen, n_groups=8)
    scores = make_scores(layout["n"], "normal", gen, layout)
    _check(scores, "float64", **_layout(layout))
    rewards = torch.randn(16, 5, generator=gen)
    mask = torch.rand(16, 5, generator=gen) > 0.3
    _check(rewards, "token", group_size=4, mask=mask)


def test_errors_match_cpu():
    scores = torch.rand(8)
    scores[6] = math.nan
    with pytest.raises(ValueError, match="row 6"):
        rlkern.group_advantages(scores.to(DEVICE), group_size=4, backend="triton")
    with pytest.raises(ValueError, match="grpo_passk"):
        rlkern.group_advantages(torch.rand(3).to(DEVICE), group_ids=torch.tensor([1, 2, 2]).to(
            DEVICE), estimator="grpo_passk", singleton="verl", backend="triton")


# -------------------------------------------------------------------------------- helpers


@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (2, 1500)])  # 1500: two chunks of 1024
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_discounted_returns(shape, gamma):
    gen = torch.Generator().manual_seed(shape[1])
    rewards = torch.randn(shape, generator=gen)
    reset = torch.rand(shape, generator=gen) < 0.1
    for r in (None, reset):
        out = rlkern.discounted_returns(rewards.to(DEVICE), gamma=gamma,
                                        reset=None if r is None else r.to(DEVICE),
                                        backend="triton")
        ref = discounted_returns_reference(rewards.double(), gamma=gamma, reset=r)
        torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout_kind", ["contiguous", "uneven"])
def test_position_baseline_and_gtpo(layout_kind):
    gen = torch.Generator().manual_seed(6)
    layout = make_layout(layout_kind, gen, n_groups=5)
    n, t = layout.pop("n"), 300
    x = torch.rand(n, t, generator=gen) * 3
    mask = torch.rand(n, t, generator=gen) > 0.25
    out = rlkern.position_baseline(x.to(DEVICE), mask.to(DEVICE), backend="triton",
                                   **_dev(layout))
    ref = position_baseline_reference(x.double(), mask, **layout)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-5)
    w = rlkern.gtpo_weights(x.to(DEVICE), mask.to(DEVICE), backend="triton", **_dev(layout))
    ref_w, ref_inv = gtpo_weights_reference(x.double(), mask, **layout)
    torch.testing.assert_close(w.weight.cpu().double(), ref_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.inverse_weight.cpu().double(), ref_inv, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["mean_norm", "std_norm"])
def test_gigpo(mode):
    episode, step, keys, group = gigpo_inputs(7, 60, groups=4, group_stride=7919, states=5,
                                              key_stride=2**33)
    out = rlkern.gigpo_advantages(episode.to(DEVICE), step.to(DEVICE), keys.to(DEVICE),
                                  group_ids=group.to(DEVICE), omega=0.5, mode=mode,
                                  backend="triton")
    ref = gigpo_advantages_reference(episode.double(), step.double(), keys, group_ids=group,
                                     omega=0.5, mode=mode)
    for field in ("advantages", "episode_advantages", "step_advantages"):
        torch.testing.assert_close(getattr(out, field).cpu().double(), ref[field], rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("n", [1, 37, 3000])
def test_empg(n):
    gen = torch.Generator().manual_seed(n)
    adv = torch.randn(n, generator=gen)
    h = torch.rand(n, generator=gen) * 4
    hn = torch.roll(h, -1).clone()
    hn[::5] = math.nan
    out = rlkern.empg_modulate(adv.to(DEVICE), h.to(DEVICE), hn.to(DEVICE), backend="triton")
    ref = empg_modulate_reference(adv.double(), h.double(), hn.double())
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- GroupStats


@pytest.mark.parametrize("kwargs", [{}, {"estimator": "rloo", "singleton": "verl"},
                                    {"std_scope": "batch", "std": "biased"},
                                    {"estimator": "gpg"}, {"estimator": "ngrpo"}])
def test_group_stats_steps_on_triton(kwargs):
    """GroupStats' GPU steps (a batch's moments, Chan's merge, advantages from the moments) in
    the interpreter equal the CPU kernels'."""
    from rlkern.ops import group_stats

    gen = torch.Generator().manual_seed(8)
    ids = torch.randint(0, 7, (50,), generator=gen) * 31
    scores = torch.randn(50, generator=gen)
    scores[::13] = math.nan
    flags, _ = rlkern.AdvantageConfig(nan_policy="omit").kernel_args()
    halves = (slice(0, 25), slice(25, 50))
    tables = {}
    for backend in ("cpu", "triton"):
        parts = [group_stats._moments(backend, scores[h].to(DEVICE), ids[h].to(DEVICE), flags)
                 for h in halves]
        keys, moments = group_stats._merge_tables(backend, *parts[0], *parts[1])
        tables[backend] = (keys.cpu(), moments.cpu())
    assert torch.equal(tables["cpu"][0], tables["triton"][0])
    torch.testing.assert_close(tables["triton"][1], tables["cpu"][1], rtol=1e-12, atol=1e-12,
                               equal_nan=True)
    stats = rlkern.GroupStats(nan_policy="omit")
    stats.ids, stats.moments = tables["cpu"]
    want = stats.advantages(scores, ids, **kwargs)
    stats.ids, stats.moments = (t.to(DEVICE) for t in tables["cpu"])
    got = stats.advantages(scores.to(DEVICE), ids.to(DEVICE), backend="triton", **kwargs)
    for a, b in zip(got, want, strict=True):
        if b.dtype == torch.bool:
            assert torch.equal(a.cpu(), b)
        else:
            torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6, equal_nan=True)
