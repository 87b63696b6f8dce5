"""Reference for group advantages (ALGORITHMS.md §2): every estimator, group by group.

Readable, slow (a Python loop over groups), float64 throughout: the ground truth the CPU,
Triton and CUDA kernels are tested against. For each response ``i`` with score ``s_i`` in group
``g`` (``n_g`` valid members, mean ``μ_g``, standard deviation ``σ_g``)::

    grpo                   A = (s − μ_g) / (σ_g + ε)          (std_scope="batch": σ_batch)
    dr_grpo                A = s − μ_g
    rloo                   A = (s − μ_g) · n_g / (n_g − 1)
    reinforce_pp_baseline  c = s − μ_g;  A = (c − mean_w c) · rsqrt(var_w c + 1e-8)  over tokens
    opo                    A = s − Σ_j len_j s_j / Σ_j len_j
    gpg                    A = α (s − μ_g),  α = N / max(#{s ≠ 0}, 1)
    grpo_passk             A = (s_max − s_second) / (σ_g + ε) for the group's argmax, else 0
    ngrpo                  μ', σ' over the group plus a virtual sample r_max; A = (s − μ')/(σ' + ε)
    unlikely               r' = s (1 − λ rank/n_g) (rank of the mean old logprob, least likely
                           first, ties by row); then grpo on r'
    xrpo                   grpo, then A += min(max(λ(1 − η), 0), κ|A|) where A > 0,
                           η = exp(ŝ − mean_g ŝ)

Edge cases (identical on every backend): a singleton group gets A = 0 (``singleton="zero"``)
or verl's μ = 0, σ = 1 (``"verl"``); a group whose valid scores are all equal has μ equal to
that score exactly (so A = 0 for every mean-centred estimator) and is flagged in
``zero_variance_mask``; non-finite scores raise (``nan_policy="raise"``) or are left out of
their group and get A = 0 (``"omit"``, TRL's nanmean/nanstd semantics).

``trl_grpo_advantages`` transcribes TRL's formula (TRL has no public function for it: the
computation sits inside ``GRPOTrainer._generate_and_score_completions``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from rlkern.config.advantages import (
    ESTIMATORS,
    GRPO_FAMILY,
    UNLIKELY_LAMBDA,
    WHITEN_EPS,
    AdvantageConfig,
    loglik_policy,
    sequence_loglik,
)

__all__ = ["ESTIMATORS", "GRPO_FAMILY", "UNLIKELY_LAMBDA", "WHITEN_EPS",
           "advantages_from_moments_reference", "chan_merge", "dense_group_index",
           "group_advantages_reference", "group_advantages_rows_reference",
           "group_moments_reference", "merge_all", "sequence_loglik", "spread_divide",
           "trl_grpo_advantages"]


def dense_group_index(group_ids: Tensor | None, group_size: int | None, n: int) -> Tensor:
    """Group index in ``[0, K)`` of each row (contiguous groups or arbitrary ids)."""
    if group_ids is None:
        assert group_size is not None
        return torch.arange(n) // group_size
    return torch.unique(group_ids, return_inverse=True)[1]


def _std(m2: float, n: int, std: str) -> float:
    if n == 0:
        return math.nan
    if n < 2:
        return 0.0
    return math.sqrt(m2 / (n if std == "biased" else n - 1))


def _moments(x: Tensor) -> tuple[int, float, float]:
    """(n, mean, M2) of a float64 vector; all-equal values give mean = that value exactly."""
    n = x.numel()
    if n == 0:
        return 0, math.nan, 0.0
    if bool((x == x[0]).all()):
        return n, float(x[0]), 0.0
    mean = float(x.mean())
    return n, mean, float(((x - mean) ** 2).sum())


def spread_divide(d: Any, spread: Any) -> Any:
    """``d / spread``, and 0 where ``spread`` (σ + ε) is 0: σ = 0 means every value equals its
    group's mean exactly, so d = 0 and A = 0 (rather than 0/0 = NaN when ε = 0)."""
    if isinstance(spread, Tensor) or isinstance(d, Tensor):
        spread = torch.as_tensor(spread, dtype=torch.float64)
        return torch.where(spread != 0, d / torch.where(spread != 0, spread, 1.0), 0.0)
    return d / spread if spread != 0 else 0.0


