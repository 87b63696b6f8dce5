"""Token-, step- and turn-level advantage helpers (ALGORITHMS.md §2.1), each one fused kernel.

Public functions: :func:`discounted_returns`, :func:`gae` (GAE with verl's masked carry;
REINFORCE++ and ReMax returns as its special cases), :func:`position_baseline` (IGPO),
:func:`gtpo_weights` (GTPO / GRPO-S), :func:`gigpo_advantages` (GiGPO),
:func:`empg_modulate` (EMPG). Each has a functional registered op ``torch.ops.rlkern.<name>``
(with a fake implementation, so ``torch.compile(fullgraph=True)`` traces through it) that
dispatches to the C++ ``<name>_out`` kernel on CPU (and on CUDA for ``backend="cuda"``
where one exists: discounted returns, GAE), the Triton kernels of
``rlkern.kernels.token_advantages`` (``backend="triton"``, the default on CUDA; GiGPO uses the
group kernels of ``rlkern.kernels.advantages``) or the float64 reference (``backend="torch"``,
imported by that branch only). None is differentiable: they shape rewards and advantages,
which carry no gradient.

Float inputs may be bfloat16 / float16 / float32 / float64; outputs are float32 (float64 for
float64 inputs); accumulation is float64 on CPU.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from rlkern import backends
from rlkern.config.advantages import GIGPO_MODES, code, codes
from rlkern.config.dtypes import FLOAT_DTYPES, INDEX_DTYPES, acc_dtype, bool_mask
from rlkern.ops import eager
from rlkern.ops.advantages import check_devices, check_grouping, check_tensor
from rlkern.ops.advantages_segmented import gigpo_segmented, segments

__all__ = ["GAEAdvantages", "GTPOWeights", "GiGPOAdvantages", "discounted_returns",
           "empg_modulate", "gae", "gigpo_advantages", "gtpo_weights", "position_baseline"]

class GAEAdvantages(NamedTuple):
    """The raw (unwhitened) GAE ``advantages`` and ``returns = advantages + values``,
    ``(N, T)`` each."""

    advantages: Tensor
    returns: Tensor


class GTPOWeights(NamedTuple):
    """``weight = H / Σ_g H`` and ``inverse_weight = h / Σ_g h`` (``h = 1/max(H, eps)``),
    position-wise over each group's valid tokens; ``(N, T)`` each."""

    weight: Tensor
    inverse_weight: Tensor


class GiGPOAdvantages(NamedTuple):
    """``advantages = episode_advantages + omega · step_advantages``, each ``(S,)``."""

    advantages: Tensor
    episode_advantages: Tensor
    step_advantages: Tensor


def _float_input(t: object, name: str) -> Tensor:
    """A float input, detached: these helpers are not differentiable, so no input's autograd
    graph reaches their outputs (which then never require grad)."""
    t = check_tensor(t, name)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be bfloat16, float16, float32 or float64, got {t.dtype}")
    return t.detach()


def _kernel_dtype(t: Tensor) -> Tensor:
    """float32 / float64, contiguous (bf16 and fp16 are widened: the kernels take fp32)."""
    t = t if t.dtype in (torch.float32, torch.float64) else t.float()
    return t.contiguous()


def _same(t: object, name: str, shape: tuple[int, ...], ref: Tensor, *, bool_like: bool = False,
          ) -> Tensor:
    t = check_tensor(t, name)
    if bool_like and t.dtype.is_complex:
        raise TypeError(f"{name} must be bool, integer or float, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but the main input on {ref.device}")
    return t


