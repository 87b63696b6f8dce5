"""Streaming group statistics for micro-group sampling (ALGORITHMS.md §2, §5).

When the G responses of a prompt are generated in micro-groups, each micro-group's scores are
folded into per-group ``(n, mean, M2)`` as they arrive, and partial statistics from different
workers merge with Chan's formula; the advantages computed from the merged statistics equal the
one-shot :func:`rlkern.group_advantages` result to float32 rounding.

The moments are kept in float64, with ``min`` and ``max`` as well: they make a group whose
scores are all equal exactly zero-variance after any sequence of merges (Chan's update of the
mean is exact only when the means are equal, and min == max says so).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlkern import backends
from rlkern.ops.advantages import GroupAdvantages, _check_tensor, check_grouping
from rlkern.reference.advantages import (
    MOMENT_FIELDS,
    advantages_from_moments_reference,
    chan_merge,
    group_moments_reference,
    merge_all,
)

__all__ = ["STREAMING_ESTIMATORS", "GroupStats"]

#: Estimators whose advantages depend only on each group's (n, mean, M2).
STREAMING_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "gpg", "ngrpo")
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def _scores_1d(scores: object, n: int | None = None) -> Tensor:
    s = _check_tensor(scores, "scores")
    if s.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"scores must be bfloat16, float16, float32 or float64, got {s.dtype}")
    if s.dim() != 1 or (n is not None and s.shape[0] != n):
        raise ValueError(f"scores must have shape (N,), got {tuple(s.shape)}")
    return s if s.dtype in (torch.float32, torch.float64) else s.float()


def _batch_moments(scores: Tensor, ids: Tensor, nan_policy: str) -> tuple[Tensor, Tensor]:
    """Sorted ids and their moments (K, 5) for one batch of scores."""
    if scores.device.type == "cpu" and backends.has_cpp() and scores.numel():
        n = scores.numel()
        keys = torch.empty(n, dtype=torch.int64)
        moments = torch.empty(n, 5, dtype=torch.float64)
        count = torch.empty(1, dtype=torch.int64)
        backends.cpp_ops().group_moments_out(scores.contiguous(), ids, 0, nan_policy, keys,
                                             moments, count)
        k = int(count)
        keys, moments = keys[:k], moments[:k]
        order = torch.argsort(keys)  # the kernel numbers groups by first appearance
        return keys[order], moments[order]
    if nan_policy == "raise":
        bad = ~torch.isfinite(scores)
        if bool(bad.any()):
            raise ValueError(f"scores: row {int(bad.nonzero()[0])} is NaN or infinite "
                             "(nan_policy='raise')")
    keys, moments = group_moments_reference(scores, ids)
    return keys.to(scores.device), moments.to(scores.device)


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
        if nan_policy not in ("raise", "omit"):
            raise ValueError(f"nan_policy must be 'raise' or 'omit', got {nan_policy!r}")
        self.nan_policy = nan_policy
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.ids = torch.empty(0, dtype=torch.int64, device=dev)
        self.moments = torch.empty(0, len(MOMENT_FIELDS), dtype=torch.float64, device=dev)
        self._device_set = device is not None

    # -- views -------------------------------------------------------------------------------

    @property
    def num_groups(self) -> int:
        return int(self.ids.numel())

    @property
    def count(self) -> Tensor:
        return self.moments[:, 0]

    @property
    def mean(self) -> Tensor:
        return self.moments[:, 1]

    @property
    def m2(self) -> Tensor:
        return self.moments[:, 2]

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
        keys, moments = _batch_moments(s, ids, self.nan_policy)
        self.ids, self.moments = _merge_tables(self.ids, self.moments, keys, moments)
        return self

    def merge(self, other: GroupStats) -> GroupStats:
        """A new GroupStats holding the union of both (Chan's formula for shared groups)."""
        if not isinstance(other, GroupStats):
            raise TypeError(f"can only merge a GroupStats, got {type(other).__name__}")
        if other.ids.device != self.ids.device:
            raise ValueError(f"cannot merge statistics on {other.ids.device} into "
                             f"{self.ids.device}")
        out = GroupStats(nan_policy=self.nan_policy, device=self.ids.device)
        out.ids, out.moments = _merge_tables(self.ids, self.moments, other.ids, other.moments)
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
        from rlkern.ops.advantages import STD_MODES, _choice

        _choice(estimator, "estimator", STREAMING_ESTIMATORS)
        _choice(std, "std", STD_MODES)
        _choice(std_scope, "std_scope", ("group", "batch"))
        _choice(singleton, "singleton", ("zero", "verl"))
        if std_scope == "batch" and estimator != "grpo":
            raise ValueError("std_scope='batch' applies to estimator='grpo' only")
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
        total = merge_all(self.moments)
        resolved = backends.resolve_backend(backend, s.device)
        dtype = torch.float64 if s.dtype == torch.float64 else torch.float32
        if resolved == "cpu":
            out = [torch.empty(s.shape[0], dtype=dtype) for _ in range(3)]
            zv = torch.empty(s.shape[0], dtype=torch.bool)
            sigma = _batch_sigma(total, std)
            valid = torch.isfinite(s)
            alpha = float(valid.sum()) / max(float((valid & (s != 0)).sum()), 1.0)
            backends.cpp_ops().group_finish_out(
                s.contiguous(), row_group, self.moments.contiguous(), estimator, float(eps), std,
                std_scope, singleton, self.nan_policy, float(r_max), sigma, alpha, *out, zv)
            return GroupAdvantages(*out, zv)
        ref = advantages_from_moments_reference(
            s, row_group, self.moments, estimator=estimator, eps=float(eps), std=std,
            std_scope=std_scope, singleton=singleton, nan_policy=self.nan_policy,
            r_max=float(r_max))
        return GroupAdvantages(ref["advantages"].to(dtype), ref["group_mean"].to(dtype),
                               ref["group_std"].to(dtype), ref["zero_variance_mask"])

    @classmethod
    def from_scores(cls, scores: Tensor, group_ids: Tensor, *,
                    nan_policy: str = "raise") -> GroupStats:
        """Statistics of one batch (same as ``GroupStats().update(scores, group_ids)``)."""
        return cls(nan_policy=nan_policy, device=scores.device).update(scores, group_ids)


def _batch_sigma(total: Tensor, std: str) -> float:
    n = float(total[0])
    if n < 2:
        return 0.0
    return float((total[2] / (n if std == "biased" else n - 1)).sqrt())


def _merge_tables(ids_a: Tensor, mom_a: Tensor, ids_b: Tensor,
                  mom_b: Tensor) -> tuple[Tensor, Tensor]:
    """Union of two id-sorted moment tables; shared ids merge with Chan's formula."""
    if ids_a.numel() == 0:
        return ids_b, mom_b
    if ids_b.numel() == 0:
        return ids_a, mom_a
    keys, inv = torch.unique(torch.cat([ids_a, ids_b]), return_inverse=True)
    empty = torch.tensor([0.0, 0.0, 0.0, float("inf"), float("-inf")], dtype=torch.float64,
                         device=mom_a.device)
    left = empty.repeat(keys.numel(), 1)
    right = left.clone()
    left[inv[: ids_a.numel()]] = mom_a
    right[inv[ids_a.numel():]] = mom_b
    return keys, chan_merge(left, right)