def _ranks(loglik: Tensor, rows: Tensor) -> Tensor:
    """Rank of each row by (log-likelihood, row index), least likely first, 0-based."""
    order = sorted(range(rows.numel()), key=lambda j: (float(loglik[j]), int(rows[j])))
    ranks = torch.empty(rows.numel(), dtype=torch.float64)
    for r, j in enumerate(order):
        ranks[j] = r
    return ranks


def group_advantages_reference(
    scores: Tensor, *, group_ids: Tensor | None = None, group_size: int | None = None,
    mask: Tensor | None = None, lengths: Tensor | None = None, old_logprobs: Tensor | None = None,
    **options: Any,
) -> dict[str, Tensor]:
    """All outputs of ``rlkern.group_advantages`` in float64 (see the module docstring).

    ``scores`` is ``(N,)`` or ``(N, T)`` (summed over T); ``options`` are the fields of
    :class:`rlkern.AdvantageConfig` (estimator, eps, std, std_scope, singleton, nan_policy,
    r_max, lam, kappa). Returns ``advantages`` (``(N,)``, or ``(N, T)`` = ``A_i · mask`` when
    ``mask`` is given), ``group_mean``, ``group_std`` (of the valid scores; NaN for a group with
    none, 0 for a singleton) and ``zero_variance_mask``.
    """
    config = AdvantageConfig(**options)
    s = scores.to(torch.float64)
    if s.dim() == 2:
        s = s.sum(-1)
    weights = None
    if config.estimator == "opo":
        weights = lengths.to(torch.float64)
    elif config.estimator == "reinforce_pp_baseline" and mask is not None:
        weights = mask.to(torch.float64).sum(-1)
    loglik = None
    if old_logprobs is not None:
        s, loglik = loglik_policy(s, sequence_loglik(old_logprobs, mask),
                                  config.nan_policy == "omit")
    out = group_advantages_rows_reference(s, group_ids=group_ids, group_size=group_size,
                                          weights=weights, loglik=loglik, config=config)
    if mask is not None:
        out["advantages"] = out["advantages"].unsqueeze(-1) * mask.to(torch.float64)
    return out


