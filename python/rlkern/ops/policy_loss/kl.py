"""The KL estimators as an op: ``rlkern::kl_penalty_fwd`` / ``kl_penalty_bwd`` (registered, with
fake implementations and autograd) and the public :func:`kl_penalty`.

Backends: ``cpu`` / ``cuda`` — ``torch.ops.rlkern.kl_penalty_{fwd,bwd}_out`` (rlkern._C);
``triton`` — ``rlkern.kernels.policy_loss.kl_penalty``; ``torch`` — the reference
(:func:`rlkern.reference.policy_loss.kl_estimate`), its gradient by autograd.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlkern import backends
from rlkern.config.dtypes import acc_dtype
from rlkern.config.layout import layout
from rlkern.config.policy_loss import canonical_kl_estimator
from rlkern.ops.policy_loss.autograd import gradients
from rlkern.ops.policy_loss.inputs import float_input, tensor_arg
from rlkern.ops.policy_loss.register import layout_tables
from rlkern.reference.policy_loss import kl_estimate

__all__ = ["kl_penalty"]


def _kl_out(backend, lp, ref, grad, kind, straight, log_clamp, value_clamp, out):
    if lp.numel() == 0:
        return
    if backend in ("cpu", "cuda"):
        if grad is None:
            backends.cpp_ops().kl_penalty_fwd_out(lp, ref, kind, straight, log_clamp,
                                                  value_clamp, out)
        else:
            backends.cpp_ops().kl_penalty_bwd_out(lp, ref, grad, kind, straight, log_clamp,
                                                  value_clamp, out)
    elif backend == "triton":
        kernels = backends.triton_module("policy_loss", lp.device)
        clamps = torch.tensor([log_clamp, value_clamp], dtype=lp.dtype, device=lp.device)
        kernels.kl_penalty(lp, ref, grad, out, clamps, kind=kind, straight_through=straight,
                           tables=layout_tables())
    else:
        estimate = lambda x: kl_estimate(x, ref, kind, straight, log_clamp, value_clamp)
        if grad is None:
            out.copy_(estimate(lp))
        else:
            out.copy_(gradients(estimate, [lp], grad)[0])


@torch.library.custom_op("rlkern::kl_penalty_fwd", mutates_args=())
def kl_penalty_fwd(logprobs: Tensor, ref_logprobs: Tensor, kind: int, straight_through: bool,
                   log_clamp: float, value_clamp: float, backend: str) -> Tensor:
    out = torch.empty_like(logprobs, memory_format=torch.contiguous_format)
    _kl_out(backend, logprobs, ref_logprobs, None, kind, straight_through, log_clamp,
            value_clamp, out)
    return out


@kl_penalty_fwd.register_fake
def _(logprobs, ref_logprobs, kind, straight_through, log_clamp, value_clamp, backend):
    return torch.empty_like(logprobs, memory_format=torch.contiguous_format)


@torch.library.custom_op("rlkern::kl_penalty_bwd", mutates_args=())
def kl_penalty_bwd(logprobs: Tensor, ref_logprobs: Tensor, grad: Tensor, kind: int,
                   straight_through: bool, log_clamp: float, value_clamp: float,
                   backend: str) -> Tensor:
    out = torch.empty_like(logprobs, memory_format=torch.contiguous_format)
    _kl_out(backend, logprobs, ref_logprobs, grad.contiguous(), kind, straight_through,
            log_clamp, value_clamp, out)
    return out


@kl_penalty_bwd.register_fake
def _(logprobs, ref_logprobs, grad, kind, straight_through, log_clamp, value_clamp, backend):
    return torch.empty_like(logprobs, memory_format=torch.contiguous_format)


def _kl_setup(ctx, inputs, output):
    lp, ref, kind, straight, log_clamp, value_clamp, backend = inputs
    ctx.save_for_backward(lp, ref)
    ctx.options = (kind, straight, log_clamp, value_clamp, backend)


def _kl_backward(ctx, grad):
    lp, ref = ctx.saved_tensors
    g = torch.ops.rlkern.kl_penalty_bwd(lp, ref, grad, *ctx.options)
    # Every estimator is a function of logp − ref: ∂/∂ref = −∂/∂logp.
    return g, (-g if ctx.needs_input_grad[1] else None), None, None, None, None, None


torch.library.register_autograd("rlkern::kl_penalty_fwd", _kl_backward, setup_context=_kl_setup)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, *, estimator: str = "k3",
               log_clamp: float | None = 20.0, value_clamp: float | None = 10.0,
               backend: str = "auto") -> Tensor:
    """Per-token KL estimate between the policy and a reference (Schulman, "Approximating KL
    divergence", 2020), differentiable wrt both inputs.

    With ``x = logp − ref``: ``k1 = x``; ``k2 = x²/2``; ``abs = |x|``;
    ``k3 = eʸ − y − 1``, ``y = clamp(ref − logp, ±log_clamp)``, clamped to ±``value_clamp``
    (verl's ``low_var_kl``; TRL's is unclamped: ``log_clamp=None, value_clamp=None``).
    A trailing ``+`` (``"k3+"``) gives the value of the estimator with the gradient of k2
    (verl's straight-through). verl's names ``kl``, ``mse``, ``low_var_kl`` are accepted.

    Args:
        logprobs, ref_logprobs: float tensors of the same shape; float32 math (float64 stays).
        estimator: one of :data:`rlkern.config.policy_loss.KL_ESTIMATORS`.

    Returns:
        The per-token values, same shape, float32 (float64 for float64 input).
    """
    kind, straight = canonical_kl_estimator(estimator)
    lp = tensor_arg(logprobs, "logprobs")
    if not lp.dtype.is_floating_point:
        raise TypeError(f"logprobs must be a floating-point tensor, got {lp.dtype}")
    dt = acc_dtype(lp.dtype)
    ref = float_input(ref_logprobs, "ref_logprobs", tuple(lp.shape), lp.device, dt)
    lp = lp.to(dt).contiguous()
    ref = ref.contiguous()
    for name, value in (("log_clamp", log_clamp), ("value_clamp", value_clamp)):
        if value is not None and not value >= 0:
            raise ValueError(f"{name} must be >= 0 or None, got {value}")
    off = lambda v: math.inf if v is None else float(v)
    resolved = backends.resolve_backend(backend, lp.device)
    return torch.ops.rlkern.kl_penalty_fwd(lp, ref, layout("policy_loss").kl_kinds[kind],
                                           straight, off(log_clamp), off(value_clamp), resolved)
