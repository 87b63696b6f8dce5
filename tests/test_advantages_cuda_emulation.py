"""The CUDA kernels of csrc/cuda/advantages.cu, executed on the CPU by tests/cuda_emu, against
the float64 reference.

The real ``.cu`` source is compiled by the host compiler with every CUDA thread run as a fiber
(warp shuffles, ballots and barriers emulated; see tests/cuda_emu/README.md). The launchers are
called through ctypes on the data pointers of CPU tensors, in the same pipeline the CUDA
backend uses (``rlkern.ops.advantages_segmented.run_segmented``: sort by group, segment pass,
batch constants, row pass). Skipped, with the reason, when no host C++ compiler is found.
"""

from __future__ import annotations

import math

import pytest
import torch

import advantages_cases
from advantages_cases import ESTIMATORS, OUT_TOL, estimator_inputs, make_layout, make_scores
from cuda_emu import EmulatedLibrary
from cuda_emu.testing import CSRC, F64, I64, INT, P, emulated
from cuda_emu.testing import ptr as _ptr
from rlkern.ops.advantages_segmented import run_gigpo, run_segmented
from rlkern.reference.advantages import group_advantages_reference, sequence_loglik
from rlkern.reference.token_advantages import (
    discounted_returns_reference,
    gigpo_advantages_reference,
)


class EmulatedKernels:
    """The launchers of advantages.cu behind the interface of rlkern.kernels.advantages."""

    def __init__(self, emu: EmulatedLibrary):
        self.emu = emu
        lib = emu.lib
        self.stats = lib.rlkern_group_segment_stats_cuda
        self.stats.argtypes = [P, INT, P, P, I64, I64, P, P, P, INT, INT, INT, INT, P, P, P, P, P]
        self.stats.restype = INT
        self.finish = lib.rlkern_group_rows_finish_cuda
        self.finish.argtypes = [P, INT, P, P, P, I64, I64, P, P, P, P, INT, INT, INT, INT, P, P,
                                P, P, INT, P]
        self.finish.restype = INT
        self.returns = lib.rlkern_discounted_returns_cuda
        self.returns.argtypes = [P, INT, I64, I64, P, F64, P, P]
        self.returns.restype = INT

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
                    mean, std, zv, *, estimator, std_mode, batch_scope, singleton_verl):
        self.check(self.finish(
            _ptr(scores), int(scores.dtype == torch.float64), _ptr(xr), _ptr(loglik),
            _ptr(row_group), group_size, scores.numel(), _ptr(ms), _ptr(mx), _ptr(ext),
            _ptr(params), estimator, std_mode, int(batch_scope), int(singleton_verl), _ptr(adv),
            _ptr(mean), _ptr(std), _ptr(zv), int(adv.dtype == torch.float64), None))


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
    lam_value = (0.25 if lam is None else lam)
    ids = group_ids.to(torch.int64) if group_ids is not None else None
    run_segmented(kernels, s, ids, group_size or 0, weights, loglik, estimator, eps, std,
                  std_scope, singleton, r_max, lam_value, kappa or 0.0, adv, mean, sd,
                  zv.view(torch.int8))
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
    gen = torch.Generator().manual_seed(hash((estimator, layout_kind)) % 2**31)
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
    assert kernels.finish(_ptr(scores), 0, None, None, None, 4, 4, _ptr(ms), _ptr(ms), None,
                          _ptr(params), 42, 0, 0, 0, None, None, None, None, 0, None) == -2
