"""The registered ops of the policy loss: ``rlkern::policy_loss_fwd`` / ``policy_loss_bwd``, their
fake implementations and autograd, and the dispatch to each backend's kernels.

* ``policy_loss_fwd`` — one pass over each sequence (row) computing the per-token loss terms
  and reducing them at once to per-row partial sums ``row_stats`` (float64, one row per entry
  of ``layout("policy_loss").row_stats``): Σ m·ℓ, Σ m·kl, Σ m·H, Σ m·(logp − old), lengths,
  clip counts, ratio statistics, ... It returns them and, apart, their differentiable rows
  ``row_sums`` (``row_grads``: pg_sum, kl_sum, ent_sum, lp_sum), which keeps autograd's
  bookkeeping at a few (B,) vectors.
* ``policy_loss_bwd`` — given the gradient of the loss wrt ``row_sums`` (one coefficient per
  row and statistic), one pass over each row recomputes what it needs and writes
  ∂loss/∂logprobs (and ∂/∂entropy). Nothing per token is saved by the forward. (On the CPU,
  :mod:`rlkern.ops.policy_loss.fused` serves most calls with a gradient instead: its forward
  saves each token's gradient factor, bitwise what this backward forms.)

The optional inputs travel as the list of the given ones (``inputs``) with their slots
(``slots``, codes of ``layout("policy_loss").inputs``): a ``Tensor?[]`` holding ``None`` could
not carry a gradient to its entropy (torch.library's autograd treats such a list as one
non-tensor argument). The compiled ``*_out`` ops take the full ``Tensor?[]`` by slot.

Backends: ``cpu`` / ``cuda`` — ``torch.ops.rlkern.policy_loss_{fwd,bwd}_out`` (rlkern._C);
``triton`` — ``rlkern.kernels.policy_loss``; ``torch`` — the reference's per-row statistics
(:func:`rlkern.reference.policy_loss.policy_loss_row_stats`), differentiated by autograd.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from rlkern import backends
from rlkern.config.layout import layout
from rlkern.ops import eager
from rlkern.ops.logprobs import checks_enabled
from rlkern.ops.memory import advise_huge_pages
from rlkern.ops.policy_loss.autograd import gradients
from rlkern.ops.policy_loss.inputs import raise_non_finite
from rlkern.reference.policy_loss import policy_loss_row_stats

__all__ = ["check_row_stats", "grad_rows_slice", "layout_tables", "split_inputs"]


@functools.cache
def layout_tables() -> dict[str, list[str]]:
    """The family's layout as plain names (table → entries in code order), for the Triton
    launchers, which import nothing from rlkern."""
    return {name: [e.name for e in table] for name, table in vars(layout("policy_loss")).items()}


@functools.cache
def grad_rows_slice() -> slice:
    """The rows of ``row_stats`` that ``row_grads`` name: consecutive, in row_grads order
    (static_assert'ed in policy_loss.h)."""
    lay = layout("policy_loss")
    rows = [lay.row_stats[g.name] for g in lay.row_grads]
    assert rows == list(range(rows[0], rows[0] + len(rows))), rows
    return slice(rows[0], rows[0] + len(rows))


def split_inputs(inputs: list[Tensor | None]) -> tuple[list[Tensor], list[int]]:
    """The optional inputs by slot → (the given ones, their slots)."""
    slots = [i for i, t in enumerate(inputs) if t is not None]
    return [inputs[i] for i in slots], slots


def _by_slot(given: list[Tensor], slots: list[int]) -> list[Tensor | None]:
    out: list[Tensor | None] = [None] * len(layout("policy_loss").inputs)
    for t, i in zip(given, slots, strict=True):
        out[i] = t
    return out


# ---------------------------------------------------------------------------------------------
# Backend dispatch (each fills caller-provided outputs)


def _fwd_out(backend, lp, old, adv, mask, opt, flags, hp, row_stats):
    if backend in ("cpu", "cuda"):
        if backend == "cuda" and not backends.has_cuda_kernels():
            raise backends.BackendUnavailableError(
                "backend='cuda' needs rlkern._C built with the CUDA kernels")
        backends.cpp_ops().policy_loss_fwd_out(lp, old, adv, mask, opt, flags, hp, row_stats)
    elif backend == "triton":
        kernels = backends.triton_module("policy_loss", lp.device)
        hp_t = torch.tensor(hp, dtype=lp.dtype, device=lp.device)
        kernels.policy_loss_fwd(lp, old, adv, mask, opt, flags, hp_t, row_stats,
                                layout_tables())
    else:
        row_stats.copy_(policy_loss_row_stats(lp, old, adv, mask, opt, flags, hp).detach())


def _bwd_out(backend, lp, old, adv, mask, opt, row_stats, grad_rows, flags, hp, grad_lp,
             grad_ent):
    if backend in ("cpu", "cuda"):
        backends.cpp_ops().policy_loss_bwd_out(lp, old, adv, mask, opt, row_stats, grad_rows,
                                               flags, hp, grad_lp, grad_ent)
    elif backend == "triton":
        kernels = backends.triton_module("policy_loss", lp.device)
        hp_t = torch.tensor(hp, dtype=lp.dtype, device=lp.device)
        kernels.policy_loss_bwd(lp, old, adv, mask, opt, row_stats, grad_rows, flags, hp_t,
                                grad_lp, grad_ent, layout_tables())
    else:
        entropy = layout("policy_loss").inputs.entropy

        def sums(lp_: Tensor, *ent: Tensor) -> Tensor:
            o = list(opt)
            if ent:
                o[entropy] = ent[0]
            return policy_loss_row_stats(lp_, old, adv, mask, o, flags, hp)[grad_rows_slice()]

        wrt = [lp] + ([opt[entropy]] if grad_ent is not None else [])
        grads = gradients(sums, wrt, grad_rows)
        _propagate_bad_coefficients(grad_lp.copy_(grads[0]), grad_rows, mask, flags)
        if grad_ent is not None:
            grad_ent.copy_(grads[1])


def _propagate_bad_coefficients(grad_lp: Tensor, grad_rows: Tensor, mask: Tensor,
                                flags: list[int]) -> Tensor:
    """``grad_lp`` (in place) with NaN at the valid tokens of rows whose loss coefficient is
    not finite (a NaN count with checks off), as the fused kernels give: they multiply the
    coefficient by each token's derivative, and NaN·0 is NaN, where autograd drops the
    coefficient at a clipped token."""
    lay = layout("policy_loss")
    ok = torch.isfinite(grad_rows[lay.row_grads.pg_sum]) & torch.isfinite(
        grad_rows[lay.row_grads.lp_sum])
    if flags[lay.flags.kl_kind] != lay.kl_kinds.none:
        ok &= torch.isfinite(grad_rows[lay.row_grads.kl_sum])
    return grad_lp.masked_fill_(~ok[:, None] & mask.bool(), math.nan)


def check_row_stats(row_stats: Tensor, lp: Tensor, old: Tensor, adv: Tensor, mask: Tensor,
                    opt: list[Tensor | None], flags: list[int]) -> None:
    """The NaN policy after a forward kernel: while checks are on, a row that saw a non-finite
    input at a valid token raises, naming the input and the token (one host sync)."""
    if checks_enabled() and row_stats[layout("policy_loss").row_stats.non_finite].sum().item() > 0:
        raise_non_finite(lp, old, adv, mask, opt, flags)


# ---------------------------------------------------------------------------------------------
# Registered functional ops


@eager.custom_op("rlkern::policy_loss_fwd", mutates_args=())
def policy_loss_fwd(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    inputs: list[Tensor],
    slots: list[int],
    flags: list[int],
    hparams: list[float],
    backend: str,
) -> tuple[Tensor, Tensor]:
    """→ ``(row_sums, row_stats)`` float64, statistic-major: ``row_stats`` one row per entry
    of ``layout("policy_loss").row_stats``, ``row_sums`` a copy of its ``row_grads`` rows."""
    lay = layout("policy_loss")
    B = mask.shape[0]
    row_stats = torch.empty(len(lay.row_stats), B, dtype=torch.float64, device=logprobs.device)
    if B > 0:
        opt = _by_slot(inputs, slots)
        _fwd_out(backend, logprobs, old_logprobs, advantages, mask, opt, flags, hparams,
                 row_stats)
        check_row_stats(row_stats, logprobs, old_logprobs, advantages, mask, opt, flags)
    return row_stats[grad_rows_slice()].clone(), row_stats


@policy_loss_fwd.register_fake
def _(logprobs, old_logprobs, advantages, mask, inputs, slots, flags, hparams, backend):
    lay = layout("policy_loss")
    B = mask.shape[0]
    return (logprobs.new_empty((len(lay.row_grads), B), dtype=torch.float64),
            logprobs.new_empty((len(lay.row_stats), B), dtype=torch.float64))


@torch.library.custom_op("rlkern::policy_loss_bwd", mutates_args=())
def policy_loss_bwd(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    inputs: list[Tensor],
    slots: list[int],
    row_stats: Tensor,
    grad_rows: Tensor,
    flags: list[int],
    hparams: list[float],
    entropy_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """→ ``(∂/∂logprobs, ∂/∂entropy)`` (the latter 0-element unless ``entropy_grad``)."""
    opt = _by_slot(inputs, slots)
    entropy = opt[layout("policy_loss").inputs.entropy]
    # fresh each call: faulted in 2 MiB pages on the CPU (rlkern.ops.memory)
    grad_lp = advise_huge_pages(torch.empty_like(logprobs, memory_format=torch.contiguous_format))
    grad_ent = (advise_huge_pages(torch.empty_like(entropy, memory_format=torch.contiguous_format))
                if entropy_grad and entropy is not None else None)
    if mask.numel():
        _bwd_out(backend, logprobs, old_logprobs, advantages, mask, opt, row_stats,
                 grad_rows.contiguous(), flags, hparams, grad_lp, grad_ent)
    else:
        grad_lp.zero_()
    return grad_lp, (grad_ent if grad_ent is not None else logprobs.new_empty(0))


@policy_loss_bwd.register_fake
def _(logprobs, old_logprobs, advantages, mask, inputs, slots, row_stats, grad_rows, flags,
      hparams, entropy_grad, backend):
    grad_lp = torch.empty_like(logprobs, memory_format=torch.contiguous_format)
    entropy = _by_slot(inputs, slots)[layout("policy_loss").inputs.entropy]
    if entropy_grad and entropy is not None:
        return grad_lp, torch.empty_like(entropy, memory_format=torch.contiguous_format)
    return grad_lp, logprobs.new_empty(0)


def _setup_context(ctx, inputs, output):
    lp, old, adv, mask, given, slots, flags, hp, backend = inputs
    _, row_stats = output
    ctx.mark_non_differentiable(row_stats)
    # No zero-filled gradient for row_stats: a fill is a parallel region, whose start-up can
    # cost more than the tiny work on a busy machine.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(lp, old, adv, mask, row_stats, *given)
    ctx.options = (list(slots), list(flags), list(hp), backend)


def _backward(ctx, grad_row_sums, grad_row_stats):
    lp, old, adv, mask, row_stats, *given = ctx.saved_tensors
    slots, flags, hp, backend = ctx.options
    entropy = layout("policy_loss").inputs.entropy
    _, _, _, _, wants, *_ = ctx.needs_input_grad  # `wants`: one flag per given input
    entropy_grad = any(w and s == entropy for w, s in zip(wants, slots, strict=True))
    if grad_row_sums is None:
        grad_row_sums = torch.zeros(len(layout("policy_loss").row_grads), mask.shape[0],
                                    dtype=torch.float64, device=lp.device)
    grad_lp, grad_ent = torch.ops.rlkern.policy_loss_bwd(
        lp, old, adv, mask, given, slots, row_stats, grad_row_sums.to(torch.float64), flags, hp,
        entropy_grad, backend)
    grad_inputs = [grad_ent if entropy_grad and s == entropy else None for s in slots]
    # torch.library matches the gradients' structure to the inputs': an empty int list counts
    # as an (empty) list of tensors, a non-empty one as a single argument.
    return grad_lp, None, None, None, grad_inputs, (None if slots else []), None, None, None


torch.library.register_autograd("rlkern::policy_loss_fwd", _backward,
                                setup_context=_setup_context)
