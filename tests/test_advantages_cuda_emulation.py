"""The CUDA kernels of csrc/cuda/advantages.cu, executed on the CPU by tests/cuda_emu, against
the float64 reference.

The real ``.cu`` source is compiled by the host compiler with every CUDA thread run as a fiber
(warp shuffles, ballots and barriers emulated; see tests/cuda_emu/README.md). The launchers are
called through ctypes on the data pointers of CPU tensors, in the same pipeline the CUDA
backend uses (``rlkern.ops.advantages_segmented.run_segmented``: sort by group, segment pass,
batch constants, row pass). Skipped, with the reason, when no host C++ compiler is found.
"""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

import advantages_cases
import rlkern
from advantages_cases import ESTIMATORS, OUT_TOL, estimator_inputs, make_layout, make_scores
from conftest import stable_seed
from cuda_emu import EmulatedLibrary
from cuda_emu.testing import CSRC, F64, I32, I64, INT, P, emulated
from cuda_emu.testing import ptr as _ptr
from rlkern.config.advantages import AdvantageConfig, codes, sequence_loglik
from rlkern.ops.advantages_segmented import run_gigpo, run_segmented
from rlkern.reference.advantages import group_advantages_reference
from rlkern.reference.token_advantages import (
    discounted_returns_reference,
    gae_reference,
    gigpo_advantages_reference,
)


def _flags(flags) -> ctypes.Array:
    """The launcher's host array of int32 option codes."""
    return (I32 * len(flags))(*flags)


class EmulatedKernels:
    """The launchers of advantages.cu behind the interface of rlkern.kernels.advantages."""

    def __init__(self, emu: EmulatedLibrary):
        self.emu = emu
        lib = emu.lib
        self.stats = lib.rlkern_group_segment_stats_cuda
        self.stats.argtypes = [P, INT, P, P, I64, I64, P, P, P, INT, INT, INT, INT, P, P, P, P, P]
        self.stats.restype = INT
        self.finish = lib.rlkern_group_rows_finish_cuda
        self.finish.argtypes = [P, INT, P, P, P, I64, I64, P, P, P, P, P, P, P, P, P, INT, P]
        self.finish.restype = INT
        self.returns = lib.rlkern_discounted_returns_cuda
        self.returns.argtypes = [P, INT, I64, I64, P, F64, P, P]
        self.returns.restype = INT
        self.gae = lib.rlkern_gae_cuda
        self.gae.argtypes = [P, P, INT, I64, I64, P, F64, F64, P, P, P]
        self.gae.restype = INT
        self.merge = lib.rlkern_group_moments_merge_cuda
        self.merge.argtypes = [P, P, P, I64, P]
        self.merge.restype = INT

    def check(self, rc: int) -> None:
        assert rc == 0, f"rc={rc}: {self.emu.last_error()}"

    def segment_stats(self, scores, perm, offsets, group_size, num_groups, weights, loglik, ms,
                      mx, ext, xr, params, *, unlikely, weighted, with_loglik, top):
        self.check(self.stats(
            _ptr(scores), int(scores.dtype == torch.float64), _ptr(perm), _ptr(offsets),
            group_size, num_groups, _ptr(weights), _ptr(loglik), _ptr(params), int(unlikely),
            int(weighted), int(with_loglik), int(top), _ptr(ms), _ptr(mx), _ptr(ext), _ptr(xr),
            None))

    def rows_finish(self, scores, xr, loglik, row_group, group_size, ms, mx, ext, params, adv,
                    mean, std, zv, *, flags, codes):
        self.check(self.finish(
            _ptr(scores), int(scores.dtype == torch.float64), _ptr(xr), _ptr(loglik),
            _ptr(row_group), group_size, scores.numel(), _ptr(ms), _ptr(mx), _ptr(ext),
            _ptr(params), _flags(flags), _ptr(adv), _ptr(mean), _ptr(std), _ptr(zv),
            int(adv.dtype == torch.float64), None))


@pytest.fixture(scope="module")
def kernels() -> EmulatedKernels:
    return EmulatedKernels(emulated(CSRC / "cuda" / "advantages.cu"))