def group_advantages_rows_reference(
    s: Tensor, *, group_ids: Tensor | None, group_size: int | None, weights: Tensor | None,
    loglik: Tensor | None, config: AdvantageConfig,
) -> dict[str, Tensor]:
    """The per-response outputs from per-response inputs: scores ``s`` (N,), ``weights``
    (opo: lengths; reinforce_pp_baseline: token counts, default 1) and ``loglik`` (unlikely,
    xrpo: the mean old log-probability of each response)."""
    estimator, eps, std = config.estimator, config.eps, config.std
    lam, kappa, r_max = config.lam, config.kappa, config.r_max
    s = s.to(torch.float64)
    n_rows = s.numel()
    valid = torch.isfinite(s)
    if config.nan_policy == "raise" and not bool(valid.all()):
        row = int((~valid).nonzero()[0])
        raise ValueError(f"scores: row {row} is {float(s[row])} (nan_policy='raise')")
    gidx = dense_group_index(group_ids, group_size, n_rows)
    num_groups = int(gidx.max()) + 1 if n_rows else 0
    if weights is None:
        weights = torch.ones(n_rows, dtype=torch.float64)
    weights = weights.to(torch.float64)
    verl = config.singleton == "verl"
    lam_value = (UNLIKELY_LAMBDA if lam is None else lam) if estimator == "unlikely" else lam

    # The values the estimator normalises: s, or unlikely's rank-shaped r'.
    x = s.clone()
    groups = []
    for g in range(num_groups):
        rows = (gidx == g).nonzero().flatten()
        vrows = rows[valid[rows]]
        groups.append(vrows)
        if estimator == "unlikely" and vrows.numel() > 0:
            rank = _ranks(loglik[vrows], vrows) / vrows.numel()
            x[vrows] = s[vrows] * (1.0 - lam_value * rank)

    adv = torch.zeros(n_rows, dtype=torch.float64)
    mean_out = torch.full((n_rows,), math.nan, dtype=torch.float64)
    std_out = torch.full((n_rows,), math.nan, dtype=torch.float64)
    zero_var = torch.zeros(n_rows, dtype=torch.bool)
    all_valid = torch.cat(groups) if groups else torch.zeros(0, dtype=torch.long)
    n_all, _, m2_all = _moments(x[all_valid])
    batch_std = _std(m2_all, n_all, std)
    nonzero = int((s[all_valid] != 0).sum())
    alpha = n_all / max(nonzero, 1)

    centred = torch.zeros(n_rows, dtype=torch.float64)  # reinforce_pp_baseline's c
    included = torch.zeros(n_rows, dtype=torch.bool)
    for g in range(num_groups):
        vrows = groups[g]
        rows = (gidx == g).nonzero().flatten()
        n, mean_s, m2_s = _moments(s[vrows])
        mean_out[rows] = mean_s
        std_out[rows] = _std(m2_s, n, "unbiased" if std == "none" else std)
        zero_var[rows] = n >= 2 and bool((s[vrows] == s[vrows][0]).all())
        if n == 0 or (n == 1 and not verl):
            continue
        xv = x[vrows]
        n, mean, m2 = _moments(xv)
        single = n == 1
        baseline = 0.0 if single else mean
        sigma = 1.0 if single else _std(m2, n, std)
        if estimator in GRPO_FAMILY:
            d = xv - baseline
            batch = config.std_scope == "batch"
            a = d if std == "none" else spread_divide(d, (batch_std if batch else sigma) + eps)
            if estimator == "xrpo":
                eta = torch.exp(loglik[vrows] - loglik[vrows].mean())
                bonus = (lam * (1.0 - eta)).clamp_min(0.0)
                a = torch.where(a > 0, a + torch.minimum(bonus, kappa * a.abs()), a)
        elif estimator == "dr_grpo":
            a = xv - baseline
        elif estimator == "rloo":
            a = xv if single else (xv - mean) * n / (n - 1)
        elif estimator == "gpg":
            a = alpha * (xv - baseline)
        elif estimator == "opo":
            w = weights[vrows]
            if single:
                b = 0.0
            elif float(w.sum()) > 0 and not bool((xv == xv[0]).all()):
                b = float((w * xv).sum() / w.sum())
            else:
                b = mean
            a = xv - b
        elif estimator == "grpo_passk":
            if single:
                raise ValueError(f"grpo_passk needs at least 2 responses per group (verl raises "
                                 f"too); the group of row {int(vrows[0])} has 1")
            top = torch.sort(xv, descending=True, stable=True)
            gap = float(top.values[0] - top.values[1])
            a = torch.zeros_like(xv)
            first = int((xv == top.values[0]).nonzero()[0])
            a[first] = gap if std == "none" else spread_divide(gap, sigma + eps)
        elif estimator == "ngrpo":
            ext = torch.cat([xv, torch.tensor([r_max], dtype=torch.float64)])
            n2, mean2, m22 = _moments(ext)
            d = xv - mean2
            a = d if std == "none" else spread_divide(d, _std(m22, n2, std) + eps)
        elif estimator == "reinforce_pp_baseline":
            centred[vrows] = xv - baseline
            included[vrows] = True
            continue
        else:
            raise ValueError(f"unknown estimator {estimator!r}")
        adv[vrows] = a

    if estimator == "reinforce_pp_baseline":
        w = weights * included
        total = float(w.sum())
        mean_c = float((w * centred).sum()) / total if total > 0 else 0.0
        var = float((w * (centred - mean_c) ** 2).sum()) / (total - 1) if total > 1 else 0.0
        adv = torch.where(included, (centred - mean_c) / math.sqrt(var + WHITEN_EPS), 0.0)

    return {"advantages": adv, "group_mean": mean_out, "group_std": std_out,
            "zero_variance_mask": zero_var}


