"""The GPU path of group advantages (Triton and CUDA C++): sort once, then two segmented passes.

1. Groups: arbitrary ids become dense group numbers with ``torch.unique`` and the rows are
   ordered group after group by a stable ``argsort`` (on a GPU both are CUB radix sorts); for
   ``unlikely`` the rows within a group are ordered by (log-likelihood, row) with a second
   stable sort, so the segment kernel reads each response's rank off its position. Contiguous
   groups need none of this.
2. ``segment_stats``: one program (CUDA: one warp) per group writes the group's moments and the
   estimator's extras.
3. Batch constants (σ_batch by Chan's merge in closed form, GPG's α, REINFORCE++'s whitening)
   are reduced from the K group summaries with torch ops, on the device, into the float64
   ``params`` tensor (the header's ``params`` layout: the config's hparams, then these) that
   the row kernel reads by pointer: no host synchronisation.
4. ``rows_finish``: the per-row formula of ``rlkern/group_stats.h``, given the op's ``flags``
   and the family's code tables (:func:`rlkern.config.advantages.codes`).

Every table here (moments, extras, params) is laid out as the header defines it and indexed by
name. The same decomposition serves ``GroupStats`` on GPUs (moments of a batch, advantages
from given moments, Chan's merge of two tables) and the §2.1 helpers that group rows (position
baseline, GTPO, GiGPO).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import NamedTuple

import torch
from torch import Tensor

from rlkern import backends
from rlkern.config.advantages import WHITEN_EPS, AdvantageConfig, codes


class Segments(NamedTuple):
    """Groups as segments: contiguous (``perm is None``) or rows ``perm[offsets[g]:offsets[g+1]]``
    for group ``g``, with ``row_group`` the dense group of each row and ``keys`` the sorted
    distinct ids (group ``g`` has id ``keys[g]``; ``None`` for contiguous groups)."""

    num_groups: int
    group_size: int
    perm: Tensor | None
    offsets: Tensor | None
    row_group: Tensor | None
    keys: Tensor | None = None


def segments(group_ids: Tensor | None, group_size: int, n: int,
             order_key: Tensor | None = None) -> Segments:
    """Segments of ``n`` rows; within a group rows are in row order, or by ``order_key`` (ties
    by row) when given."""
    if group_ids is None and order_key is None:
        return Segments(n // group_size if group_size else 0, group_size, None, None, None)
    keys = None
    if group_ids is None:
        device = order_key.device
        row_group = torch.arange(n, device=device) // group_size
        num_groups = n // group_size
    else:
        keys, row_group = torch.unique(group_ids, return_inverse=True)
        num_groups = keys.numel()
    if order_key is None:
        perm = torch.argsort(row_group, stable=True)
    else:
        first = torch.argsort(order_key, stable=True)
        perm = first[torch.argsort(row_group[first], stable=True)]
    counts = torch.bincount(row_group, minlength=num_groups)
    offsets = torch.zeros(num_groups + 1, dtype=torch.int64, device=row_group.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return Segments(num_groups, 0, perm, offsets, row_group, keys)


def kernels_for(backend: str, device: torch.device):
    """The launchers of ``backend`` ("triton" or "cuda") behind one interface: the Triton module
    ``rlkern.kernels.advantages`` or :class:`_CudaKernels`."""
    if backend == "triton":
        return backends.triton_module("advantages", device)
    if not backends.has_cuda_kernels():
        raise backends.BackendUnavailableError(
            "backend='cuda' needs rlkern._C built with the CUDA kernels (a CUDA toolkit and a "
            "CUDA build of torch at install time); backend='triton' runs on any GPU")
    return _CudaKernels()


class _CudaKernels:
    """The CUDA C++ kernels behind the launcher signatures of ``rlkern.kernels.advantages``."""

    @staticmethod
    def segment_stats(scores, perm, offsets, group_size, num_groups, weights, loglik, ms, mx,
                      ext, xr, params, *, unlikely, weighted, with_loglik, top):
        backends.cpp_ops().group_segment_stats_out(
            scores, perm, offsets, group_size, num_groups, weights, loglik, params, unlikely,
            weighted, with_loglik, top, ms, mx if unlikely else None,
            ext if (weighted or with_loglik or top) else None, xr if unlikely else None)

    @staticmethod
    def rows_finish(scores, xr, loglik, row_group, group_size, ms, mx, ext, params, adv, mean,
                    std, zv, *, flags, codes):
        backends.cpp_ops().group_rows_finish_out(
            scores, xr, loglik, row_group, group_size, ms, mx, ext, params, flags, adv, mean,
            std, zv.view(torch.bool))

    @staticmethod
    def moments_merge(a, b, out):
        backends.cpp_ops().group_moments_merge_out(a, b, out)


def device_params(hparams: list[float], device: torch.device) -> Tensor:
    """The float64 ``params`` of the GPU passes: the op's hparams, then the batch-level
    constants (0 until :func:`_batch_constants` sets the ones the estimator reads)."""
    batch = [0.0] * (len(codes().params) - len(hparams))
    return torch.tensor([*hparams, *batch], dtype=torch.float64, device=device)


def _batch_sigma(moments: Tensor, biased: bool) -> Tensor:
    """σ of all the valid rows of the K groups of ``moments``, on the device: Chan's merge in
    closed form, M2 = Σ_g M2_g + Σ_g n_g (mean_g − mean)²; 0 below two rows."""
    m = codes().moments
    n, mean, m2 = moments[:, m.count], moments[:, m.mean], moments[:, m.m2]
    rows = n.sum()
    has = n > 0
    mu = torch.where(has, n * mean, 0.0).sum() / rows.clamp_min(1.0)
    spread = torch.where(has, m2 + n * (mean - mu) ** 2, 0.0).sum()
    sigma = torch.sqrt(spread / (rows if biased else rows - 1).clamp_min(1.0))
    return torch.where(rows >= 2, sigma, 0.0)


def _batch_constants(params: Tensor, scores: Tensor, mx: Tensor, ext: Tensor | None,
                     flags: list[int], c: SimpleNamespace) -> None:
    """Set the batch-level entries of ``params`` that the options of ``flags`` read (σ_batch,
    GPG's α, REINFORCE++'s whitening mean and rsqrt), on the device."""
    f, p, est = c.flags, c.params, flags[c.flags.estimator]
    if flags[f.std_scope] == c.std_scope.batch:
        params[p.batch_std] = _batch_sigma(mx, flags[f.std] == c.std.biased)
    if est == c.estimator.gpg:
        valid = torch.isfinite(scores)
        nonzero = (valid & (scores != 0)).sum()
        params[p.gpg_alpha] = valid.sum().double() / nonzero.clamp_min(1).double()
    if est == c.estimator.reinforce_pp_baseline:
        n, mean = mx[:, c.moments.count], mx[:, c.moments.mean]
        verl = flags[f.singleton] == c.singleton.verl
        active = (n >= 2) | ((n == 1) & verl)
        shift = torch.where(n < 2, mean, 0.0)  # μ − b: b = μ, or 0 for a (verl) singleton
        wsum, wdev, wdev2 = (ext[:, getattr(c.extras, k)] for k in ("wsum", "wdev", "wdev2"))
        total = torch.where(active, wsum, 0.0).sum()
        s1 = torch.where(active, wdev + shift * wsum, 0.0).sum()
        s2 = torch.where(active, wdev2 + 2 * shift * wdev + shift * shift * wsum, 0.0).sum()
        mean_c = torch.where(total > 0, s1 / total.clamp_min(1e-300), 0.0)
        var = torch.where(total > 1, (s2 - total * mean_c * mean_c).clamp_min(0.0)
                          / (total - 1).clamp_min(1e-300), 0.0)
        params[p.white_mean] = mean_c
        params[p.white_rstd] = torch.rsqrt(var + WHITEN_EPS)


def check_finite_scores(scores: Tensor, nan_policy_omit: bool) -> None:
    """The data check the compiled CPU kernels make themselves (the GPU passes do not)."""
    if not nan_policy_omit and scores.numel():
        bad = ~torch.isfinite(scores)
        if bool(bad.any()):
            row = int(bad.nonzero()[0])
            raise ValueError(f"scores: row {row} is NaN or infinite (nan_policy='raise'; "
                             "nan_policy='omit' leaves such rows out of their group's statistics "
                             "and gives them an advantage of 0)")


def _check_passk_singletons(scores: Tensor, ms: Tensor, seg: Segments) -> None:
    row_group = seg.row_group
    if row_group is None:
        row_group = torch.arange(scores.numel(), device=scores.device) // seg.group_size
    bad = (ms[row_group, codes().moments.count] == 1) & torch.isfinite(scores)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise ValueError(f"grpo_passk: the group of row {row} has a single valid response; "
                         "pass@k needs at least 2 (verl raises too; singleton='zero' gives such "
                         "groups 0)")


def group_advantages_segmented(backend: str, scores: Tensor, group_ids: Tensor | None,
                               group_size: int, weights: Tensor | None, loglik: Tensor | None,
                               flags: list[int], hparams: list[float],
                               outs: tuple[Tensor, Tensor, Tensor, Tensor]) -> None:
    """Fill the outputs of ``rlkern::group_advantages`` with the Triton or CUDA kernels."""
    c = codes()
    check_finite_scores(scores, flags[c.flags.nan_policy] == c.nan_policy.omit)
    run_segmented(kernels_for(backend, scores.device), scores, group_ids, group_size, weights,
                  loglik, flags, hparams, *outs)


def run_segmented(
    kernels, scores: Tensor, group_ids: Tensor | None, group_size: int, weights: Tensor | None,
    loglik: Tensor | None, flags: list[int], hparams: list[float], adv: Tensor, mean: Tensor,
    sd: Tensor, zv: Tensor,
) -> None:
    """The pipeline over any object with the ``segment_stats`` / ``rows_finish`` launchers of
    ``rlkern.kernels.advantages`` (the Triton module, the CUDA ops, or a test's emulator)."""
    c = codes()
    n = scores.numel()
    est = flags[c.flags.estimator]
    unlikely = est == c.estimator.unlikely
    seg = segments(group_ids, group_size, n, loglik if unlikely else None)
    k = seg.num_groups
    f64 = {"dtype": torch.float64, "device": scores.device}
    weighted = est in (c.estimator.opo, c.estimator.reinforce_pp_baseline)
    with_loglik = est == c.estimator.xrpo
    top = est == c.estimator.grpo_passk
    extras = weighted or with_loglik or top
    ms = torch.empty(k, len(c.moments), **f64)
    mx = torch.empty(k, len(c.moments), **f64) if unlikely else ms
    ext = torch.empty(k if extras else 1, len(c.extras), **f64)
    xr = torch.empty(n if unlikely else 1, **f64)
    params = device_params(hparams, scores.device)
    kernels.segment_stats(scores, seg.perm, seg.offsets, seg.group_size, k, weights, loglik, ms,
                          mx, ext, xr, params, unlikely=unlikely, weighted=weighted,
                          with_loglik=with_loglik, top=top)
    if top and flags[c.flags.singleton] == c.singleton.verl:
        _check_passk_singletons(scores, ms, seg)
    _batch_constants(params, scores, mx, ext, flags, c)
    row_group = None if seg.perm is None else seg.row_group
    kernels.rows_finish(scores, xr if unlikely else None, loglik, row_group, seg.group_size, ms,
                        mx, ext if extras else None, params, adv, mean, sd, zv.view(torch.int8),
                        flags=flags, codes=c)


# ---------------------------------------------------------------------------------------------
# GroupStats on GPUs: the same two passes, with the moments kept between them


def group_moments_segmented(kernels, scores: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted distinct ids (K,) and the moments (K, len(moments)) of their valid scores."""
    seg = segments(group_ids, 0, scores.numel())
    ms = torch.empty(seg.num_groups, len(codes().moments), dtype=torch.float64,
                     device=scores.device)
    params = device_params(AdvantageConfig().kernel_args()[1], scores.device)
    kernels.segment_stats(scores, seg.perm, seg.offsets, 0, seg.num_groups, None, None, ms, ms,
                          ms, ms, params, unlikely=False, weighted=False, with_loglik=False,
                          top=False)
    return seg.keys, ms


def finish_from_moments(kernels, scores: Tensor, row_group: Tensor, moments: Tensor,
                        flags: list[int], hparams: list[float],
                        outs: tuple[Tensor, Tensor, Tensor, Tensor]) -> None:
    """Advantages of ``scores`` whose group ``row_group[i]`` has the given ``moments``
    (streaming estimators; σ_batch merges every group, GPG's α counts the given rows)."""
    c = codes()
    check_finite_scores(scores, flags[c.flags.nan_policy] == c.nan_policy.omit)
    params = device_params(hparams, scores.device)
    _batch_constants(params, scores, moments, None, flags, c)
    adv, mean, sd, zv = outs
    kernels.rows_finish(scores, None, None, row_group, 0, moments, moments, None, params, adv,
                        mean, sd, zv.view(torch.int8), flags=flags, codes=c)


# ---------------------------------------------------------------------------------------------
# GiGPO


def gigpo_segmented(backend: str, episode_returns: Tensor, step_returns: Tensor,
                    state_keys: Tensor, group_ids: Tensor, outs: tuple[Tensor, Tensor, Tensor],
                    *, omega: float, episode_std: bool, step_std: bool, eps: float) -> None:
    """GiGPO with the group kernels: grpo (singleton 0) within prompt groups and within step
    groups, then A = A_episode + ω·A_step."""
    run_gigpo(kernels_for(backend, episode_returns.device), episode_returns, step_returns,
              state_keys, group_ids, outs, omega=omega, episode_std=episode_std,
              step_std=step_std, eps=eps)


def run_gigpo(kernels, episode_returns: Tensor, step_returns: Tensor, state_keys: Tensor,
              group_ids: Tensor, outs: tuple[Tensor, Tensor, Tensor], *, omega: float,
              episode_std: bool, step_std: bool, eps: float) -> None:
    """GiGPO over any launcher object (see :func:`run_segmented`)."""
    adv, adv_ep, adv_st = outs
    n = episode_returns.numel()
    pairs = torch.stack([group_ids, state_keys], dim=1)
    _, step_group = torch.unique(pairs, dim=0, return_inverse=True)
    for x, ids, out, divide in ((episode_returns, group_ids, adv_ep, episode_std),
                                (step_returns, step_group, adv_st, step_std)):
        flags, hparams = AdvantageConfig(std="unbiased" if divide else "none").kernel_args()
        hparams[codes().hparams.eps] = eps  # GiGPO's eps (any finite value) as it is
        seg = segments(ids, 0, n)
        ms = torch.empty(seg.num_groups, len(codes().moments), dtype=torch.float64,
                         device=x.device)
        params = device_params(hparams, x.device)
        kernels.segment_stats(x, seg.perm, seg.offsets, 0, seg.num_groups, None, None, ms, ms,
                              ms, ms, params, unlikely=False, weighted=False, with_loglik=False,
                              top=False)
        mean = torch.empty_like(out)
        sd = torch.empty_like(out)
        zv = torch.empty(n, dtype=torch.int8, device=x.device)
        kernels.rows_finish(x, None, None, seg.row_group, 0, ms, ms, None, params, out, mean, sd,
                            zv, flags=flags, codes=codes())
    torch.add(adv_ep, adv_st, alpha=omega, out=adv)