def _run(kernels, scores, *, estimator="grpo", group_ids=None, group_size=None, eps=1e-6,
         std="unbiased", std_scope="group", singleton="zero", nan_policy="raise", mask=None,
         lengths=None, old_logprobs=None, r_max=1.0, lam=None, kappa=None):
    """The CUDA backend's pipeline (rlkern.ops.advantages.group_advantages_op) on the emulator."""
    n = scores.shape[0]
    s = scores.sum(-1, dtype=torch.float64) if scores.dim() == 2 else scores.contiguous()
    weights = None
    if estimator == "opo":
        weights = lengths.double()
    elif estimator == "reinforce_pp_baseline" and mask is not None:
        weights = mask.double().sum(-1)
    loglik = sequence_loglik(old_logprobs, mask) if old_logprobs is not None else None
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    adv, mean, sd = (torch.empty(n, dtype=dtype) for _ in range(3))
    zv = torch.empty(n, dtype=torch.bool)
    config = AdvantageConfig(estimator=estimator, eps=eps, std=std, std_scope=std_scope,
                             singleton=singleton, nan_policy=nan_policy, r_max=r_max, lam=lam,
                             kappa=kappa)
    ids = group_ids.to(torch.int64) if group_ids is not None else None
    run_segmented(kernels, s, ids, group_size or 0, weights, loglik, *config.kernel_args(), adv,
                  mean, sd, zv.view(torch.int8))
    if mask is not None:
        adv = adv.unsqueeze(-1) * mask.to(dtype)
    return adv, mean, sd, zv


def _check(kernels, scores, what="", **kwargs):
    adv, mean, sd, zv = _run(kernels, scores, **kwargs)
    ref = group_advantages_reference(scores.double(), **kwargs)
    rtol, atol = OUT_TOL[torch.float64 if scores.dtype == torch.float64 else torch.float32]
    for got, key in ((adv, "advantages"), (mean, "group_mean"), (sd, "group_std")):
        torch.testing.assert_close(got.double(), ref[key], rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m, k=key: f"{what} {k}: {m}")
    assert torch.equal(zv, ref["zero_variance_mask"]), what


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("layout_kind", ["contiguous", "shuffled", "uneven", "contiguous_g1"])
def test_estimators(kernels, estimator, layout_kind):
    gen = torch.Generator().manual_seed(stable_seed(estimator, layout_kind))
    layout = make_layout(layout_kind, gen, n_groups=10)
    kw = {k: v for k, v in layout.items() if k != "n"}
    for kind in ("binary", "normal", "constant_groups"):
        scores = make_scores(layout["n"], kind, gen, layout).float()
        extra = estimator_inputs(estimator, layout["n"], gen)
        _check(kernels, scores, f"{layout_kind}/{kind} {estimator}", estimator=estimator, **kw,
               **extra)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_options_nan_omit_and_float64(kernels, estimator):
    gen = torch.Generator().manual_seed(9)
    layout = make_layout("uneven", gen, n_groups=10)
    kw = {k: v for k, v in layout.items() if k != "n"}
    scores = make_scores(layout["n"], "integer", gen, layout)
    scores[::5] = math.nan
    extra = estimator_inputs(estimator, layout["n"], gen)
    singleton = "zero" if estimator == "grpo_passk" else "verl"
    for std in ("unbiased", "biased", "none"):
        scope = "batch" if estimator in ("grpo", "unlikely", "xrpo") else "group"
        for dtype in (torch.float32, torch.float64):
            _check(kernels, scores.to(dtype), f"{estimator} {std} {dtype}", estimator=estimator,
                   nan_policy="omit", std=std, std_scope=scope, singleton=singleton, eps=1e-4,
                   **kw, **extra)


def test_large_groups_span_several_warp_chunks(kernels):
    gen = torch.Generator().manual_seed(10)
    ids = torch.randint(0, 3, (400,), generator=gen) * 7
    scores = torch.randn(400, generator=gen)
    scores[torch.randperm(400, generator=gen)[:5]] = scores.max()  # ties at the top
    for estimator in ("grpo", "grpo_passk", "unlikely", "opo"):
        extra = estimator_inputs(estimator, 400, gen)
        _check(kernels, scores, estimator, estimator=estimator, group_ids=ids, **extra)


def test_results_do_not_depend_on_scheduling(kernels):
    scores, layout, extra, _ = advantages_cases.estimator_case(11, "xrpo", n_groups=30)
    base = _run(kernels, scores, estimator="xrpo", group_ids=layout["group_ids"], **extra)
    for settings in ({"order": "reverse"}, {"order": "random", "seed": 3, "run_ahead": True},
                     {"workers": 1, "max_grid": (2, 1, 1)}):
        with kernels.emu.settings(**settings):
            again = _run(kernels, scores, estimator="xrpo", group_ids=layout["group_ids"],
                         **extra)
        for a, b in zip(base, again, strict=True):
            assert torch.equal(a, b), settings