def trl_grpo_advantages(rewards: Tensor, num_generations: int, *,
                        scale_rewards: str = "group") -> Tensor:
    """TRL's GRPO advantages, transcribed from ``GRPOTrainer._generate_and_score_completions``
    (trl 1.16, ``multi_objective_aggregation="sum_then_normalize"``): contiguous groups of
    ``num_generations``, NaN-aware mean / unbiased std, ``(r − mean) / (std + 1e-4)`` (no
    division for ``scale_rewards="none"``; the batch std for ``"batch"``), NaN rows → 0."""
    r = rewards.to(torch.float64)
    grouped = r.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)

    def nanstd(t: Tensor, dim: int | None = None) -> Tensor:
        mu = torch.nanmean(t, dim=dim, keepdim=True)
        var = torch.nanmean((t - mu) ** 2, dim=dim, keepdim=True)
        count = (~torch.isnan(t)).sum(dim=dim, keepdim=True)
        var = var * torch.where(count > 1, count / (count - 1), torch.nan)
        out = var.sqrt()
        return out.squeeze(dim) if dim is not None else out.reshape(())

    if scale_rewards == "batch":
        std = nanstd(r).expand_as(r)
    else:
        std = nanstd(grouped, dim=1).repeat_interleave(num_generations)
    adv = r - mean
    if scale_rewards != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0)


# ---------------------------------------------------------------------------------------------
# Streaming statistics: per-group moments and advantages from given moments (GroupStats).