def _scalar(value: object, name: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def _triton(device: torch.device):
    return backends.triton_module("token_advantages", device)


def _cuda_kernels_or_raise() -> None:
    if not backends.has_cuda_kernels():
        raise backends.BackendUnavailableError(
            "backend='cuda' needs rlkern._C built with the CUDA kernels; backend='triton' "
            "runs on any GPU")


def _no_cuda_kernel(name: str) -> None:
    raise backends.BackendUnavailableError(
        f"{name} has no CUDA C++ kernel; on GPUs use backend='triton' (the default)")


# ---------------------------------------------------------------------------------- returns


@eager.custom_op("rlkern::discounted_returns", mutates_args=())
def discounted_returns_op(rewards: Tensor, reset: Tensor | None, gamma: float,
                          backend: str) -> Tensor:
    check_devices("rewards", rewards, reset=reset)
    out = torch.empty_like(rewards)
    if rewards.numel() == 0:
        return out
    if backend == "cpu":
        backends.cpp_ops().discounted_returns_out(rewards, reset, gamma, out)
    elif backend == "triton":
        _triton(rewards.device).discounted_returns(rewards, reset, out, gamma=gamma)
    elif backend == "cuda":
        _cuda_kernels_or_raise()
        backends.cpp_ops().discounted_returns_out(rewards, reset, gamma, out)
    else:
        from rlkern.reference.token_advantages import discounted_returns_reference

        out.copy_(discounted_returns_reference(rewards, gamma=gamma, reset=reset))
    return out


@discounted_returns_op.register_fake
def _(rewards, reset, gamma, backend):
    check_devices("rewards", rewards, reset=reset)
    return torch.empty_like(rewards)


def discounted_returns(rewards: Tensor, *, gamma: float, reset: Tensor | None = None,
                       backend: str = "auto") -> Tensor:
    r"""Discounted returns with resets, one reverse scan per row::

        G[i, t] = r[i, t] + gamma · G[i, t + 1]      (G[i, t + 1] dropped where reset[i, t])

    ``reset[i, t] = True`` marks position ``t`` as the last of a segment (a turn's end in
    multi-turn rollouts, the end of a response before padding), so no return flows across it:
    where ``reset`` is set, and everywhere for ``gamma = 0``, ``G[i, t] = r[i, t]`` exactly,
    even when ``G[i, t + 1]`` is ±inf or NaN.
    Used for IGPO / multi-turn turn rewards, GiGPO's step returns and PRIME's token returns.

    Args:
        rewards: ``(N, T)`` float rewards.
        gamma: discount factor (finite; typically in [0, 1]).
        reset: optional ``(N, T)`` segment-end flags of any dtype (nonzero = an end).
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``(N, T)`` returns, float32 (float64 for float64 rewards); accumulated in float64 on CPU.

    Example::

        >>> r = torch.tensor([[0.0, 0.0, 1.0, 0.0, 2.0]])
        >>> rlkern.discounted_returns(r, gamma=0.5, reset=torch.tensor([[0, 0, 1, 0, 0]]))
        tensor([[0.2500, 0.5000, 1.0000, 1.0000, 2.0000]])
    """
    rewards = _float_input(rewards, "rewards")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape (N, T), got {tuple(rewards.shape)}")
    gamma = _scalar(gamma, "gamma")
    if reset is not None:
        reset = _same(reset, "reset", tuple(rewards.shape), rewards, bool_like=True)
        reset = bool_mask(reset)
    resolved = backends.resolve_backend(backend, rewards.device)
    return eager.call("rlkern::discounted_returns", _kernel_dtype(rewards), reset, gamma, resolved)


# --------------------------------------------------------------------------------------- GAE


@eager.custom_op("rlkern::gae", mutates_args=())
def gae_op(rewards: Tensor, values: Tensor | None, mask: Tensor, gamma: float, lam: float,
           backend: str) -> tuple[Tensor, Tensor]:
    check_devices("rewards", rewards, values=values, mask=mask)
    adv, ret = torch.empty_like(rewards), torch.empty_like(rewards)
    if rewards.numel() == 0:
        return adv, ret
    if backend in ("cpu", "cuda"):
        if backend == "cuda":
            _cuda_kernels_or_raise()
        backends.cpp_ops().gae_out(rewards, values, mask, gamma, lam, adv, ret)
    elif backend == "triton":
        _triton(rewards.device).gae(rewards, values, mask, adv, ret, gamma=gamma, lam=lam)
    else:
        from rlkern.reference.token_advantages import gae_reference

        for out, ref in zip((adv, ret), gae_reference(rewards, values, mask, gamma=gamma,
                                                      lam=lam), strict=True):
            out.copy_(ref)
    return adv, ret


@gae_op.register_fake
def _(rewards, values, mask, gamma, lam, backend):
    check_devices("rewards", rewards, values=values, mask=mask)
    return tuple(torch.empty_like(rewards) for _ in range(2))


def gae(rewards: Tensor, values: Tensor | None, mask: Tensor, *, gamma: float, lam: float,
        backend: str = "auto") -> GAEAdvantages:
    r"""Generalised advantage estimation (Schulman et al. 2016) with verl's carry over masked
    tokens, one reverse scan per row (``t = T−1 … 0``, carries ``nv = lg = 0`` at the end)::

        δ_t = r_t + γ·nv − V_t,      g = δ_t + γλ·lg
        where mask_t:  nv ← V_t,  lg ← g          (masked t: both carried unchanged)
        advantages_t = lg,           returns_t = advantages_t + V_t

    A masked position (an observation span of a multi-turn rollout, padding) contributes no
    TD error and takes the advantage of the next valid position after it (0 after the last);
    this is verl's ``compute_gae_advantage_return`` before its whitening, so that
    ``masked_whiten(advantages, mask)`` gives verl's advantages. Special cases:

    * REINFORCE++ (verl): ``values=None, lam=1`` → ``advantages`` is the discounted return
      carried over masked tokens; verl's returns are ``advantages · mask``.
    * ReMax (verl): ``values=None, gamma=lam=1`` → the reverse cumulative sum of ``r·mask``.

    A zero factor drops its carry exactly (γ = 0: ``δ_t = r_t − V_t`` even after a ±inf value).

    Args:
        rewards: ``(N, T)`` float token rewards.
        values: ``(N, T)`` float value estimates, or None (V = 0).
        mask: ``(N, T)`` bool or 0/1 response mask (0 = observation / padding token).
        gamma: discount γ (finite), lam: GAE λ (finite); typically in [0, 1].
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"``.

    Returns:
        :class:`GAEAdvantages` ``(advantages, returns)``, ``(N, T)`` float32 each (float64 when
        an input is float64); accumulated in float64 by every backend; no gradient.

    Example::

        >>> r = torch.tensor([[0.0, 0.0, 1.0]])
        >>> v = torch.tensor([[0.5, 0.5, 0.5]])
        >>> out = rlkern.gae(r, v, torch.tensor([[1, 0, 1]]), gamma=1.0, lam=1.0)
        >>> out.advantages
        tensor([[0.5000, 0.5000, 0.5000]])
        >>> out.returns
        tensor([[1., 1., 1.]])
    """
    rewards = _float_input(rewards, "rewards")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape (N, T), got {tuple(rewards.shape)}")
    shape = tuple(rewards.shape)
    if values is not None:
        values = _float_input(_same(values, "values", shape, rewards), "values")
    mask = _same(mask, "mask", shape, rewards, bool_like=True)
    gamma, lam = _scalar(gamma, "gamma"), _scalar(lam, "lam")
    dtype = acc_dtype(rewards.dtype, *(() if values is None else (values.dtype,)))
    resolved = backends.resolve_backend(backend, rewards.device)
    return GAEAdvantages(*eager.call(
        "rlkern::gae", rewards.to(dtype).contiguous(),
        None if values is None else values.to(dtype).contiguous(),
        bool_mask(mask.detach()), gamma, lam, resolved))


# ---------------------------------------------------------------------- position baseline


@eager.custom_op("rlkern::position_baseline", mutates_args=())
def position_baseline_op(returns: Tensor, mask: Tensor, group_ids: Tensor | None,
                         group_size: int, backend: str) -> Tensor:
    check_devices("returns", returns, mask=mask, group_ids=group_ids)
    out = torch.empty_like(returns)
    if returns.numel() == 0:
        return out
    if backend == "cpu":
        backends.cpp_ops().position_baseline_out(returns, mask, group_ids, group_size, out)
    elif backend == "triton":
        seg = segments(group_ids, group_size, returns.shape[0])
        _triton(returns.device).position_sums(returns, mask, seg.perm, seg.offsets,
                                              seg.group_size, seg.num_groups, out, None,
                                              gtpo=False)
    elif backend == "cuda":
        _no_cuda_kernel("position_baseline")
    else:
        from rlkern.reference.token_advantages import position_baseline_reference

        out.copy_(position_baseline_reference(returns, mask, group_ids=group_ids,
                                              group_size=group_size or None))
    return out


@position_baseline_op.register_fake
def _(returns, mask, group_ids, group_size, backend):
    check_devices("returns", returns, mask=mask, group_ids=group_ids)
    return torch.empty_like(returns)


def _token_inputs(x: Tensor, name: str, mask: Tensor, group_ids, group_size):
    x = _float_input(x, name)
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (N, T), got {tuple(x.shape)}")
    mask = _same(mask, "mask", tuple(x.shape), x, bool_like=True)
    ids, size = check_grouping(x.shape[0], group_ids, group_size, x.device, name)
    return _kernel_dtype(x), bool_mask(mask), ids, size


def position_baseline(returns: Tensor, mask: Tensor, *, group_ids: Tensor | None = None,
                      group_size: int | None = None, backend: str = "auto") -> Tensor:
    r"""Position-wise group baseline (IGPO)::

        A[i, t] = G[i, t] − mean_{j ∈ g(i), mask[j, t]} G[j, t]      (0 where mask[i, t] = 0)

    Each token's return is compared with the returns of the other responses of its group at the
    same position. Groups are contiguous (``group_size``) or given by int64 ``group_ids``.

    Args:
        returns: ``(N, T)`` float (e.g. from :func:`discounted_returns`).
        mask: ``(N, T)`` bool / 0-1 validity.
        group_ids, group_size: the groups (exactly one).
        backend: ``"auto"``, ``"cpu"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``(N, T)`` float32 (float64 for float64 returns).

    Example::

        >>> G = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
        >>> rlkern.position_baseline(G, torch.tensor([[1, 1], [1, 0]]), group_size=2)
        tensor([[-1.,  0.],
                [ 1.,  0.]])
    """
    x, m, ids, size = _token_inputs(returns, "returns", mask, group_ids, group_size)
    resolved = backends.resolve_backend(backend, x.device)
    return eager.call("rlkern::position_baseline", x, m, ids, size, resolved)


# -------------------------------------------------------------------------------------- GTPO


@eager.custom_op("rlkern::gtpo_weights", mutates_args=())
def gtpo_weights_op(entropy: Tensor, mask: Tensor, group_ids: Tensor | None, group_size: int,
                    eps: float, backend: str) -> tuple[Tensor, Tensor]:
    check_devices("entropy", entropy, mask=mask, group_ids=group_ids)
    weight = torch.empty_like(entropy)
    inverse = torch.empty_like(entropy)
    if entropy.numel() == 0:
        return weight, inverse
    if backend == "cpu":
        backends.cpp_ops().gtpo_weights_out(entropy, mask, group_ids, group_size, eps, weight,
                                            inverse)
    elif backend == "triton":
        seg = segments(group_ids, group_size, entropy.shape[0])
        _triton(entropy.device).position_sums(entropy, mask, seg.perm, seg.offsets,
                                              seg.group_size, seg.num_groups, weight, inverse,
                                              gtpo=True, eps=eps)
    elif backend == "cuda":
        _no_cuda_kernel("gtpo_weights")
    else:
        from rlkern.reference.token_advantages import gtpo_weights_reference

        w, wi = gtpo_weights_reference(entropy, mask, group_ids=group_ids,
                                       group_size=group_size or None, eps=eps)
        weight.copy_(w)
        inverse.copy_(wi)
    return weight, inverse


@gtpo_weights_op.register_fake
def _(entropy, mask, group_ids, group_size, eps, backend):
    check_devices("entropy", entropy, mask=mask, group_ids=group_ids)
    return torch.empty_like(entropy), torch.empty_like(entropy)


def gtpo_weights(entropy: Tensor, mask: Tensor, *, group_ids: Tensor | None = None,
                 group_size: int | None = None, eps: float = 1e-6,
                 backend: str = "auto") -> GTPOWeights:
    r"""GTPO's entropy weights, position-wise over each group [reading: from the GTPO paper's
    description, not released code]::

        weight[i, t]         = H[i, t] / Σ_{k ∈ g, mask[k, t]} H[k, t]
        inverse_weight[i, t] = h[i, t] / Σ_{k ∈ g, mask[k, t]} h[k, t],   h = 1 / max(H, eps)

    (0 at padding and where the denominator is 0). GTPO shapes token rewards as
    ``r̃ = r_i + α·weight`` for ``r_i > 0`` and with ``inverse_weight`` for ``r_i ≤ 0``. For
    GRPO-S (sequence-level), pass the per-response mean entropy as an ``(N, 1)`` tensor.

    Args:
        entropy: ``(N, T)`` token entropies (e.g. ``token_logprobs(..., return_entropy=True)``).
        mask: ``(N, T)`` validity.
        group_ids, group_size: the groups (exactly one).
        eps: floor of H in the inverse weight.
        backend: ``"auto"``, ``"cpu"``, ``"triton"`` or ``"torch"``.

    Returns:
        :class:`GTPOWeights` ``(weight, inverse_weight)``, ``(N, T)`` each.

    Example::

        >>> H = torch.tensor([[1.0, 2.0], [3.0, 2.0]])
        >>> rlkern.gtpo_weights(H, torch.ones(2, 2), group_size=2).weight
        tensor([[0.2500, 0.5000],
                [0.7500, 0.5000]])
    """
    x, m, ids, size = _token_inputs(entropy, "entropy", mask, group_ids, group_size)
    eps = _scalar(eps, "eps")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    resolved = backends.resolve_backend(backend, x.device)
    return GTPOWeights(*eager.call("rlkern::gtpo_weights", x, m, ids, size, eps, resolved))


# ------------------------------------------------------------------------------------- GiGPO


@eager.custom_op("rlkern::gigpo_advantages", mutates_args=())
def gigpo_advantages_op(episode_returns: Tensor, step_returns: Tensor, state_keys: Tensor,
                        group_ids: Tensor, omega: float, episode_mode: int, step_mode: int,
                        eps: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    check_devices("episode_returns", episode_returns, step_returns=step_returns,
                  state_keys=state_keys, group_ids=group_ids)
    outs = tuple(torch.empty_like(episode_returns) for _ in range(3))
    if episode_returns.numel() == 0:
        return outs
    for name, x in (("episode_returns", episode_returns), ("step_returns", step_returns)):
        if backend != "cpu":  # the C++ kernel checks this itself
            bad = ~torch.isfinite(x)
            if bool(bad.any()):
                raise ValueError(f"{name}: step {int(bad.nonzero()[0])} is NaN or infinite")
    if backend == "cpu":
        backends.cpp_ops().gigpo_advantages_out(episode_returns, step_returns, state_keys,
                                                group_ids, omega, episode_mode, step_mode, eps,
                                                *outs)
    elif backend == "triton":
        std_norm = codes().gigpo_mode.std_norm
        gigpo_segmented("triton", episode_returns, step_returns, state_keys, group_ids, outs,
                        omega=omega, episode_std=episode_mode == std_norm,
                        step_std=step_mode == std_norm, eps=eps)
    elif backend == "cuda":
        _no_cuda_kernel("gigpo_advantages")
    else:
        from rlkern.reference.token_advantages import gigpo_advantages_reference

        modes = codes().gigpo_mode
        ref = gigpo_advantages_reference(episode_returns, step_returns, state_keys,
                                         group_ids=group_ids, omega=omega,
                                         mode=modes(episode_mode).name,
                                         step_mode=modes(step_mode).name, eps=eps)
        for out, key in zip(outs, ("advantages", "episode_advantages", "step_advantages"),
                            strict=True):
            out.copy_(ref[key])
    return outs


@gigpo_advantages_op.register_fake
def _(episode_returns, step_returns, state_keys, group_ids, omega, episode_mode, step_mode, eps,
      backend):
    check_devices("episode_returns", episode_returns, step_returns=step_returns,
                  state_keys=state_keys, group_ids=group_ids)
    return tuple(torch.empty_like(episode_returns) for _ in range(3))


def gigpo_advantages(episode_returns: Tensor, step_returns: Tensor, state_keys: Tensor, *,
                     group_ids: Tensor, omega: float, mode: str, step_mode: str = "std_norm",
                     eps: float = 1e-6, backend: str = "auto") -> GiGPOAdvantages:
    r"""GiGPO's two-level advantages over ``S`` steps (one row per environment step)::

        A = A_episode + omega · A_step
        A_episode = R − μ_g              (mode="mean_norm")   or (R − μ_g)/(σ_g + eps) ("std_norm")
        A_step    = (R_t − μ_sg)/(σ_sg + eps)   (step_mode="std_norm", ALGORITHMS.md)
                    or R_t − μ_sg              (step_mode="mean_norm": verl-agent's mode applies
                                                 to both levels)

    ``g`` = the prompt group of the step's episode (``group_ids``); ``sg`` = the step group: the
    steps of ``g`` whose states have the same 64-bit ``state_keys`` (an anchor-state hash).
    ``R`` is the step's episode return; the episode statistics are taken over the group's steps
    (verl-agent's default, ``compute_mean_std_cross_steps=True``). A singleton group or step
    group gets 0 at its level; σ is unbiased. Grouping is by hashing, in one pass each.

    Args:
        episode_returns: ``(S,)`` return of each step's episode.
        step_returns: ``(S,)`` discounted return from each step (:func:`discounted_returns`).
        state_keys: ``(S,)`` int64 state hashes.
        group_ids: ``(S,)`` int64 prompt-group id of each step.
        omega: weight of the step level.
        mode, step_mode: ``"mean_norm"`` or ``"std_norm"``.
        eps: added to σ.
        backend: ``"auto"``, ``"cpu"``, ``"triton"`` or ``"torch"``.

    Returns:
        :class:`GiGPOAdvantages` ``(advantages, episode_advantages, step_advantages)``.

    Raises:
        ValueError: non-finite returns, shape mismatches, unknown modes. TypeError: dtypes.

    Example::

        >>> R = torch.tensor([1.0, 1.0, 0.0, 0.0])          # two episodes of two steps
        >>> Rt = torch.tensor([0.9, 1.0, 0.5, 0.0])
        >>> keys = torch.tensor([11, 22, 11, 33])           # step 0 of both: same state
        >>> out = rlkern.gigpo_advantages(R, Rt, keys, group_ids=torch.zeros(4, dtype=torch.long),
        ...                               omega=1.0, mode="mean_norm")
        >>> out.advantages
        tensor([ 1.2071,  0.5000, -1.2071, -0.5000])
    """
    ep = _float_input(episode_returns, "episode_returns")
    if ep.dim() != 1:
        raise ValueError(f"episode_returns must have shape (S,), got {tuple(ep.shape)}")
    st = _float_input(_same(step_returns, "step_returns", tuple(ep.shape), ep), "step_returns")
    keys = _same(state_keys, "state_keys", tuple(ep.shape), ep)
    if keys.dtype not in INDEX_DTYPES:
        raise TypeError(f"state_keys must be int64 (or int32), got {keys.dtype}")
    ids, _ = check_grouping(ep.shape[0], group_ids, None, ep.device, "episode_returns")
    if group_ids is None:  # pragma: no cover - check_grouping raises first
        raise ValueError("group_ids is required")
    for name, value in (("mode", mode), ("step_mode", step_mode)):
        if value not in GIGPO_MODES:
            raise ValueError(f"{name} must be one of {GIGPO_MODES}, got {value!r}")
    omega = _scalar(omega, "omega")
    eps = _scalar(eps, "eps")
    dtype = acc_dtype(ep.dtype, st.dtype)
    resolved = backends.resolve_backend(backend, ep.device)
    out = eager.call(
        "rlkern::gigpo_advantages", ep.to(dtype).contiguous(), st.to(dtype).contiguous(),
        keys.to(torch.int64).contiguous(), ids, omega, code("gigpo_mode", mode),
        code("gigpo_mode", step_mode), eps, resolved)
    return GiGPOAdvantages(*out)


# -------------------------------------------------------------------------------------- EMPG


@eager.custom_op("rlkern::empg_modulate", mutates_args=())
def empg_modulate_op(advantages: Tensor, step_entropy: Tensor, next_step_entropy: Tensor,
                     k: float, k_f: float, zeta: float, backend: str) -> Tensor:
    check_devices("advantages", advantages, step_entropy=step_entropy,
                  next_step_entropy=next_step_entropy)
    out = torch.empty_like(advantages)
    if advantages.numel() == 0:
        return out
    bad = ~torch.isfinite(step_entropy)
    if bool(bad.any()):
        raise ValueError(f"step_entropy: step {int(bad.nonzero()[0])} is NaN or infinite")
    if backend == "cpu":
        backends.cpp_ops().empg_modulate_out(advantages, step_entropy, next_step_entropy, k, k_f,
                                             zeta, out)
    elif backend == "triton":
        _triton(advantages.device).empg_modulate(advantages, step_entropy, next_step_entropy,
                                                 out, k=k, k_f=k_f, zeta=zeta)
    elif backend == "cuda":
        _no_cuda_kernel("empg_modulate")
    else:
        from rlkern.reference.token_advantages import empg_modulate_reference

        out.copy_(empg_modulate_reference(advantages, step_entropy, next_step_entropy, k=k,
                                          k_f=k_f, zeta=zeta))
    return out


@empg_modulate_op.register_fake
def _(advantages, step_entropy, next_step_entropy, k, k_f, zeta, backend):
    check_devices("advantages", advantages, step_entropy=step_entropy,
                  next_step_entropy=next_step_entropy)
    return torch.empty_like(advantages)


def empg_modulate(advantages: Tensor, step_entropy: Tensor, next_step_entropy: Tensor, *,
                  k: float = 1.0, k_f: float = 1.0, zeta: float = 0.1,
                  backend: str = "auto") -> Tensor:
    r"""EMPG's entropy-modulated step advantages::

        Ĥ     = (H − min H) / (max H − min H)        over the batch's step_entropy (0 if all equal)
        g(H)  = exp(−k Ĥ) / mean_batch exp(−k Ĥ)
        f(H') = exp(−k_f Ĥ')                         (Ĥ' with the same min and max) [reading]
        A_mod = g(H_s) · A_s + zeta · f(H_{s+1})

    Confident steps (low entropy) get larger updates, uncertain ones smaller; the second term
    rewards steps whose successor is confident. ``next_step_entropy`` is NaN for a trajectory's
    last step (no future-clarity term).

    Args:
        advantages: ``(S,)`` step advantages (e.g. from :func:`group_advantages`).
        step_entropy: ``(S,)`` mean token entropy of each step (finite).
        next_step_entropy: ``(S,)`` the next step's mean entropy, NaN where none.
        k, k_f, zeta: the paper's defaults 1, 1, 0.1.
        backend: ``"auto"``, ``"cpu"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``(S,)`` float32 (float64 for float64 inputs).

    Example::

        >>> A = torch.tensor([1.0, -1.0])
        >>> rlkern.empg_modulate(A, torch.tensor([0.1, 2.0]), torch.tensor([2.0, float("nan")]))
        tensor([ 1.4989, -0.5379])
    """
    a = _float_input(advantages, "advantages")
    if a.dim() != 1:
        raise ValueError(f"advantages must have shape (S,), got {tuple(a.shape)}")
    h = _float_input(_same(step_entropy, "step_entropy", tuple(a.shape), a), "step_entropy")
    hn = _float_input(_same(next_step_entropy, "next_step_entropy", tuple(a.shape), a),
                      "next_step_entropy")
    k, k_f, zeta = _scalar(k, "k"), _scalar(k_f, "k_f"), _scalar(zeta, "zeta")
    dtype = acc_dtype(a.dtype, h.dtype, hn.dtype)
    resolved = backends.resolve_backend(backend, a.device)
    return eager.call("rlkern::empg_modulate", a.to(dtype).contiguous(),
                      h.to(dtype).contiguous(), hn.to(dtype).contiguous(), k, k_f, zeta,
                      resolved)