def test_gigpo_pipeline(kernels):
    steps = 80
    episode, step, keys, group = advantages_cases.gigpo_inputs(12, steps, groups=5,
                                                               group_stride=31, states=4)
    outs = tuple(torch.empty(steps) for _ in range(3))
    run_gigpo(kernels, episode, step, keys, group, outs, omega=0.5, episode_std=True,
              step_std=False, eps=1e-6)
    ref = gigpo_advantages_reference(episode.double(), step.double(), keys, group_ids=group,
                                     omega=0.5, mode="std_norm", step_mode="mean_norm")
    for got, key in zip(outs, ("advantages", "episode_advantages", "step_advantages"),
                        strict=True):
        torch.testing.assert_close(got.double(), ref[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1), (3, 31), (5, 33), (2, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_discounted_returns(kernels, shape, dtype):
    gen = torch.Generator().manual_seed(shape[1])
    rewards = torch.randn(shape, generator=gen).to(dtype)
    reset = torch.rand(shape, generator=gen) < 0.15
    for r in (None, reset):
        out = torch.empty_like(rewards)
        kernels.check(kernels.returns(rewards.data_ptr(), int(dtype == torch.float64), shape[0],
                                      shape[1], _ptr(None if r is None else r.contiguous()), 0.9,
                                      out.data_ptr(), None))
        ref = discounted_returns_reference(rewards.double(), gamma=0.9, reset=r)
        rtol, atol = OUT_TOL[dtype]
        torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)


def test_invalid_arguments_are_reported(kernels):
    ms = torch.empty(1, 5, dtype=torch.float64)
    params = torch.zeros(8, dtype=torch.float64)
    scores = torch.zeros(4)
    # Contiguous groups need a positive group_size; a negative count is invalid.
    assert kernels.stats(_ptr(scores), 0, None, None, 0, 1, None, None, _ptr(params), 0, 0, 0, 0,
                         _ptr(ms), None, None, None, None) == -3
    assert kernels.stats(_ptr(scores), 0, None, None, 4, -1, None, None, _ptr(params), 0, 0, 0,
                         0, _ptr(ms), None, None, None, None) == -2
    flags, _ = AdvantageConfig().kernel_args()
    flags[codes().flags.estimator] = 42  # no such estimator
    assert kernels.finish(_ptr(scores), 0, None, None, None, 4, 4, _ptr(ms), _ptr(ms), None,
                          _ptr(params), _flags(flags), None, None, None, None, 0, None) == -2


def test_moments_merge_matches_cpu(kernels):
    """Chan's merge of two moments tables (GroupStats on GPUs) equals the CPU op's."""
    gen = torch.Generator().manual_seed(13)
    ids = torch.randint(0, 40, (300,), generator=gen)
    scores = torch.randn(300, generator=gen, dtype=torch.float64)
    scores[::9] = 2.5  # some groups of equal values
    halves = [rlkern.GroupStats().update(scores[rows], ids[rows])
              for rows in (torch.arange(0, 300, 2), torch.arange(1, 300, 2))]
    shared = torch.isin(halves[0].ids, halves[1].ids)
    a = halves[0].moments[shared].contiguous()
    b = halves[1].moments[torch.isin(halves[1].ids, halves[0].ids)].contiguous()
    b[::4] = a[::4]  # identical rows merge exactly
    b[1, 0] = 0.0  # an empty side
    b[1, 1:] = torch.tensor([math.nan, 0.0, math.inf, -math.inf], dtype=torch.float64)
    got = torch.empty_like(a)
    kernels.check(kernels.merge(a.data_ptr(), b.data_ptr(), got.data_ptr(), a.shape[0], None))
    want = torch.empty_like(a)
    torch.ops.rlkern.group_moments_merge_out(a, b, want)
    # The host compiler may contract a·b + c into an FMA where the emulator does not.
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    assert torch.equal(got[1], a[1])  # an empty side leaves the other as it is
    m = codes().moments  # equal halves: the mean exactly, twice the count and M2
    for col, factor in ((m.count, 2), (m.mean, 1), (m.m2, 2), (m.min, 1), (m.max, 1)):
        assert torch.equal(got[::4, col], factor * a[::4, col]), m(col).name


@pytest.mark.parametrize("options", [{}, {"estimator": "rloo", "singleton": "verl"},
                                     {"std_scope": "batch"}, {"estimator": "gpg"}])
def test_group_stats_steps(kernels, options):
    """GroupStats on the CUDA kernels (a batch's moments by the segment pass, advantages from
    given moments by the row pass) equals the CPU kernels."""
    from rlkern.ops import advantages_segmented as seg

    gen = torch.Generator().manual_seed(14)
    ids = torch.randint(0, 9, (70,), generator=gen) * 1001
    scores = torch.randn(70, generator=gen)
    stats = rlkern.GroupStats().update(scores, ids)
    keys, moments = seg.group_moments_segmented(kernels, scores, ids)
    assert torch.equal(keys, stats.ids)
    torch.testing.assert_close(moments, stats.moments, rtol=1e-12, atol=1e-12)
    flags, hparams = rlkern.AdvantageConfig(**options).kernel_args()
    outs = (torch.empty(70), torch.empty(70), torch.empty(70), torch.empty(70, dtype=torch.bool))
    row_group = torch.searchsorted(keys, ids)
    seg.finish_from_moments(kernels, scores, row_group, moments, flags, hparams, outs)
    want = stats.advantages(scores, ids, **options)
    for a, b in zip(outs, want, strict=True):
        if b.dtype == torch.bool:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("estimator", ["grpo", "ngrpo", "grpo_passk", "unlikely", "xrpo"])
def test_zero_variance_group_with_eps_zero_gives_exactly_zero(kernels, estimator):
    scores = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.5, 2.0])
    extra = estimator_inputs(estimator, 8, torch.Generator().manual_seed(1))
    adv, *_ = _run(kernels, scores, estimator=estimator, group_size=4, eps=0.0,
                   **({"r_max": 0.0} if estimator == "ngrpo" else {}), **extra)
    adv = adv if adv.dim() == 1 else adv[:, 0]
    assert torch.isfinite(adv).all(), adv
    assert torch.equal(adv[:4], torch.zeros(4))