def group_moments_reference(scores: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted unique ids (K,) and their moments (K, 5) over the finite scores, two-pass.

    The columns of a moments table: count, mean, M2 = Σ (x − mean)², min, max (float64;
    ``rlkern.config.advantages.codes().moments``)."""
    s = scores.to(torch.float64)
    keys, inv = torch.unique(group_ids, return_inverse=True)
    k = keys.numel()
    valid = torch.isfinite(s)
    x = torch.where(valid, s, 0.0)
    count = torch.zeros(k, dtype=torch.float64).index_add_(0, inv, valid.to(torch.float64))
    mean = torch.zeros(k, dtype=torch.float64).index_add_(0, inv, x) / count
    d = torch.where(valid, s - mean[inv], 0.0)
    m2 = torch.zeros(k, dtype=torch.float64).index_add_(0, inv, d * d)
    inf = torch.full((k,), math.inf, dtype=torch.float64)
    lo = inf.scatter_reduce(0, inv, torch.where(valid, s, math.inf), "amin")
    hi = (-inf).scatter_reduce(0, inv, torch.where(valid, s, -math.inf), "amax")
    equal = lo == hi
    mean = torch.where(equal, lo, mean)
    m2 = torch.where(equal, 0.0, m2)
    return keys, torch.stack([count, mean, m2, lo, hi], dim=1)


def chan_merge(a: Tensor, b: Tensor) -> Tensor:
    """Chan's merge of two moment tables (K, 5) row by row (disjoint sets of scores)."""
    na, ma, m2a, loa, hia = a.unbind(1)
    nb, mb, m2b, lob, hib = b.unbind(1)
    n = na + nb
    delta = mb - ma
    frac = torch.where(n > 0, nb / n.clamp_min(1.0), 0.0)
    mean = ma + delta * frac
    m2 = m2a + m2b + delta * delta * na * frac
    lo, hi = torch.minimum(loa, lob), torch.maximum(hia, hib)
    equal = lo == hi
    merged = torch.stack([n, torch.where(equal, lo, mean), torch.where(equal, 0.0, m2), lo, hi], 1)
    merged = torch.where((nb == 0).unsqueeze(1), a, merged)
    return torch.where((na == 0).unsqueeze(1), b, merged)


def merge_all(moments: Tensor) -> Tensor:
    """The moments (5,) of the union of every group: count-weighted mean, and M2 by the
    parallel-axis theorem, Σ M2_g + Σ n_g (mean_g − mean)² (Chan's merge in closed form)."""
    n, mean, m2, lo, hi = moments.unbind(1)
    total = n.sum()
    has = n > 0
    mu = torch.where(has, n * mean, 0.0).sum() / total.clamp_min(1.0)
    spread = torch.where(has, m2 + n * (mean - mu) ** 2, 0.0).sum()
    return torch.stack([total, mu, spread, lo.min() if lo.numel() else mu,
                        hi.max() if hi.numel() else mu])


def advantages_from_moments_reference(scores: Tensor, row_group: Tensor, moments: Tensor, *,
                                      config: AdvantageConfig) -> dict[str, Tensor]:
    """Advantages of rows whose groups' moments are given (grpo, dr_grpo, rloo, gpg, ngrpo);
    the batch std is the std of all groups merged, GPG's α is over the given rows."""
    estimator, eps, std, r_max = config.estimator, config.eps, config.std, config.r_max
    s = scores.to(torch.float64)
    valid = torch.isfinite(s)
    if config.nan_policy == "raise" and not bool(valid.all()):
        raise ValueError(f"scores: row {int((~valid).nonzero()[0])} is NaN or infinite")
    n, mean, m2 = (moments[row_group, c] for c in range(3))
    lo, hi = moments[row_group, 3], moments[row_group, 4]
    unbiased = lambda m, c: torch.sqrt(m / (c - 1).clamp_min(1.0))
    sigma_of = (lambda m, c: torch.sqrt(m / c)) if std == "biased" else unbiased
    single = n < 2
    active = (n >= 2) | ((n == 1) & (config.singleton == "verl"))
    base = torch.where(single, 0.0, mean)
    if estimator in ("grpo", "dr_grpo"):
        a = s - base
        if estimator == "grpo" and std != "none":
            if config.std_scope == "batch":
                total = merge_all(moments)
                sigma = (sigma_of(total[2], total[0]) if float(total[0]) >= 2
                         else torch.zeros((), dtype=torch.float64))
            else:
                sigma = torch.where(single, 1.0, sigma_of(m2, n))
            a = spread_divide(a, sigma + eps)
    elif estimator == "rloo":
        a = torch.where(single, s, (s - mean) * n / (n - 1).clamp_min(1.0))
    elif estimator == "gpg":
        count = int(valid.sum())
        alpha = count / max(int((valid & (s != 0)).sum()), 1)
        a = alpha * (s - base)
    elif estimator == "ngrpo":
        n2 = n + 1
        mean2 = mean + (r_max - mean) / n2
        m22 = m2 + (r_max - mean) * (r_max - mean2)
        d = s - mean2
        a = d if std == "none" else spread_divide(d, sigma_of(m22, n2) + eps)
    else:
        raise ValueError(f"estimator {estimator!r}: advantages from group statistics support "
                         "grpo, dr_grpo, rloo, gpg and ngrpo")
    a = torch.where(valid & active, a, 0.0)
    reported = sigma_of(m2, n) if std == "biased" else unbiased(m2, n)
    std_out = torch.where(n == 0, math.nan, torch.where(single, 0.0, reported))
    return {"advantages": a, "group_mean": torch.where(n == 0, math.nan, mean),
            "group_std": std_out, "zero_variance_mask": (n >= 2) & (lo == hi)}
