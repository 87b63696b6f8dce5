"""Streaming group statistics for micro-group sampling (ALGORITHMS.md §2, §5).

When the G responses of a prompt are generated in micro-groups, each micro-group's scores are
folded into per-group ``(n, mean, M2)`` as they arrive, and partial statistics from different
workers merge with Chan's formula; the advantages computed from the merged statistics equal the
one-shot :func:`rlkern.group_advantages` result to float32 rounding.

The moments are kept in float64, with ``min`` and ``max`` as well: they make a group whose
scores are all equal exactly zero-variance after any sequence of merges (Chan's update of the
mean is exact only when the means are equal, and min == max says so). The columns are the
header's moments table (``rlkern.config.advantages.codes().moments``).

Each step runs on the kernels of the tensors' backend (``backend="auto"`` for the moments and
the merges): the C++ ops ``group_moments_out``, ``group_moments_merge_out`` and
``group_finish_out`` on CPU, the segmented kernels of :mod:`rlkern.ops.advantages_segmented`
(Triton or CUDA) on GPUs, and the float64 reference for ``backend="torch"``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlkern import backends
from rlkern.config.advantages import NAN_POLICIES, STREAMING_ESTIMATORS, AdvantageConfig, codes
from rlkern.config.dtypes import FLOAT_DTYPES, acc_dtype
from rlkern.ops import advantages_segmented as segmented
from rlkern.ops.advantages import GroupAdvantages, check_grouping, check_tensor

__all__ = ["STREAMING_ESTIMATORS", "GroupStats"]


def _scores_1d(scores: object, n: int | None = None) -> Tensor:
    s = check_tensor(scores, "scores")
    if s.dtype not in FLOAT_DTYPES:
        raise TypeError(f"scores must be bfloat16, float16, float32 or float64, got {s.dtype}")
    if s.dim() != 1 or (n is not None and s.shape[0] != n):
        raise ValueError(f"scores must have shape (N,), got {tuple(s.shape)}")
    s = s if s.dtype in (torch.float32, torch.float64) else s.float()
    return s.detach().contiguous()  # not differentiable: outputs never require grad


# ---------------------------------------------------------------------------------------------
# The three steps, one kernel call per backend


def _moments(backend: str, scores: Tensor, ids: Tensor, flags: list[int]) -> tuple[Tensor, Tensor]:
    """Sorted distinct ids (K,) and their moments (K, NM) over one batch of scores."""
    if backend == "cpu":
        n = scores.numel()
        keys = torch.empty(n, dtype=torch.int64)
        moments = torch.empty(n, len(codes().moments), dtype=torch.float64)
        count = torch.empty(1, dtype=torch.int64)
        backends.cpp_ops().group_moments_out(scores, ids, 0, flags, keys, moments, count)
        k = int(count)
        order = torch.argsort(keys[:k])  # the kernel numbers groups by first appearance
        return keys[:k][order], moments[:k][order]
    c = codes()
    segmented.check_finite_scores(scores, flags[c.flags.nan_policy] == c.nan_policy.omit)
    if backend == "torch":
        from rlkern.reference.advantages import group_moments_reference

        keys, moments = group_moments_reference(scores, ids)
        return keys.to(scores.device), moments.to(scores.device)
    return segmented.group_moments_segmented(segmented.kernels_for(backend, scores.device),
                                             scores, ids)


def _merge_rows(backend: str, a: Tensor, b: Tensor) -> Tensor:
    """Chan's merge of the moments rows a[g] and b[g]."""
    out = torch.empty_like(a)
    if backend == "cpu":
        backends.cpp_ops().group_moments_merge_out(a, b, out)
    elif backend == "torch":
        from rlkern.reference.advantages import chan_merge

        out.copy_(chan_merge(a, b))
    else:
        segmented.kernels_for(backend, a.device).moments_merge(a, b, out)
    return out


