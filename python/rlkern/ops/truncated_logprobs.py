"""Token log-probs under the sampler's truncated distribution (``token_logprobs`` with
``top_k`` / ``top_p`` / ``min_p``; ALGORITHMS.md §4 and §1).

For each row: ``z = (x − max x) / T``; the kept set ``K`` of the filters is found by the
sampler's own code (CPU: ``csrc/cpu/sample_row.h``; CUDA C++:
``csrc/include/rlkern/cuda_sample_row.cuh``; Triton: the helpers of ``kernels/sample.py``),
then::

    logprobs = log q_y,   q_v = [v ∈ K] exp(z_v) / Σ_K exp(z)   (−inf for y ∉ K)
    entropy  = −Σ_v q_v log q_v
    lse      = max x / T + log Σ_v exp(z_v)                      (the whole row's)

``logprobs`` equal :func:`rlkern.sample`'s ``processed_logprobs`` of the same token bit for bit
on the same backend (same kept set, same kept-mass sum, same expression). Gradients hold ``K``
fixed (it is piecewise constant in the logits): 0 outside ``K``, and none from a label outside
``K``. The backward runs the filters again (nothing of size ``(N, V)`` is saved).

Registered ops (``torch.ops.rlkern``): ``truncated_logprobs_fwd`` → ``(logprobs, entropy,
lse)`` and ``truncated_logprobs_bwd`` → ``grad_logits``; the compiled backends fill
``truncated_logprobs_{fwd,bwd}_out`` (C++). The CPU backend's forward is one C++ call,
``truncated_logprobs_fwd_cpu`` (the allocations and the data checks there too), and in plain
eager mode token_logprobs calls the forward's body and autograd rule directly
(:data:`EagerTruncatedLogprobs`; docs/logprobs.md, "Fixed cost of a call").
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlkern import backends
from rlkern.config.dtypes import acc_dtype
from rlkern.ops import eager
from rlkern.ops.logprobs import _validate_labels, _validate_rows, checks_enabled
from rlkern.reference.truncated_logprobs import (
    truncated_logprobs_grad_reference,
    truncated_logprobs_reference,
)

_OPTS = ("top_k", "top_p", "min_p")


def _ref(logits3, labels, temperature, top_k, top_p, min_p, joint, ignore_index):
    opt = lambda t: None if t is None else t.cpu()
    return truncated_logprobs_reference(
        logits3.cpu(), labels.cpu(), temperature=temperature.cpu(), top_k=opt(top_k),
        top_p=opt(top_p), min_p=opt(min_p), filter_order="joint" if joint else "top_k_first",
        ignore_index=ignore_index)


def _fwd_out(backend, logits3, labels, temperature, top_k, top_p, min_p, joint, ignore_index,
             logprobs, entropy, lse) -> None:
    if backend in ("cpu", "cuda"):
        backends.compiled_ops(backend).truncated_logprobs_fwd_out(
            logits3, labels, temperature, top_k, top_p, min_p, joint, ignore_index, logprobs,
            entropy, lse)
    elif backend == "triton":
        kernels = backends.triton_module("truncated_logprobs", logits3.device)
        kernels.truncated_logprobs_fwd(logits3, labels, temperature, top_k, top_p, min_p, joint,
                                       ignore_index, logprobs, entropy, lse)
    else:
        ref = _ref(logits3, labels, temperature, top_k, top_p, min_p, joint, ignore_index)
        logprobs.copy_(ref["logprobs"].reshape(-1))
        lse.copy_(ref["lse"].reshape(-1))
        if entropy is not None:
            entropy.copy_(ref["entropy"].reshape(-1))


# The arguments both ops start with, stated once.
_ROW_ARGS = ("Tensor logits, Tensor labels, Tensor temperature, Tensor? top_k, Tensor? top_p, "
             "Tensor? min_p, bool joint, int ignore_index")


@eager.custom_op(
    "rlkern::truncated_logprobs_fwd", mutates_args=(),
    schema=f"({_ROW_ARGS}, bool with_entropy, str backend) -> (Tensor, Tensor, Tensor)")
def truncated_logprobs_fwd(logits, labels, temperature, top_k, top_p, min_p, joint, ignore_index,
                           with_entropy, backend):
    """``logits (B, L, V)``, ``labels`` and the per-row tensors ``(B·L,)`` → ``(logprobs,
    entropy, lse)`` of shape ``(B·L,)`` in the accumulation dtype (``entropy`` empty unless
    ``with_entropy``). The kernels compute in fp32 (the sampler's scratch row); the ``torch``
    backend in float64."""
    if backend == "cpu":  # one C++ call: the allocations and the data checks there too
        return backends.cpp_ops().truncated_logprobs_fwd_cpu(
            logits, labels, temperature, top_k, top_p, min_p, joint, ignore_index, with_entropy,
            checks_enabled())
    n = labels.numel()
    dev = logits.device
    acc = acc_dtype(logits.dtype)
    work = torch.float64 if backend == "torch" else torch.float32
    new = lambda: torch.empty(n, dtype=work, device=dev)
    logprobs, lse = new(), new()
    entropy = new() if with_entropy else None
    if n:
        # Data-dependent checks (label range, all −inf rows) inside the op, as logprobs_fwd's.
        _validate_labels(labels, logits.shape[-1], ignore_index)
        _fwd_out(backend, logits, labels, temperature, top_k, top_p, min_p, joint, ignore_index,
                 logprobs, entropy, lse)
        _validate_rows(lse, logprobs, labels, ignore_index)
    ent = entropy.to(acc) if entropy is not None else logits.new_empty((0,), dtype=acc)
    return logprobs.to(acc), ent, lse.to(acc)


@truncated_logprobs_fwd.register_fake
def _(logits, labels, temperature, top_k, top_p, min_p, joint, ignore_index, with_entropy,
      backend):
    acc = acc_dtype(logits.dtype)
    n = labels.shape[0]
    return (logits.new_empty((n,), dtype=acc), logits.new_empty((n if with_entropy else 0,),
            dtype=acc), logits.new_empty((n,), dtype=acc))


@eager.custom_op(
    "rlkern::truncated_logprobs_bwd", mutates_args=(),
    schema=f"({_ROW_ARGS}, Tensor? grad_logprobs, Tensor? grad_entropy, Tensor? grad_lse, "
           "str backend) -> Tensor")
def truncated_logprobs_bwd(logits, labels, temperature, top_k, top_p, min_p, joint, ignore_index,
                           grad_logprobs, grad_entropy, grad_lse, backend):
    """The gradient wrt ``logits (B, L, V)`` (contiguous, the logits' dtype) of the outputs of
    :func:`truncated_logprobs_fwd`, the kept set held fixed."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if logits.numel() == 0:
        return grad.zero_()
    f32 = lambda g: None if g is None else g.to(torch.float32).contiguous()
    if backend in ("cpu", "cuda"):
        backends.compiled_ops(backend).truncated_logprobs_bwd_out(
            logits, labels, temperature, top_k, top_p, min_p, joint, ignore_index,
            f32(grad_logprobs), f32(grad_entropy), f32(grad_lse), grad)
    elif backend == "triton":
        kernels = backends.triton_module("truncated_logprobs", logits.device)
        kernels.truncated_logprobs_bwd(logits, labels, temperature, top_k, top_p, min_p, joint,
                                       ignore_index, f32(grad_logprobs), f32(grad_entropy),
                                       f32(grad_lse), grad)
    else:
        opt = lambda t: None if t is None else t.cpu()
        grad.copy_(truncated_logprobs_grad_reference(
            logits.cpu(), labels.cpu(), opt(grad_logprobs), opt(grad_entropy), opt(grad_lse),
            temperature=temperature.cpu(), top_k=opt(top_k), top_p=opt(top_p), min_p=opt(min_p),
            filter_order="joint" if joint else "top_k_first", ignore_index=ignore_index))
    return grad


@truncated_logprobs_bwd.register_fake
def _(logits, *args):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, top_k, top_p, min_p, joint, ignore_index, with_entropy, \
        backend = inputs
    ctx.save_for_backward(logits, labels, temperature, top_k, top_p, min_p)
    ctx.options = (joint, ignore_index, with_entropy, backend)


def _backward(ctx, grad_logprobs, grad_entropy, grad_lse):
    logits, labels, temperature, top_k, top_p, min_p = ctx.saved_tensors
    joint, ignore_index, with_entropy, backend = ctx.options
    # the backward op's body where no graph is built (plain eager mode, create_graph=False)
    grad = eager.call(
        "rlkern::truncated_logprobs_bwd", logits, labels, temperature, top_k, top_p, min_p,
        joint, ignore_index, grad_logprobs, grad_entropy if with_entropy else None, grad_lse,
        backend, no_graph=not torch.is_grad_enabled())
    return grad, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("rlkern::truncated_logprobs_fwd", _backward,
                                setup_context=_setup_context)

#: ``rlkern::truncated_logprobs_fwd``'s body and autograd rule, for token_logprobs' filtered
#: calls in plain eager mode where a gradient is wanted (rlkern.ops.eager.autograd_function).
EagerTruncatedLogprobs = eager.autograd_function("rlkern::truncated_logprobs_fwd",
                                                 _setup_context, _backward)


def row_filters(logits: Tensor, temperature: float, top_k, top_p, min_p, filter_order: str):
    """Validated per-row tensors ``(temperature, top_k, top_p, min_p)`` of shape ``(N,)`` for
    ``logits (..., V)`` (``N`` = the rows), with :func:`rlkern.sample`'s checks and messages; a
    filter off for every row is ``None``. Per-row tensors may have shape ``(N,)`` or
    ``logits.shape[:-1]``."""
    from rlkern.config.sample import filter_order_names
    from rlkern.ops.sample import _per_row

    if filter_order not in filter_order_names():
        raise ValueError(f"filter_order must be one of {filter_order_names()}, got "
                         f"{filter_order!r}")
    lead = tuple(logits.shape[:-1])
    V = logits.shape[-1]
    n = 1
    for d in lead:
        n *= d
    dev = logits.device

    def flat(v):
        if isinstance(v, Tensor) and v.dim() > 1 and tuple(v.shape) == lead:
            return v.reshape(-1)
        return v

    temp = torch.full((n,), float(temperature), dtype=torch.float64, device=dev)
    k = _per_row("top_k", flat(top_k), n, dev, integer=True, lo=1, hi=None, lo_open=False,
                 off=lambda t: t >= V)
    p = _per_row("top_p", flat(top_p), n, dev, integer=False, lo=0.0, hi=1.0, lo_open=True,
                 off=lambda t: t >= 1.0)
    mp = _per_row("min_p", flat(min_p), n, dev, integer=False, lo=0.0, hi=1.0, lo_open=False,
                  off=lambda t: t <= 0.0)
    return temp, k, p, mp
