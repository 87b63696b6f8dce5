"""The GPU path of group advantages (Triton and CUDA C++): sort once, then two segmented passes.

1. Groups: arbitrary ids become dense group numbers with ``torch.unique`` and the rows are
   ordered group after group by a stable ``argsort`` (on a GPU both are CUB radix sorts); for
   ``unlikely`` the rows within a group are ordered by (log-likelihood, row) with a second
   stable sort, so the segment kernel reads each response's rank off its position. Contiguous
   groups need none of this.
2. ``segment_stats``: one program (CUDA: one warp) per group writes the group's moments and the
   estimator's extras.
3. Batch constants (σ_batch by Chan's merge in closed form, GPG's α, REINFORCE++'s whitening)
   are reduced from the K group summaries with torch ops, on the device, into a float64
   ``params`` tensor that the row kernel reads by pointer: no host synchronisation.
4. ``rows_finish``: the per-row formula of ``rlkern/group_stats.h``.

The same decomposition serves the §2.1 helpers that group rows (position baseline, GTPO,
GiGPO).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from rlkern import backends
from rlkern.reference.advantages import merge_all

EST_CODES = {"grpo": 0, "dr_grpo": 1, "rloo": 2, "reinforce_pp_baseline": 3, "opo": 4, "gpg": 5,
             "grpo_passk": 6, "ngrpo": 7, "unlikely": 8, "xrpo": 9}
STD_CODES = {"unbiased": 0, "biased": 1, "none": 2}
WHITEN_EPS = 1e-8


class Segments(NamedTuple):
    """Groups as segments: contiguous (``perm is None``) or rows ``perm[offsets[g]:offsets[g+1]]``
    for group ``g``, with ``row_group`` the dense group of each row."""

    num_groups: int
    group_size: int
    perm: Tensor | None
    offsets: Tensor | None
    row_group: Tensor | None


def segments(group_ids: Tensor | None, group_size: int, n: int,
             order_key: Tensor | None = None) -> Segments:
    """Segments of ``n`` rows; within a group rows are in row order, or by ``order_key`` (ties
    by row) when given."""
    if group_ids is None and order_key is None:
        return Segments(n // group_size if group_size else 0, group_size, None, None, None)
    if group_ids is None:
        device = order_key.device
        row_group = torch.arange(n, device=device) // group_size
        num_groups = n // group_size
    else:
        _, row_group = torch.unique(group_ids, return_inverse=True)
        num_groups = int(row_group.max()) + 1 if n else 0
    if order_key is None:
        perm = torch.argsort(row_group, stable=True)
    else:
        first = torch.argsort(order_key, stable=True)
        perm = first[torch.argsort(row_group[first], stable=True)]
    counts = torch.bincount(row_group, minlength=num_groups)
    offsets = torch.zeros(num_groups + 1, dtype=torch.int64, device=row_group.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return Segments(num_groups, 0, perm, offsets, row_group)


def _kernels(backend: str, device: torch.device):
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
                    std, zv, *, estimator, std_mode, batch_scope, singleton_verl):
        backends.cpp_ops().group_rows_finish_out(
            scores, xr, loglik, row_group, group_size, ms, mx, ext, params, estimator, std_mode,
            batch_scope, singleton_verl, adv, mean, std, zv.view(torch.bool))


def _batch_constants(params: Tensor, scores: Tensor, mx: Tensor, ext: Tensor, estimator: str,
                     std: str, std_scope: str, singleton: str) -> None:
    """Fill params[4:8] (σ_batch, α, whitening mean, whitening rsqrt) on the device."""
    if std_scope == "batch":
        total = merge_all(mx)
        denom = total[0] if std == "biased" else total[0] - 1
        sigma = torch.sqrt(total[2] / denom.clamp_min(1.0))
        params[4] = torch.where(total[0] >= 2, sigma, 0.0)
    if estimator == "gpg":
        valid = torch.isfinite(scores)
        nonzero = (valid & (scores != 0)).sum()
        params[5] = valid.sum().double() / nonzero.clamp_min(1).double()
    if estimator == "reinforce_pp_baseline":
        n, mean = mx[:, 0], mx[:, 1]
        active = (n >= 2) | ((n == 1) & (singleton == "verl"))
        shift = torch.where(n < 2, mean, 0.0)  # μ − b: b = μ, or 0 for a (verl) singleton
        wsum, wdev, wdev2 = ext[:, 0], ext[:, 1], ext[:, 2]
        total = torch.where(active, wsum, 0.0).sum()
        s1 = torch.where(active, wdev + shift * wsum, 0.0).sum()
        s2 = torch.where(active, wdev2 + 2 * shift * wdev + shift * shift * wsum, 0.0).sum()
        mean_c = torch.where(total > 0, s1 / total.clamp_min(1e-300), 0.0)
        var = torch.where(total > 1, (s2 - total * mean_c * mean_c).clamp_min(0.0)
                          / (total - 1).clamp_min(1e-300), 0.0)
        params[6] = mean_c
        params[7] = torch.rsqrt(var + WHITEN_EPS)


def _check_passk_singletons(scores: Tensor, ms: Tensor, seg: Segments) -> None:
    row_group = seg.row_group
    if row_group is None:
        row_group = torch.arange(scores.numel(), device=scores.device) // seg.group_size
    bad = (ms[row_group, 0] == 1) & torch.isfinite(scores)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise ValueError(f"grpo_passk: the group of row {row} has a single valid response; "
                         "pass@k needs at least 2 (verl raises too; singleton='zero' gives such "
                         "groups 0)")


def group_advantages_segmented(
    backend: str, scores: Tensor, group_ids: Tensor | None, group_size: int,
    weights: Tensor | None, loglik: Tensor | None, estimator: str, eps: float, std: str,
    std_scope: str, singleton: str, nan_policy: str, r_max: float, lam: float, kappa: float,
    adv: Tensor, mean: Tensor, sd: Tensor, zv: Tensor,
) -> None:
    """Fill the outputs of ``rlkern::group_advantages`` with the Triton or CUDA kernels."""
    run_segmented(_kernels(backend, scores.device), scores, group_ids, group_size, weights,
                  loglik, estimator, eps, std, std_scope, singleton, r_max, lam, kappa, adv,
                  mean, sd, zv)


def run_segmented(
    kernels, scores: Tensor, group_ids: Tensor | None, group_size: int, weights: Tensor | None,
    loglik: Tensor | None, estimator: str, eps: float, std: str, std_scope: str, singleton: str,
    r_max: float, lam: float, kappa: float, adv: Tensor, mean: Tensor, sd: Tensor, zv: Tensor,
) -> None:
    """The pipeline over any object with the ``segment_stats`` / ``rows_finish`` launchers of
    ``rlkern.kernels.advantages`` (the Triton module, the CUDA ops, or a test's emulator)."""
    n = scores.numel()
    device = scores.device
    unlikely = estimator == "unlikely"
    seg = segments(group_ids, group_size, n, loglik if unlikely else None)
    k = seg.num_groups
    f64 = {"dtype": torch.float64, "device": device}
    weighted = estimator in ("opo", "reinforce_pp_baseline")
    with_loglik = estimator == "xrpo"
    top = estimator == "grpo_passk"
    extras = weighted or with_loglik or top
    ms = torch.empty(k, 5, **f64)
    mx = torch.empty(k, 5, **f64) if unlikely else ms
    ext = torch.empty(k if extras else 1, 7, **f64)
    xr = torch.empty(n if unlikely else 1, **f64)
    params = torch.tensor([eps, r_max, lam, kappa, 0.0, 1.0, 0.0, 1.0], **f64)
    kernels.segment_stats(scores, seg.perm, seg.offsets, seg.group_size, k, weights, loglik, ms,
                          mx, ext, xr, params, unlikely=unlikely, weighted=weighted,
                          with_loglik=with_loglik, top=top)
    if estimator == "grpo_passk" and singleton == "verl":
        _check_passk_singletons(scores, ms, seg)
    _batch_constants(params, scores, mx, ext, estimator, std, std_scope, singleton)
    row_group = None if seg.perm is None else seg.row_group
    kernels.rows_finish(scores, xr if unlikely else None, loglik, row_group, seg.group_size, ms,
                        mx, ext if extras else None, params, adv, mean, sd, zv.view(torch.int8),
                        estimator=EST_CODES[estimator], std_mode=STD_CODES[std],
                        batch_scope=std_scope == "batch", singleton_verl=singleton == "verl")


def gigpo_segmented(backend: str, episode_returns: Tensor, step_returns: Tensor,
                    state_keys: Tensor, group_ids: Tensor, outs: tuple[Tensor, Tensor, Tensor],
                    *, omega: float, episode_std: bool, step_std: bool, eps: float) -> None:
    """GiGPO with the group kernels: grpo (singleton 0) within prompt groups and within step
    groups, then A = A_episode + ω·A_step."""
    run_gigpo(_kernels(backend, episode_returns.device), episode_returns, step_returns,
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
        seg = segments(ids, 0, n)
        ms = torch.empty(seg.num_groups, 5, dtype=torch.float64, device=x.device)
        params = torch.tensor([eps, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0], dtype=torch.float64,
                              device=x.device)
        kernels.segment_stats(x, seg.perm, seg.offsets, 0, seg.num_groups, None, None, ms, ms,
                              ms, ms, params, unlikely=False, weighted=False, with_loglik=False,
                              top=False)
        mean = torch.empty_like(out)
        sd = torch.empty_like(out)
        zv = torch.empty(n, dtype=torch.int8, device=x.device)
        kernels.rows_finish(x, None, None, seg.row_group, 0, ms, ms, None, params, out, mean, sd,
                            zv, estimator=EST_CODES["grpo"],
                            std_mode=STD_CODES["unbiased" if divide else "none"],
                            batch_scope=False, singleton_verl=False)
    torch.add(adv_ep, adv_st, alpha=omega, out=adv)
