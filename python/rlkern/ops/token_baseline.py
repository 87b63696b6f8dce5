"""verl's optimal token baseline (OTB) and its multi-turn variant (TIR-OTB) as one op.

:func:`optimal_token_baseline` computes, per response ``i`` and token ``t`` (valid tokens
only; ``k`` aligns the tokens of a group's responses, see below)::

    G[i,t] = Σ_{s≥t, valid} r[i,s]                               reward-to-go (returns)
    w[i,t] = (1 − 2·π[i,t] + Σπ²[i,t]) · ρ[i,t]²,  π = exp(logprobs), ρ: rollout IS weights
    W[i,t] = Σ_{s≤t, valid} w[i,s]                               cumulative path variance
    B_g[k] = Σ_{j∈g, valid} G[j,k]·W[j,k] / (Σ_{j∈g, valid} W[j,k] + eps)
    A[i,t] = G[i,t] − B_{g(i)}[k(t)]   (0 at padding)

``multi_turn=False`` (verl's ``optimal_token_baseline``): ``k = t``, responses are aligned by
position; every row belongs to its group. ``multi_turn=True`` (verl's
``tir_optimal_token_baseline``): ``k`` is the rank of ``t`` among the row's valid tokens (the
valid tokens of each response are compacted, so tool-output gaps do not misalign turns), and
rows without valid tokens belong to no group. A group of one row gets ``B = 0``
(``A = G``). ``zero_tail`` (verl's ``handle_zero_tail``, default True in both of verl's
functions): when exactly one row of a group has the most valid tokens, ``L_max``, and
``L_max`` exceeds the next length ``L_2nd``, that row's baseline is 0 from ``k = L_2nd`` on
(no other response estimates its tail).

Backends (no backend computes anything but the formula above):

* ``"cpu"`` (``"auto"`` on CPU tensors): the C++ kernel
  ``torch.ops.rlkern.optimal_token_baseline_out`` (csrc/cpu/token_baseline.cpp): float64
  accumulation, threads over groups, groups found by rlkern's hash grouping of int64 ids
  (results independent of the thread count).
* ``"torch"``: the float64 reference (``rlkern.reference.token_baseline``), vectorised
  (``index_add`` over (group, k)); runs on any device, CUDA included.
* ``"triton"`` (``"auto"`` on CUDA tensors; on CPU tensors the Triton interpreter): the kernels
  of ``rlkern.kernels.token_baseline`` — one program per row for ``G`` and ``W`` (float64
  scratch rows at the aligned index), one per (group, block of k) for the group sums and the
  writes; rows visited group after group (``unique`` + stable ``argsort`` of the ids).
* ``"cuda"``: no CUDA C++ kernel; it raises :class:`rlkern.BackendUnavailableError`.

Not differentiable (advantages carry no gradient).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from rlkern import backends
from rlkern.config.dtypes import FLOAT_DTYPES, bool_mask
from rlkern.ops import eager
from rlkern.ops.advantages import check_devices, check_grouping, check_tensor
from rlkern.ops.advantages_segmented import segments

__all__ = ["TokenBaseline", "optimal_token_baseline"]


class TokenBaseline(NamedTuple):
    """``advantages = G − B`` (0 at padding) and ``returns = G`` (reward-to-go), ``(N, T)``."""

    advantages: Tensor
    returns: Tensor


def _triton_otb(rewards: Tensor, mask: Tensor, logprobs: Tensor, sum_pi_squared: Tensor,
                is_weights: Tensor | None, group_ids: Tensor | None, group_size: int,
                multi_turn: bool, zero_tail: bool, eps: float, adv: Tensor,
                ret: Tensor) -> None:
    """The Triton kernels (``rlkern.kernels.token_baseline``): rows visited group after group
    (``segments``: one ``unique`` + stable ``argsort`` for ids), float64 scratch rows."""
    n, t = rewards.shape
    if group_ids is None:
        num_groups = n // group_size
        perm = torch.arange(n, device=rewards.device)
        offsets = torch.arange(0, n + 1, group_size, device=rewards.device)
    else:
        seg = segments(group_ids, 0, n)
        num_groups, perm, offsets = seg.num_groups, seg.perm, seg.offsets
    scratch_g = torch.zeros(n, t, dtype=torch.float64, device=rewards.device)
    scratch_w = torch.zeros_like(scratch_g)
    pos = torch.empty((n, t) if multi_turn else (1,), dtype=torch.int32, device=rewards.device)
    lengths = torch.empty(n, dtype=torch.int64, device=rewards.device)
    adv.zero_()
    backends.triton_module("token_baseline", rewards.device).optimal_token_baseline(
        rewards, mask, logprobs, sum_pi_squared, is_weights, perm, offsets, num_groups, adv,
        ret, scratch_g, scratch_w, pos, lengths, multi_turn=multi_turn, zero_tail=zero_tail,
        eps=eps)


@eager.custom_op("rlkern::optimal_token_baseline", mutates_args=())
def optimal_token_baseline_op(rewards: Tensor, mask: Tensor, logprobs: Tensor,
                              sum_pi_squared: Tensor, is_weights: Tensor | None,
                              group_ids: Tensor | None, group_size: int, multi_turn: bool,
                              zero_tail: bool, eps: float, backend: str,
                              ) -> tuple[Tensor, Tensor]:
    check_devices("rewards", rewards, mask=mask, logprobs=logprobs,
                  sum_pi_squared=sum_pi_squared, is_weights=is_weights, group_ids=group_ids)
    adv, ret = torch.empty_like(rewards), torch.empty_like(rewards)
    if rewards.numel() == 0:
        return adv, ret
    if backend == "cpu":
        backends.cpp_ops().optimal_token_baseline_out(
            rewards, mask, logprobs, sum_pi_squared, is_weights, group_ids, group_size,
            multi_turn, zero_tail, eps, adv, ret)
    elif backend == "triton":
        _triton_otb(rewards, mask, logprobs, sum_pi_squared, is_weights, group_ids, group_size,
                    multi_turn, zero_tail, eps, adv, ret)
    elif backend == "cuda":
        raise backends.BackendUnavailableError(
            "optimal_token_baseline has no cuda kernel; use backend='triton' (the default on "
            "CUDA tensors) or backend='torch' (the float64 reference, vectorised)")
    else:
        from rlkern.reference.token_baseline import optimal_token_baseline_reference

        a, r = optimal_token_baseline_reference(
            rewards, mask, logprobs, sum_pi_squared, group_ids=group_ids,
            group_size=group_size or None, rollout_is_weights=is_weights,
            multi_turn=multi_turn, zero_tail=zero_tail, eps=eps)
        adv.copy_(a)
        ret.copy_(r)
    return adv, ret


@optimal_token_baseline_op.register_fake
def _(rewards, mask, logprobs, sum_pi_squared, is_weights, group_ids, group_size, multi_turn,
      zero_tail, eps, backend):
    check_devices("rewards", rewards, mask=mask, logprobs=logprobs,
                  sum_pi_squared=sum_pi_squared, is_weights=is_weights, group_ids=group_ids)
    return torch.empty_like(rewards), torch.empty_like(rewards)


def _float_like(t: object, name: str, shape: tuple[int, ...], ref: Tensor,
                dtype: torch.dtype) -> Tensor:
    t = check_tensor(t, name)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be bfloat16, float16, float32 or float64, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} (that of rewards), got "
                         f"{tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but rewards on {ref.device}")
    return t.detach().to(dtype).contiguous()


def optimal_token_baseline(
    rewards: Tensor, mask: Tensor, logprobs: Tensor, sum_pi_squared: Tensor, *,
    group_ids: Tensor | None = None, group_size: int | None = None,
    rollout_is_weights: Tensor | None = None, multi_turn: bool = False,
    zero_tail: bool = True, eps: float = 1e-8, backend: str = "auto",
) -> TokenBaseline:
    r"""verl's optimal token baseline: per-group, per-token baselines weighted by each
    trajectory's cumulative path variance (formula in the module docstring).

    Args:
        rewards: ``(N, T)`` token-level rewards (verl's ``token_level_rewards``).
        mask: ``(N, T)`` bool / 0-1 validity (verl's ``response_mask``; nonzero = valid).
        logprobs: ``(N, T)`` log-probabilities of the sampled tokens under the policy that
            generated them (verl's ``old_log_probs``).
        sum_pi_squared: ``(N, T)`` ``Σ_v π_v²`` of each token's distribution (verl's actor
            with ``calculate_sum_pi_squared=True``).
        group_ids, group_size: the groups (exactly one): int64 ids per response (any values;
            verl's uid strings through :func:`rlkern.integrations.verl.group_ids_from_index`)
            or contiguous groups of ``group_size`` rows.
        rollout_is_weights: optional ``(N, T)`` rollout importance weights ρ; ``w`` is scaled
            by ``ρ²`` (verl's truncated-IS correction).
        multi_turn: align a group's responses by valid-token rank (verl's
            ``tir_optimal_token_baseline``) instead of by position.
        zero_tail: verl's ``handle_zero_tail`` (see the module docstring).
        eps: added to the denominator (verl's ``epsilon``, default 1e-8).
        backend: ``"auto"``, ``"cpu"``, ``"triton"`` or ``"torch"`` (``"cuda"`` raises).

    Returns:
        :class:`TokenBaseline` ``(advantages, returns)``, each ``(N, T)`` float32 (float64
        when ``rewards`` is float64; bf16 / fp16 inputs are read as float32).

    Example::

        >>> r = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
        >>> m = torch.ones(2, 2, dtype=torch.bool)
        >>> lp = torch.full((2, 2), -1.0)
        >>> rlkern.optimal_token_baseline(r, m, lp, torch.full((2, 2), 0.3),
        ...                               group_size=2).advantages
        tensor([[ 0.5000,  0.5000],
                [-0.5000, -0.5000]])
    """
    x = check_tensor(rewards, "rewards")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"rewards must be bfloat16, float16, float32 or float64, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"rewards must have shape (N, T), got {tuple(x.shape)}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    shape = tuple(x.shape)
    m = check_tensor(mask, "mask")
    if m.dtype.is_complex:
        raise TypeError(f"mask must be bool, integer or float, got {m.dtype}")
    if tuple(m.shape) != shape:
        raise ValueError(f"mask must have shape {shape} (that of rewards), got {tuple(m.shape)}")
    if m.device != x.device:
        raise ValueError(f"mask is on {m.device} but rewards on {x.device}")
    lp = _float_like(logprobs, "logprobs", shape, x, dtype)
    sp = _float_like(sum_pi_squared, "sum_pi_squared", shape, x, dtype)
    rho = None if rollout_is_weights is None else _float_like(
        rollout_is_weights, "rollout_is_weights", shape, x, dtype)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    ids, size = check_grouping(shape[0], group_ids, group_size, x.device, "rewards")
    resolved = backends.resolve_backend(backend, x.device)
    adv, ret = eager.call(
        "rlkern::optimal_token_baseline", x.detach().to(dtype).contiguous(),
        bool_mask(m.detach()), lp, sp, rho, ids, size, bool(multi_turn), bool(zero_tail),
        float(eps), resolved)
    return TokenBaseline(adv, ret)
