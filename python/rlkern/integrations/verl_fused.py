"""rlkern in verl's fused actor path: per-token log-probabilities and entropy from the hidden
states and the LM head, without a logits tensor.

verl's actor computes ``log π(y_t)`` and the entropy of every response token. Its default path
materialises the ``(tokens, V)`` logits (plus their float32 upcast and the softmax for the
entropy). With ``actor_rollout_ref.model.use_fused_kernels=True`` verl instead patches the
model's ``forward`` to hand the last hidden states and ``lm_head.weight`` to a fused function:
``FusedLinearForPPO`` (``fused_kernel_options.impl_backend=torch``, chunked but still
materialising a chunk's logits and their softmax twice in the backward) or
``verl.utils.kernel.linear_cross_entropy`` (``impl_backend=triton``, CUDA only).
:func:`patch_fused_kernels` makes both routes call :func:`fused_linear_for_ppo`, i.e.
:func:`rlkern.linear_logprobs` with the entropy — tile by tile, one logits tile alive at a
time, exact gradients for the hidden states and the weight — so the fused path runs on CPU and
GPU and keeps verl's outputs: ``log_probs`` float32 and ``entropy`` as verl's backend returns it
(the hidden dtype for ``torch``, float32 for ``triton``), shaped like the labels.

Config lines (see docs/integrations/verl.md)::

    actor_rollout_ref.model.use_fused_kernels=True
    actor_rollout_ref.model.fused_kernel_options.impl_backend=torch   # or triton (on CUDA)
    # and in every verl process (the actor runs in a Ray worker):
    export VERL_USE_EXTERNAL_MODULES=rlkern.integrations.verl_plugin
    export RLKERN_VERL_PATCH_FUSED=1
    # optional, truncated support: the rollout's filters (e.g. its top_k / top_p)
    export RLKERN_VERL_TRUNCATED_SUPPORT="top_k=50,top_p=0.9"

verl is imported lazily, when a patch function is called.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from rlkern.ops.linear_logprobs import linear_logprobs
from rlkern.ops.linear_truncated import active_filters

__all__ = ["fused_linear_for_ppo", "is_fused_patched", "parse_filters", "patch_fused_kernels",
           "unpatch_fused_kernels"]


def fused_linear_for_ppo(hidden_states: Tensor, vocab_weights: Tensor, input_ids: Tensor,
                         temperature: float = 1.0, *, entropy_dtype: torch.dtype | None = None,
                         backend: str = "auto") -> tuple[Tensor, Tensor]:
    """``(log_probs, entropy)`` of ``softmax(hidden_states @ vocab_weights.T / temperature)``
    at ``input_ids``, without forming the logits (ALGORITHMS.md §1, fused linear form).

    Args:
        hidden_states: ``(B, L, H)`` or ``(N, H)``, any float dtype.
        vocab_weights: ``(V, H)`` LM-head weight, same dtype.
        input_ids: ``hidden_states.shape[:-1]`` integer token ids in ``[0, V)`` (verl's labels,
            the input ids rolled by one; every position is a valid id).
        temperature: ``T > 0`` (a float, as verl passes it).
        entropy_dtype: dtype of the returned entropy (default: float32, float64 for float64
            inputs).
        backend: :func:`rlkern.linear_logprobs`'s backend (``"auto"``: CPU tensors → ``"cpu"``,
            CUDA tensors → ``"triton"``).

    With the sampler's filters set by ``patch_fused_kernels(top_k=, top_p=, min_p=)`` the
    values are those of the truncated, renormalised distribution (a label outside the kept
    set: −inf).

    Returns:
        ``log_probs`` float32 and ``entropy`` (``entropy_dtype``), both shaped like
        ``input_ids``; differentiable wrt ``hidden_states`` and ``vocab_weights``.
    """
    if input_ids.shape != hidden_states.shape[:-1]:
        raise ValueError(f"input_ids shape {tuple(input_ids.shape)} must match hidden_states "
                         f"shape {tuple(hidden_states.shape[:-1])}")
    out = linear_logprobs(hidden_states, vocab_weights, input_ids.to(torch.int64),
                          temperature=float(temperature), return_entropy=True,
                          backend=backend, **_FILTERS)
    entropy = out.entropy if entropy_dtype is None else out.entropy.to(entropy_dtype)
    return out.logprobs.float(), entropy


def _torch_backend_forward(self: Any, hidden_states: Tensor, vocab_weights: Tensor,
                           input_ids: Tensor, temperature: float = 1.0,
                           ) -> tuple[Tensor, Tensor]:
    """``FusedLinearForPPO.forward`` (verl's ``torch`` / ``liger`` backends): its entropy
    comes in the hidden states' dtype."""
    return fused_linear_for_ppo(hidden_states, vocab_weights, input_ids, temperature,
                                entropy_dtype=hidden_states.dtype)


def _triton_backend(hidden: Tensor, weight: Tensor, labels: Tensor,
                    temperature: float | None = 1.0, reduction: str | None = "none",
                    dist_process_group: Any = None) -> tuple[Tensor, Tensor]:
    """``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` with ``reduction="none"``
    (the only one verl's actor uses): float32 log-probs and entropy."""
    if reduction is not None and reduction.lower() != "none":
        raise ValueError(f"rlkern's fused actor path computes per-token values only; got "
                         f"reduction={reduction!r}")
    if dist_process_group is not None:
        raise ValueError("rlkern's verl fused path takes the full LM head; pass "
                         "dist_process_group=None (or use rlkern.linear_logprobs with "
                         "process_group directly)")
    return fused_linear_for_ppo(hidden, weight, labels, 1.0 if temperature is None
                                else temperature)


# (owner, attribute, verl's original) for every swap made by patch_fused_kernels
_PATCHED: list[tuple[Any, str, Any]] = []
# the rollout's sampling filters the fused path applies (patch_fused_kernels(top_k=, ...))
_FILTERS: dict[str, int | float] = {}


def _targets() -> list[tuple[Any, str, Callable[..., Any]]]:
    from verl.utils.experimental import torch_functional as verl_exp

    targets: list[tuple[Any, str, Callable[..., Any]]] = [
        (verl_exp.FusedLinearForPPO, "forward", _torch_backend_forward)]
    try:  # the Triton route's module imports its CUDA kernels lazily; absent in old verls
        from verl.utils.kernel import linear_cross_entropy as verl_lce
    except ImportError:
        return targets
    targets.append((verl_lce, "linear_cross_entropy", _triton_backend))
    return targets


def patch_fused_kernels(*, top_k: int | None = None, top_p: float | None = None,
                        min_p: float | None = None) -> list[str]:
    """Route verl's fused actor path (``use_fused_kernels=True``, both ``impl_backend``
    values) through :func:`fused_linear_for_ppo`. verl's model forwards import the fused
    function at call time, so this works whenever it is called before the first forward.

    ``top_k`` / ``top_p`` / ``min_p`` (truncated support): the rollout's sampling filters —
    ``actor_rollout_ref.rollout.top_k`` / ``top_p`` (and ``min_p``; verl's "off" values
    ``top_k`` ≤ 0, ``top_p`` 1, ``min_p`` 0 are off) — so that every log-probability of the
    fused path (the actor's old and current ones; the reference model's too when it runs the
    fused path) is that of the sampler's truncated distribution, matching a rollout engine
    that reports processed log-probabilities (vLLM ``logprobs_mode="processed_logprobs"``).
    A later call replaces the filters (none: off).

    Idempotent. Returns the patched ``owner.attribute`` names.
    """
    _FILTERS.clear()
    _FILTERS.update(active_filters(top_k, top_p, min_p))
    done = {(id(owner), attr) for owner, attr, _ in _PATCHED}
    for owner, attr, replacement in _targets():
        if (id(owner), attr) in done:
            continue
        _PATCHED.append((owner, attr, owner.__dict__[attr]))
        setattr(owner, attr, replacement)
    return [f"{getattr(o, '__name__', o)}.{a}" for o, a, _ in _PATCHED]


def parse_filters(spec: str) -> dict[str, float]:
    """``"top_k=50,top_p=0.9"`` (``RLKERN_VERL_TRUNCATED_SUPPORT``) → keyword arguments of
    :func:`patch_fused_kernels`; ``""`` → none. Unknown names raise ``ValueError``."""
    out: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in ("top_k", "top_p", "min_p"):
            raise ValueError(f"RLKERN_VERL_TRUNCATED_SUPPORT: expected top_k=, top_p=, min_p= "
                             f"items, got {item!r}")
        out[name.strip()] = float(value)
    return out


def unpatch_fused_kernels() -> None:
    """Put verl's fused functions back (and clear the filters). Idempotent."""
    _FILTERS.clear()
    while _PATCHED:
        owner, attr, original = _PATCHED.pop()
        setattr(owner, attr, original)


def is_fused_patched() -> bool:
    return bool(_PATCHED)
