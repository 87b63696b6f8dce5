"""Group advantages (ALGORITHMS.md §2): every estimator as one fused segmented reduction.

Public entry point: :func:`group_advantages`. It validates its arguments into an
:class:`~rlkern.AdvantageConfig`, reduces its inputs to per-response vectors with plain torch
ops (scores summed over tokens, the mean old log-probability of each response, the response
lengths) and calls one registered op (``torch.ops.rlkern``):

* ``group_advantages(scores, group_ids, group_size, weights, loglik, flags, hparams,
  double_output, backend)`` → ``(advantages, group_mean, group_std, zero_variance_mask)``, all
  ``(N,)``: the functional op that autograd and ``torch.compile`` see (advantages are not
  differentiable: rewards carry no gradient in GRPO-style training). ``flags`` / ``hparams``
  are :meth:`AdvantageConfig.kernel_args`, whatever the backend; only the kernel call differs
  (:data:`_KERNELS`): the C++ ``group_advantages_out`` on CPU, the segmented GPU pipeline of
  :mod:`rlkern.ops.advantages_segmented` with the Triton or CUDA kernels, or the float64
  reference for ``backend="torch"``.

The result is broadcast to tokens with the mask.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from rlkern import backends
from rlkern.config.advantages import (
    ESTIMATORS,
    AdvantageConfig,
    codes,
    config_and_args,
    loglik_policy,
    sequence_loglik,
)
from rlkern.config.dtypes import FLOAT_DTYPES, INDEX_DTYPES, acc_dtype
from rlkern.ops import advantages_segmented, eager

__all__ = ["ESTIMATORS", "AdvantageConfig", "GroupAdvantages", "check_devices", "group_advantages"]


class GroupAdvantages(NamedTuple):
    """Outputs of :func:`group_advantages`.

    * ``advantages`` — ``(N,)``, or ``(N, T) = A_i · mask[i, t]`` when a mask is given;
    * ``group_mean``, ``group_std`` — ``(N,)``: mean and standard deviation of the valid scores
      of each row's group (σ per the ``std`` option, unbiased for ``std="none"``; NaN when the
      group has no valid score, 0 for a singleton);
    * ``zero_variance_mask`` — ``(N,)`` bool: the row's group has ≥ 2 valid scores, all equal
      (DAPO's dynamic sampling drops these groups).

    Float outputs are float32 (float64 for float64 scores).
    """

    advantages: Tensor
    group_mean: Tensor
    group_std: Tensor
    zero_variance_mask: Tensor


# ---------------------------------------------------------------------------------------------
# The op: one pipeline, a kernel per backend


def _check_weights(weights: Tensor | None) -> None:
    if weights is not None and weights.numel():
        bad = ~torch.isfinite(weights) | (weights < 0)
        if bool(bad.any()):
            row = int(bad.nonzero()[0])
            raise ValueError(f"lengths: row {row} is {float(weights[row])}; response lengths "
                             "must be finite and >= 0")


def _cpu_kernel(scores, group_ids, group_size, weights, loglik, flags, hparams, outs) -> None:
    backends.cpp_ops().group_advantages_out(scores, group_ids, group_size, weights, loglik,
                                            flags, hparams, *outs)


def _reference_kernel(scores, group_ids, group_size, weights, loglik, flags, hparams,
                      outs) -> None:
    # backend="torch" is the float64 reference, imported here only: no other backend reads it.
    from rlkern.reference.advantages import group_advantages_rows_reference

    ref = group_advantages_rows_reference(
        scores, group_ids=group_ids, group_size=group_size or None, weights=weights,
        loglik=loglik, config=AdvantageConfig.from_kernel_args(flags, hparams))
    for out, key in zip(outs, ("advantages", "group_mean", "group_std", "zero_variance_mask"),
                        strict=True):
        out.copy_(ref[key])


#: backend → the kernel call filling ``(advantages, group_mean, group_std, zero_variance)``.
_KERNELS = {"cpu": _cpu_kernel,
            "triton": functools.partial(advantages_segmented.group_advantages_segmented, "triton"),
            "cuda": functools.partial(advantages_segmented.group_advantages_segmented, "cuda"),
            "torch": _reference_kernel}


def check_devices(main_name: str, main: Tensor, **others: Tensor | None) -> None:
    """Every tensor argument of a registered op on ``main``'s device, else ``ValueError``
    naming it. Run by each op of the family and by its fake implementation: a ``meta`` tensor
    among CPU ones dispatches to the fake implementation, whose outputs are uninitialised."""
    for name, t in others.items():
        if t is not None and t.device != main.device:
            raise ValueError(f"{name} is on {t.device} but {main_name} on {main.device}")


@eager.custom_op("rlkern::group_advantages", mutates_args=())
def group_advantages_op(
    scores: Tensor,
    group_ids: Tensor | None,
    group_size: int,
    weights: Tensor | None,
    loglik: Tensor | None,
    flags: list[int],
    hparams: list[float],
    double_output: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    check_devices("scores", scores, group_ids=group_ids, weights=weights, loglik=loglik)
    n = scores.numel()
    dtype = torch.float64 if double_output else torch.float32
    outs = (*(torch.empty(n, dtype=dtype, device=scores.device) for _ in range(3)),
            torch.empty(n, dtype=torch.bool, device=scores.device))
    _check_weights(weights)
    if loglik is not None:
        # Every backend sees the same finite ŝ (malformed flags are the kernels' error).
        c = codes()
        omit = len(flags) == len(c.flags) and flags[c.flags.nan_policy] == c.nan_policy.omit
        scores, loglik = loglik_policy(scores, loglik, omit)
    if n:
        _KERNELS[backend](scores, group_ids, group_size, weights, loglik, flags, hparams, outs)
    return outs


@group_advantages_op.register_fake
def _(scores, group_ids, group_size, weights, loglik, flags, hparams, double_output, backend):
    check_devices("scores", scores, group_ids=group_ids, weights=weights, loglik=loglik)
    dtype = torch.float64 if double_output else torch.float32
    n = scores.shape[0]
    out = lambda: scores.new_empty((n,), dtype=dtype)
    return out(), out(), out(), scores.new_empty((n,), dtype=torch.bool)


# ---------------------------------------------------------------------------------------------
# Argument checking (everything that does not depend on the data; raises before any work)


def check_tensor(t: object, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_grouping(n: int, group_ids: object, group_size: object, device: torch.device,
                   main: str = "scores") -> tuple[Tensor | None, int]:
    """Validate ``group_ids`` xor ``group_size`` for ``n`` rows of the input named ``main``
    (on ``device``); returns (int64 ids, size)."""
    if group_ids is None and group_size is None:
        raise ValueError("give the groups: either group_ids (an int64 id per response) or "
                         "group_size (contiguous groups), not neither")
    if group_ids is not None and group_size is not None:
        raise ValueError("give either group_ids or group_size, not both")
    if group_size is not None:
        if not isinstance(group_size, int) or isinstance(group_size, bool):
            raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
        if group_size <= 0 or n % group_size:
            raise ValueError(f"group_size must be a positive divisor of the number of responses "
                             f"N = {n}, got {group_size}")
        return None, group_size
    ids = check_tensor(group_ids, "group_ids")
    if ids.dtype not in INDEX_DTYPES:
        raise TypeError(f"group_ids must be int64 (or int32), got {ids.dtype}")
    if ids.dim() != 1 or ids.shape[0] != n:
        raise ValueError(f"group_ids must have shape (N,) = ({n},), got {tuple(ids.shape)}")
    if ids.device != device:
        raise ValueError(f"group_ids are on {ids.device} but {main} on {device}")
    if ids.dtype != torch.int64:  # a same-dtype .to() is still a dispatcher call (~1 µs)
        ids = ids.to(torch.int64)
    return ids.contiguous(), 0


def _check_float(t: object, name: str, shape: tuple[int, ...], device: torch.device) -> Tensor:
    t = check_tensor(t, name)
    if not (t.dtype.is_floating_point or t.dtype in INDEX_DTYPES):
        raise TypeError(f"{name} must be a float or integer tensor, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but scores on {device}")
    return t


def _check_mask(mask: object, shape: tuple[int, ...], device: torch.device) -> Tensor:
    m = check_tensor(mask, "mask")
    if m.dtype != torch.bool and not (m.dtype.is_floating_point or m.dtype in INDEX_DTYPES):
        raise TypeError(f"mask must be bool, integer or float, got {m.dtype}")
    if m.dim() != 2 or (shape and tuple(m.shape) != shape):
        want = shape if shape else "(N, T)"
        raise ValueError(f"mask must have shape {want}, got {tuple(m.shape)}")
    if m.device != device:
        raise ValueError(f"mask is on {m.device} but scores on {device}")
    return m


# ---------------------------------------------------------------------------------------------
# Public API


def group_advantages(
    scores: Tensor,
    *,
    group_ids: Tensor | None = None,
    group_size: int | None = None,
    estimator: str = "grpo",
    eps: float = 1e-6,
    std: str = "unbiased",
    std_scope: str = "group",
    singleton: str = "zero",
    nan_policy: str = "raise",
    mask: Tensor | None = None,
    lengths: Tensor | None = None,
    old_logprobs: Tensor | None = None,
    r_max: float = 1.0,
    lam: float | None = None,
    kappa: float | None = None,
    backend: str = "auto",
) -> GroupAdvantages:
    r"""Per-response advantages from group statistics, for any group layout (ALGORITHMS.md §2).

    Each response ``i`` has a score ``s_i`` (``scores`` itself, or ``Σ_t scores[i, t]`` for
    token-level rewards) and belongs to a group ``g`` of ``n_g`` responses with mean ``μ_g``
    and standard deviation ``σ_g``::

        grpo                   A = (s − μ_g) / (σ_g + eps)
        dr_grpo                A = s − μ_g                                (Dr. GRPO)
        grpo, std_scope=batch  A = (s − μ_g) / (σ_batch + eps)         (TRL scale_rewards="batch")
        rloo                   A = (s − μ_g) · n_g / (n_g − 1)            (= s − mean of the others)
        reinforce_pp_baseline  c = s − μ_g;  A[i,t] = (c − mean c) · rsqrt(var c + 1e-8) over
                               the batch's valid tokens (verl's masked_whiten)
        opo                    A = s − Σ_j len_j s_j / Σ_j len_j          (needs lengths)
        gpg                    A = α (s − μ_g),  α = N / max(#{s ≠ 0}, 1)
        grpo_passk             the group's best response gets (s_max − s_2nd) / (σ_g + eps),
                               the others 0
        ngrpo                  μ', σ' over the group plus a virtual score r_max;
                               A = (s − μ') / (σ' + eps)
        unlikely               r' = s (1 − lam · rank / n_g), rank of the response's mean old
                               log-probability in its group (least likely = 0, ties by row),
                               lam = 0.25; then grpo on r'        (Rewarding the Unlikely)
        xrpo                   grpo, then where A > 0: A += min(max(lam (1 − η), 0), kappa |A|),
                               η = exp(ŝ − mean_g ŝ), ŝ = mean old log-probability   (XRPO)

    Conventions: ``eps = 1e-6`` and ``std = "unbiased"`` are verl's (TRL uses ``eps=1e-4``);
    ``std = "none"`` skips the division (``grpo`` then equals ``dr_grpo``; verl's
    ``norm_adv_by_std_in_grpo=False``). A singleton group gets ``A = 0`` (``singleton="zero"``:
    no relative signal) or verl's ``μ = 0, σ = 1`` (``"verl"``: ``A = s/(1 + eps)`` for grpo,
    ``s`` for rloo/opo/dr_grpo; grpo_passk raises, as verl does). A group whose valid scores are
    all equal gets ``A = 0`` exactly for every mean-centred estimator (its mean is that score,
    exactly) and is flagged in ``zero_variance_mask``; with ``eps = 0`` it gets 0 too, not
    0/0. Non-finite scores raise (``nan_policy="raise"``) or are left out of their group's
    statistics and get ``A = 0`` (``"omit"``: TRL's nanmean / nanstd); so does a response of
    unlikely / xrpo with a NaN or ±inf ``old_logprobs`` at a valid token (values where the mask
    is 0 are never read).

    Groups are contiguous rows (``group_size``, TRL's layout) or arbitrary int64 ``group_ids``
    in any order, of any sizes, not necessarily dense (verl's shuffled uids, hashed to
    integers). Accumulation is in float64 (float32 on GPUs for the row formula), and a group's
    result does not depend on the order of its rows beyond float32 rounding. Advantages are not
    differentiable (rewards carry no gradient).

    Args:
        scores: ``(N,)`` per-response rewards, or ``(N, T)`` token-level rewards (then ``mask``
            is required); bfloat16 / float16 / float32 / float64.
        group_ids: ``(N,)`` int64 (or int32) group id per response. Exclusive with group_size.
        group_size: contiguous groups of this many rows (must divide N).
        estimator: one of ``grpo, dr_grpo, rloo, reinforce_pp_baseline, opo, gpg, grpo_passk,
            ngrpo, unlikely, xrpo``.
        eps: added to σ (verl 1e-6, TRL 1e-4).
        std: ``"unbiased"`` (n − 1), ``"biased"`` (n) or ``"none"`` (no division).
        std_scope: ``"group"`` or ``"batch"`` (grpo, unlikely, xrpo only).
        singleton: ``"zero"`` or ``"verl"``.
        nan_policy: ``"raise"`` or ``"omit"``: what a NaN / ±inf score (or unlikely / xrpo's
            mean old log-probability) does.
        mask: ``(N, T)`` response mask; when given, advantages are ``(N, T) = A_i · mask``.
            reinforce_pp_baseline whitens over its valid tokens (without it, one token per
            response); unlikely / xrpo average ``old_logprobs`` over it.
        lengths: ``(N,)`` response lengths (opo only).
        old_logprobs: ``(N, T)`` token log-probabilities of the sampling policy (unlikely, xrpo).
        r_max: ngrpo's virtual maximum reward.
        lam: unlikely's λ (default 0.25) or xrpo's λ (required).
        kappa: xrpo's κ (required for xrpo).
        backend: ``"auto"`` (C++ on CPU, Triton on CUDA), ``"cpu"``, ``"cuda"``, ``"triton"``
            (on CPU tensors: the Triton interpreter) or ``"torch"`` (the reference).

    Returns:
        :class:`GroupAdvantages` ``(advantages, group_mean, group_std, zero_variance_mask)``.

    Raises:
        TypeError: an argument of the wrong type or dtype (e.g. float group_ids).
        ValueError: wrong shapes, both or neither of group_ids / group_size, a group_size that
        does not divide N, an unknown option, an option the estimator does not take, missing
        ``lengths`` for opo, non-finite scores (or old log-probabilities at valid tokens) under
        ``nan_policy="raise"``, a singleton group for grpo_passk under ``singleton="verl"``, a
        tensor argument on another device than ``scores``.

    Example::

        >>> rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
        >>> uid = torch.tensor([7, 7, 3, 3, 7, 3])           # shuffled, not dense
        >>> out = rlkern.group_advantages(rewards, group_ids=uid)
        >>> out.advantages                                    # doctest: +SKIP
        tensor([ 0.5773, -1.1547, -1.1547,  0.5773,  0.5773,  0.5773])
    """
    scores = check_tensor(scores, "scores")
    if scores.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"scores must be bfloat16, float16, float32 or float64, got {scores.dtype}")
    if scores.dim() not in (1, 2):
        raise ValueError(f"scores must have shape (N,) or (N, T), got {tuple(scores.shape)}")
    n = scores.shape[0]
    device = scores.device
    ids, size = check_grouping(n, group_ids, group_size, device)
    cfg, flags, hparams = config_and_args(
        estimator=estimator, eps=eps, std=std, std_scope=std_scope, singleton=singleton,
        nan_policy=nan_policy, r_max=r_max, lam=lam, kappa=kappa)
    cfg.check_inputs(lengths=lengths is not None, old_logprobs=old_logprobs is not None)
    token_shape: tuple[int, ...] = tuple(scores.shape) if scores.dim() == 2 else ()
    if mask is not None:
        mask = _check_mask(mask, token_shape, device)
        if mask.shape[0] != n:
            raise ValueError(f"mask must have N = {n} rows, got {tuple(mask.shape)}")
    elif scores.dim() == 2:
        raise ValueError("token-level scores (N, T) need mask (N, T): advantages are returned "
                         "per token as A_i · mask")
    if cfg.uses_loglik and mask is None:
        raise ValueError(f"estimator={estimator!r} needs mask (N, T) to average old_logprobs")

    # Advantages are not differentiable (rewards carry no gradient): no input's autograd graph
    # reaches the outputs, so they never require grad (backward would fail inside the op).
    scores = scores.detach() if scores.requires_grad else scores
    mask = mask.detach() if mask is not None else None
    lengths = lengths.detach() if isinstance(lengths, Tensor) else lengths
    old_logprobs = old_logprobs.detach() if isinstance(old_logprobs, Tensor) else old_logprobs
    double_output = acc_dtype(scores.dtype) == torch.float64
    if scores.dim() == 2:
        s = scores.sum(-1, dtype=torch.float64)
    else:
        s = scores if scores.dtype in (torch.float32, torch.float64) else scores.float()
        s = s.contiguous()
    weights = loglik = None
    if estimator == "opo":
        weights = _check_float(lengths, "lengths", (n,), device).to(torch.float64).contiguous()
    elif estimator == "reinforce_pp_baseline" and mask is not None:
        weights = mask.sum(-1, dtype=torch.float64)
    if old_logprobs is not None:
        _check_float(old_logprobs, "old_logprobs", tuple(mask.shape), device)
        loglik = sequence_loglik(old_logprobs, mask)
    resolved = backends.resolve_backend(backend, device)
    adv, mean, sd, zv = eager.call("rlkern::group_advantages", s, ids, size, weights, loglik,
                                   flags, hparams, double_output, resolved)
    if mask is not None:
        adv = adv.unsqueeze(-1) * mask.to(adv.dtype)
    return GroupAdvantages(adv, mean, sd, zv)
