"""The backends of the fused linear logprobs op and their dispatch: :func:`forward`,
:func:`backward` and the one-pass forward+backward :func:`run_fused`, on ``"cpu"``
(:mod:`rlkern.ops.linear_logprobs_cpu`), ``"triton"`` (``kernels/linear_logprobs.py``: GEMM
tiles with an online-softmax epilogue, the logits only ever in registers; CUDA tensors, or CPU
tensors in the interpreter) and ``"torch"`` (the reference, which materialises the logits).

Every function takes flattened rows: ``hidden (N, H)``, ``weight (V, H)``, contiguous int64
``labels (N,)``, and returns per-row results in the accumulation dtype (float32; float64 for
float64 inputs) and gradients in the parameters' dtypes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlkern import backends
from rlkern.config.dtypes import acc_dtype
from rlkern.ops.linear_logprobs_cpu import (
    GradFn,
    LinearTiling,
    backward_cpu,
    forward_cpu,
    fused_cpu,
)
from rlkern.reference.linear_logprobs import linear_logprobs_reference
from rlkern.reference.logprobs import token_logprobs_grad_reference

Rows = tuple[Tensor, Tensor, Tensor | None]  # (logprobs, lse, entropy or None)
Grads = tuple[Tensor, Tensor, Tensor | None]  # (grad_hidden, grad_weight, grad_bias or None)


def forward(backend: str, hidden, weight, labels, bias, temperature, ignore_index, with_entropy,
            tiling: LinearTiling | None = None, group=None, softcap: float = 0.0) -> Rows:
    """``(logprobs, lse, entropy or None)``; ``tiling`` and ``group`` are the CPU path's;
    ``softcap`` c > 0: of the logits ``c·tanh(x/c)`` (0: none)."""
    if backend == "torch":
        return _forward_torch(hidden, weight, labels, bias, temperature, ignore_index,
                              with_entropy, softcap)
    if backend == "triton":
        return _forward_triton(hidden, weight, labels, bias, temperature, ignore_index,
                               with_entropy, softcap)
    return forward_cpu(hidden, weight, labels, bias, temperature, ignore_index, with_entropy,
                       tiling, group, softcap)


def backward(backend: str, hidden, weight, labels, bias, lse, entropy, g_lp, g_ent, g_lse,
             temperature, ignore_index, tiling: LinearTiling | None = None, group=None,
             softcap: float = 0.0) -> Grads:
    """The gradients of ``Σ g_lp·logprobs + Σ g_ent·entropy + Σ g_lse·lse`` (None: no term)."""
    args = (hidden, weight, labels, bias, lse, entropy, g_lp, g_ent, g_lse, temperature,
            ignore_index)
    if backend == "torch":
        return _backward_torch(*args, softcap)
    if backend == "triton":
        return _backward_triton(*args, softcap)
    return backward_cpu(*args, tiling, group, softcap)


def run_fused(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None,
              temperature: float, ignore_index: int, with_entropy: bool, chunk_size: int,
              grad_fn: GradFn, group=None, backend: str = "cpu",
              softcap: float = 0.0) -> tuple[Rows, Tensor, Tensor, Tensor | None]:
    """The one-pass forward+backward, with the upstream gradient given per row chunk by
    ``grad_fn(logprobs_chunk, entropy_chunk, row_slice) -> (grad_logprobs, grad_entropy)``
    (either may be None). Used by the fused losses, whose per-token derivative needs the chunk's
    logprobs first. Returns ``((logprobs, lse, entropy), grad_hidden, grad_weight, grad_bias)``.

    With ``backend="triton"`` (or ``"torch"``), ``grad_fn`` is called once, with all rows
    (``slice(0, N)``), between the forward and the backward; the backward re-forms the logits
    tiles (a recompute the CPU path's single pass does not need).
    """
    if labels.numel() == 0:
        z = torch.zeros(0, dtype=acc_dtype(hidden.dtype))
        return ((z, z.clone(), z.clone() if with_entropy else None), torch.zeros_like(hidden),
                torch.zeros_like(weight), None if bias is None else torch.zeros_like(bias))
    if backend in ("torch", "triton"):
        return _fused_two_pass(backend, hidden, weight, labels, bias, temperature, ignore_index,
                               with_entropy, grad_fn, softcap)
    return fused_cpu(hidden, weight, labels, bias, temperature, ignore_index, with_entropy,
                     chunk_size, grad_fn, group, softcap)


def _fused_two_pass(backend, hidden, weight, labels, bias, temperature, ignore_index,
                    with_entropy, grad_fn, softcap=0.0):
    """Forward on all rows, ``grad_fn`` on all rows, backward. On Triton the logits are never
    stored, so the ∂h and ∂W passes each re-form every tile: 10·N·H·V FLOPs against the CPU
    pass's 6·N·H·V."""
    # The entropy is always formed: grad_fn may return an entropy gradient, whose E_p[z]
    # needs it.
    lp, lse, ent = forward(backend, hidden, weight, labels, bias, temperature, ignore_index,
                           True, softcap=softcap)
    g_lp, g_ent = grad_fn(lp, ent if with_entropy else None, slice(0, labels.shape[0]))
    gh, gw, gb = backward(backend, hidden, weight, labels, bias, lse, ent, g_lp, g_ent, None,
                          temperature, ignore_index, softcap=softcap)
    return (lp, lse, ent if with_entropy else None), gh, gw, gb


# ---------------------------------------------------------------------------------------------
# Reference backend (materialises the logits; the ground truth of the tests).


def _forward_torch(hidden, weight, labels, bias, temperature, ignore_index, with_entropy,
                   softcap=0.0):
    ref = linear_logprobs_reference(hidden, weight, labels, bias=bias, temperature=temperature,
                                    ignore_index=ignore_index, softcap=softcap or None)
    return ref["logprobs"], ref["lse"], ref["entropy"] if with_entropy else None


def _backward_torch(hidden, weight, labels, bias, lse, entropy, g_lp, g_ent, g_lse, temperature,
                    ignore_index, softcap=0.0):
    """The chain rule written out (this runs inside a registered op, below autograd, where no
    graph is recorded): ``∂x`` of the materialised logits by the reference formula (with
    ``softcap`` c > 0: ``∂z`` of ``z = c·tanh(x/c)`` times ``1 − tanh²(x/c)``), then
    ``∂h = ∂x W``, ``∂W = ∂xᵀ h``, ``∂b = Σ_rows ∂x``, in float64."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    th = None
    if softcap:
        th = torch.tanh(logits.to(torch.float64) / softcap)
        logits = softcap * th
    dx = token_logprobs_grad_reference(logits, labels, lse, entropy, g_lp, g_ent, g_lse,
                                       temperature=temperature,
                                       ignore_index=ignore_index).to(torch.float64)
    if th is not None:
        dx = dx * ((1.0 - th) * (1.0 + th))
    gh = (dx @ weight.to(torch.float64)).to(hidden.dtype)
    gw = (dx.t() @ hidden.to(torch.float64)).to(weight.dtype)
    gb = None if bias is None else dx.sum(0).to(bias.dtype)
    return gh, gw, gb


# ---------------------------------------------------------------------------------------------
# Triton backend (kernels/linear_logprobs.py).


def _unit_last_stride(t: Tensor) -> Tensor:
    """The kernels take any row stride but need a unit last-dim stride."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _forward_triton(hidden, weight, labels, bias, temperature, ignore_index, with_entropy,
                    softcap=0.0):
    kernels = backends.triton_module("linear_logprobs", hidden.device)
    acc = acc_dtype(hidden.dtype)
    new = lambda: torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
    logprobs, lse = new(), new()
    entropy = new() if with_entropy else None
    kernels.linear_logprobs_fwd(
        _unit_last_stride(hidden), _unit_last_stride(weight), labels,
        None if bias is None else bias.contiguous(), logprobs, lse, entropy,
        temperature=temperature, ignore_index=ignore_index, softcap=softcap)
    return logprobs, lse, entropy


def _backward_triton(hidden, weight, labels, bias, lse, entropy, g_lp, g_ent, g_lse,
                     temperature, ignore_index, softcap=0.0):
    """The kernels add into float32 (float64) accumulators, cast here to the parameter dtypes.
    Deterministic: the kernels use no atomics (see kernels/linear_logprobs.py)."""
    kernels = backends.triton_module("linear_logprobs", hidden.device)
    acc = acc_dtype(hidden.dtype)
    as_acc = lambda t: None if t is None else t.to(acc).contiguous()
    zeros = lambda shape: torch.zeros(shape, dtype=acc, device=hidden.device)
    grad_h, grad_w = zeros(hidden.shape), zeros(weight.shape)
    grad_b = None if bias is None else zeros(bias.shape)
    kernels.linear_logprobs_bwd(
        _unit_last_stride(hidden), _unit_last_stride(weight), labels,
        None if bias is None else bias.contiguous(), as_acc(lse), as_acc(entropy), as_acc(g_lp),
        as_acc(g_ent), as_acc(g_lse), grad_h, grad_w, grad_b, temperature=temperature,
        ignore_index=ignore_index, softcap=softcap)
    return (grad_h.to(hidden.dtype), grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype))