def _finish(backend: str, scores: Tensor, row_group: Tensor, moments: Tensor,
            config: AdvantageConfig) -> GroupAdvantages:
    n = scores.numel()
    dtype = acc_dtype(scores.dtype)
    outs = (*(torch.empty(n, dtype=dtype, device=scores.device) for _ in range(3)),
            torch.empty(n, dtype=torch.bool, device=scores.device))
    flags, hparams = config.kernel_args()
    if backend == "cpu":
        backends.cpp_ops().group_finish_out(scores, row_group, moments, flags, hparams, *outs)
    elif backend == "torch":
        from rlkern.reference.advantages import advantages_from_moments_reference

        ref = advantages_from_moments_reference(scores, row_group, moments, config=config)
        for out, key in zip(outs, ("advantages", "group_mean", "group_std",
                                   "zero_variance_mask"), strict=True):
            out.copy_(ref[key])
    else:
        segmented.finish_from_moments(segmented.kernels_for(backend, scores.device), scores,
                                      row_group, moments, flags, hparams, outs)
    return GroupAdvantages(*outs)


class GroupStats:
    """Per-group ``(n, mean, M2, min, max)`` keyed by int64 group id, in float64.

    Example::

        >>> stats = rlkern.GroupStats()
        >>> stats.update(torch.tensor([1.0, 0.0]), torch.tensor([5, 9]))   # micro-group 1
        >>> stats.update(torch.tensor([1.0, 1.0]), torch.tensor([5, 9]))   # micro-group 2
        >>> out = stats.advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]),
        ...                        torch.tensor([5, 9, 5, 9]))

    Args:
        nan_policy: ``"raise"`` (non-finite scores are an error) or ``"omit"`` (left out).
        device: where the statistics live (default: that of the first update).
    """

    def __init__(self, *, nan_policy: str = "raise", device: torch.device | str | None = None):
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be 'raise' or 'omit', got {nan_policy!r}")
        self.nan_policy = nan_policy
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.ids = torch.empty(0, dtype=torch.int64, device=dev)
        self.moments = torch.empty(0, len(codes().moments), dtype=torch.float64, device=dev)
        self._device_set = device is not None

    # -- views -------------------------------------------------------------------------------

    @property
    def num_groups(self) -> int:
        return int(self.ids.numel())

    @property
    def count(self) -> Tensor:
        return self.moments[:, codes().moments.count]

    @property
    def mean(self) -> Tensor:
        return self.moments[:, codes().moments.mean]

    @property
    def m2(self) -> Tensor:
        return self.moments[:, codes().moments.m2]

    def std(self, unbiased: bool = True) -> Tensor:
        n = self.count
        var = self.m2 / (n - 1 if unbiased else n).clamp_min(1.0)
        return torch.where(n < 2, 0.0, var.sqrt())

    def __repr__(self) -> str:
        return f"GroupStats(num_groups={self.num_groups}, nan_policy={self.nan_policy!r})"

    # -- building ----------------------------------------------------------------------------

    def _adopt_device(self, t: Tensor) -> None:
        if not self._device_set:
            self.ids = self.ids.to(t.device)
            self.moments = self.moments.to(t.device)
            self._device_set = True
        elif t.device != self.ids.device:
            raise ValueError(f"tensors are on {t.device} but these statistics on "
                             f"{self.ids.device}")

    def update(self, scores: Tensor, group_ids: Tensor) -> GroupStats:
        """Fold one batch of scores ``(N,)`` with their ``group_ids`` ``(N,)`` in; returns self."""
        s = _scores_1d(scores)
        ids, _ = check_grouping(s.shape[0], group_ids, None, s.device)
        self._adopt_device(s)
        if s.numel() == 0:
            return self
        backend = backends.resolve_backend("auto", s.device)
        flags, _ = AdvantageConfig(nan_policy=self.nan_policy).kernel_args()
        keys, moments = _moments(backend, s, ids, flags)
        self.ids, self.moments = _merge_tables(backend, self.ids, self.moments, keys, moments)
        return self

    def merge(self, other: GroupStats) -> GroupStats:
        """A new GroupStats holding the union of both (Chan's formula for shared groups)."""
        if not isinstance(other, GroupStats):
            raise TypeError(f"can only merge a GroupStats, got {type(other).__name__}")
        if other.ids.device != self.ids.device:
            raise ValueError(f"cannot merge statistics on {other.ids.device} into "
                             f"{self.ids.device}")
        out = GroupStats(nan_policy=self.nan_policy, device=self.ids.device)
        backend = backends.resolve_backend("auto", self.ids.device)
        out.ids, out.moments = _merge_tables(backend, self.ids, self.moments, other.ids,
                                             other.moments)
        return out

    # -- advantages --------------------------------------------------------------------------

    def advantages(
        self,
        scores: Tensor,
        group_ids: Tensor,
        *,
        estimator: str = "grpo",
        eps: float = 1e-6,
        std: str = "unbiased",
        std_scope: str = "group",
        singleton: str = "zero",
        r_max: float = 1.0,
        backend: str = "auto",
    ) -> GroupAdvantages:
        """Advantages of ``scores`` ``(N,)`` from these statistics, as
        :func:`rlkern.group_advantages` defines them (``estimator`` one of grpo, dr_grpo, rloo,
        gpg, ngrpo; σ_batch merges every group; GPG's α counts the given rows). Every id in
        ``group_ids`` must have statistics. Returns :class:`GroupAdvantages` of ``(N,)``
        tensors, float32 (float64 for float64 scores)."""
        if estimator not in STREAMING_ESTIMATORS:
            raise ValueError(f"estimator must be one of {STREAMING_ESTIMATORS}, got "
                             f"{estimator!r}")
        if std_scope == "batch" and estimator != "grpo":
            raise ValueError("std_scope='batch' applies to estimator='grpo' only")
        config = AdvantageConfig(estimator=estimator, eps=eps, std=std, std_scope=std_scope,
                                 singleton=singleton, nan_policy=self.nan_policy, r_max=r_max)
        s = _scores_1d(scores)
        ids, _ = check_grouping(s.shape[0], group_ids, None, s.device)
        if s.device != self.ids.device:
            raise ValueError(f"scores are on {s.device} but these statistics on {self.ids.device}")
        row_group = torch.searchsorted(self.ids, ids).clamp_max(max(self.num_groups - 1, 0))
        found = self.ids[row_group] == ids if self.num_groups else torch.zeros_like(ids,
                                                                                   dtype=torch.bool)
        if not bool(found.all()):
            row = int((~found).nonzero()[0])
            raise ValueError(f"group_ids: row {row} has id {int(ids[row])}, which has no "
                             "statistics (update() it first)")
        resolved = backends.resolve_backend(backend, s.device)
        return _finish(resolved, s, row_group, self.moments.contiguous(), config)

    @classmethod
    def from_scores(cls, scores: Tensor, group_ids: Tensor, *,
                    nan_policy: str = "raise") -> GroupStats:
        """Statistics of one batch (same as ``GroupStats().update(scores, group_ids)``)."""
        return cls(nan_policy=nan_policy, device=scores.device).update(scores, group_ids)


def _merge_tables(backend: str, ids_a: Tensor, mom_a: Tensor, ids_b: Tensor,
                  mom_b: Tensor) -> tuple[Tensor, Tensor]:
    """Union of two id-sorted moment tables; shared ids merge with Chan's formula."""
    if ids_a.numel() == 0:
        return ids_b, mom_b
    if ids_b.numel() == 0:
        return ids_a, mom_a
    keys, inv = torch.unique(torch.cat([ids_a, ids_b]), return_inverse=True)
    in_a, in_b = inv[: ids_a.numel()], inv[ids_a.numel():]
    out = torch.empty(keys.numel(), mom_a.shape[1], dtype=mom_a.dtype, device=mom_a.device)
    out[in_a] = mom_a
    seen = torch.zeros(keys.numel(), dtype=torch.bool, device=mom_a.device)
    seen[in_a] = True
    shared = seen[in_b]
    out[in_b[~shared]] = mom_b[~shared]
    rows = in_b[shared]
    if rows.numel():
        out[rows] = _merge_rows(backend, out[rows].contiguous(), mom_b[shared].contiguous())
    return keys, out