@pytest.mark.parametrize("gamma", [0.5, 0.0])
def test_discounted_returns_no_return_flows_across_a_reset(kernels, gamma):
    # Long rows (several warp chunks): ±inf / NaN after a reset (or with γ = 0) stay there.
    t = 70
    gen = torch.Generator().manual_seed(4)
    rewards = torch.randn(3, t, generator=gen, dtype=torch.float64)
    reset = torch.zeros(3, t, dtype=torch.bool)
    for row, (pos, bad) in enumerate(((40, math.inf), (33, math.nan), (5, -math.inf))):
        reset[row, pos - 1] = True
        rewards[row, pos] = bad
    out = torch.empty_like(rewards)
    kernels.check(kernels.returns(rewards.data_ptr(), 1, 3, t, _ptr(reset), gamma,
                                  out.data_ptr(), None))
    ref = discounted_returns_reference(rewards, gamma=gamma, reset=reset)
    torch.testing.assert_close(out, ref, equal_nan=True)
    assert torch.isfinite(out[0, :40]).all() and torch.isfinite(out[1, :33]).all()


@pytest.mark.parametrize("shape", [(1, 1), (3, 31), (130, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("gamma", "lam"), [(0.99, 0.95), (1.0, 1.0), (0.0, 0.5)])
def test_gae(kernels, shape, dtype, gamma, lam):
    """One thread per row (130 rows: two blocks, the second partly idle); masks with holes and
    an all-masked row; values given or absent (V = 0)."""
    gen = torch.Generator().manual_seed(shape[0] + shape[1])
    rewards = torch.randn(shape, generator=gen).to(dtype)
    values = torch.randn(shape, generator=gen).to(dtype)
    mask = torch.rand(shape, generator=gen) < 0.7
    mask[shape[0] // 2] = False
    for v in (values, None):
        adv, ret = torch.empty_like(rewards), torch.empty_like(rewards)
        kernels.check(kernels.gae(rewards.data_ptr(), _ptr(v), int(dtype == torch.float64),
                                  shape[0], shape[1], _ptr(mask), gamma, lam, adv.data_ptr(),
                                  ret.data_ptr(), None))
        ref_adv, ref_ret = gae_reference(rewards.double(), None if v is None else v.double(),
                                         mask, gamma=gamma, lam=lam)
        rtol, atol = OUT_TOL[dtype]
        torch.testing.assert_close(adv.double(), ref_adv, rtol=rtol, atol=atol)
        torch.testing.assert_close(ret.double(), ref_ret, rtol=rtol, atol=atol)


def test_gae_launcher_rejects_bad_arguments(kernels):
    x = torch.zeros(2, 3)
    assert kernels.gae(x.data_ptr(), None, 0, -1, 3, None, 0.9, 0.9, x.data_ptr(),
                       x.data_ptr(), None) != 0
    assert kernels.gae(x.data_ptr(), None, 0, 2, 3, None, 0.9, 0.9, x.data_ptr(),
                       x.data_ptr(), None) != 0  # no mask
    assert kernels.gae(None, None, 0, 0, 3, None, 0.9, 0.9, None, None, None) == 0  # empty
