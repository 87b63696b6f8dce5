"""CPU's fused policy loss: one pass over the tokens in all, the gradient scaled in the backward.

The two-pass form (:mod:`~rlkern.ops.policy_loss.register`) saves nothing per token: its
backward reads every input again and recomputes each token's derivative, so a forward plus
backward reads the inputs twice and, on the CPU, evaluates the per-token math (an ``exp`` and
the clipping) twice. Every loss it serves is a linear aggregate of per-row sums, so where each
token's gradient is ``coefficient(row) × factor(token)`` — the token ratio mode and a
token-level kind (``fused_ok`` in ``rlkern/policy_loss.h``) — the forward can write the factors
as it computes the sums (``rlkern::policy_loss_fused_fwd_out``) and the backward only scales
them, in place, by the per-row coefficients (``rlkern::policy_loss_fused_bwd_``):

* factors, ``(B, T)`` each, of the compute dtype: ``D_pg = ∂pg_sum/∂logp`` and, with a KL
  term, ``D_kl = ∂kl_sum/∂logp`` per token (0 at masked tokens); the backward turns ``D_pg``
  into the gradient ``g_pg·D_pg + g_kl·D_kl + g_lp·m`` and returns it (``D_kl`` is freed with
  the graph, not kept alive by the gradient);
* the result is bitwise the two-pass backward's (both form the factors with the same
  expressions, csrc/cpu/policy_loss.cpp ``token_d_pg`` / ``token_d_kl``);
* cost: the factors, held from the forward to the backward (4 bytes a token in float32, 8
  with a KL term) — the two-pass form holds nothing per token.

The factors are consumed by the first backward; a second backward through the same graph
(``retain_graph=True``), or one that builds a graph (``create_graph=True``), runs the registered
two-pass backward op instead, with the same bits.

:func:`fused_applies` says when :func:`~rlkern.ops.policy_loss.api.run` takes this path: the
CPU backend, in plain eager mode on plain tensors (torch.compile and dispatch modes trace or
run the registered two-pass ops), a gradient wanted for the log-probabilities and none for the
entropy (whose gradient only the two-pass backward writes), and a kind the header's
``fused_ok`` accepts. There, when the aggregation is linear (not gvpo, no batch-normalised
rollout weights:
:meth:`~rlkern.ops.policy_loss.aggregate.LinearAggregate.applies`), :func:`fused_loss` runs
the whole forward as one op, ``rlkern::policy_loss_fused_linear`` (csrc/cpu/
policy_loss_linear.cpp): the rows' weights, the kernel, the loss, its parts and the metrics,
with the two-pass path's operations in its order (the same bits, without ~40 small torch
calls and the aggregation's autograd graph); its backward forms ∂loss/∂row_sums by hand.
Otherwise :func:`fused_rows` returns the row sums for autograd to aggregate.

A linear aggregate's coefficients depend on the rows' valid-token counts and the upstream
gradient only, so where the upstream is the one :class:`UpstreamGuess` expects, the op first
counts the rows' valid tokens, forms the coefficients and has the kernel write the gradient
itself: the backward's products in its order, the KL part added in place, no factor buffers;
the backward then only hands that buffer over. A different upstream runs the two-pass
backward op. The bits are the two-pass op's on every path.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import torch
from torch import Tensor

from rlkern.config.layout import layout
from rlkern.ops.eager import plain_eager
from rlkern.ops.logprobs import checks_enabled
from rlkern.ops.memory import advise_huge_pages
from rlkern.ops.policy_loss.aggregate import LinearAggregate
from rlkern.ops.policy_loss.inputs import Prepared, raise_non_finite
from rlkern.ops.policy_loss.register import check_row_stats, grad_rows_slice, split_inputs

__all__ = ["forward_applies", "fused_applies", "fused_loss", "fused_rows", "linear_forward"]


def _fusable(p: Prepared) -> bool:
    """The CPU backend, plain eager mode on plain tensors (torch.compile and the dispatch modes
    trace or run the registered two-pass ops, which have fake implementations), the token ratio
    mode and a kind the header's ``fused_ok`` accepts."""
    if p.backend != "cpu" or not plain_eager(p.lp, p.old, p.adv, p.mask, no_graph=True):
        return False
    lay = layout("policy_loss")
    return (p.flags[lay.flags.ratio_mode] == lay.ratio_modes.token
            and p.flags[lay.flags.loss_kind] not in (lay.loss_kinds.gmpo, lay.loss_kinds.vespo))


def fused_applies(p: Prepared) -> bool:
    """Whether :func:`fused_rows` serves ``p`` (see the module docstring)."""
    if not (torch.is_grad_enabled() and p.lp.requires_grad):
        return False
    entropy = p.get("entropy")
    return (entropy is None or not entropy.requires_grad) and _fusable(p)


def forward_applies(p: Prepared) -> bool:
    """Whether :func:`linear_forward` may serve ``p``: no graph is to be built (grad mode off,
    or no input that requires grad) and the fused path's other conditions hold."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (p.lp, p.get("entropy"))):
        return False
    return _fusable(p)


def _save(ctx: Any, lp: Tensor, old: Tensor, adv: Tensor, mask: Tensor,
          inputs: list[Tensor | None], flags: list[int], hparams: list[float],
          row_stats: Tensor, factors: tuple[Tensor, Tensor | None]) -> None:
    """What the backward needs, on ``ctx``: the inputs and ``row_stats`` for the two-pass op,
    and the factors (or the gradient) the forward wrote, consumed by the first backward."""
    ctx.set_materialize_grads(False)
    given, slots = split_inputs(inputs)
    ctx.save_for_backward(lp, old, adv, mask, row_stats, *given)
    ctx.slots, ctx.flags, ctx.hparams = slots, list(flags), list(hparams)
    ctx.factors = factors


def _forward(ctx: Any, lp: Tensor, old: Tensor, adv: Tensor, mask: Tensor,
             inputs: list[Tensor | None], flags: list[int], hparams: list[float]) -> Tensor:
    """The fused forward kernel: ``row_stats``, with the factors and what the backward needs
    kept on ``ctx``."""
    lay = layout("policy_loss")
    B, T = mask.shape
    row_stats = torch.empty(len(lay.row_stats), B, dtype=torch.float64)
    with_kl = flags[lay.flags.kl_kind] != lay.kl_kinds.none
    # fresh each call: faulted in 2 MiB pages (rlkern.ops.memory)
    factors = (advise_huge_pages(torch.empty(B, T, dtype=lp.dtype)),
               advise_huge_pages(torch.empty(B, T, dtype=lp.dtype)) if with_kl else None)
    if B > 0:
        torch.ops.rlkern.policy_loss_fused_fwd_out(lp, old, adv, mask, inputs, flags,
                                                   hparams, row_stats, *factors)
        check_row_stats(row_stats, lp, old, adv, mask, inputs, flags)
    _save(ctx, lp, old, adv, mask, inputs, flags, hparams, row_stats, factors)
    return row_stats


def _two_pass(ctx: Any, grad_rows: Tensor) -> Tensor:
    """∂loss/∂lp by the registered two-pass backward op (the same bits as the fused path)."""
    lp, old, adv, mask, row_stats, *given = ctx.saved_tensors
    grad_lp, _ = torch.ops.rlkern.policy_loss_bwd(
        lp, old, adv, mask, given, ctx.slots, row_stats, grad_rows, ctx.flags, ctx.hparams,
        False, "cpu")
    return grad_lp


def _backward(ctx: Any, grad_rows: Tensor) -> Tensor:
    """∂loss/∂lp from ``grad_rows`` = ∂loss/∂row_sums (float64, contiguous), where the
    forward wrote the factors."""
    # A backward that builds a graph (create_graph=True) or a second one through the same
    # graph (retain_graph=True; the first consumed the factors) runs the registered two-pass
    # backward op, as the two-pass form would: the same bits, and the same graph for
    # higher-order gradients.
    factors = None if torch.is_grad_enabled() else ctx.factors
    if factors is None:
        return _two_pass(ctx, grad_rows)
    ctx.factors = None
    mask = ctx.saved_tensors[3]
    if mask.numel():
        torch.ops.rlkern.policy_loss_fused_bwd_(mask, grad_rows, ctx.flags, *factors)
    return factors[0]


class UpstreamGuess:
    """The upstream gradient the next fused loss's backward is expected to receive.

    A linear aggregate's ∂loss/∂row_sums is known before the forward up to that one scalar
    (``loss.backward()`` gives 1; a trainer that scales the loss for gradient accumulation
    gives the same factor at every micro-batch). When the guess is right, the forward writes
    the finished gradient and the backward only returns it: no second pass over ``(B, T)``.
    When it is wrong, the backward runs the two-pass op instead. Either way the gradient has
    the two-pass bits; only the time differs. The guess is the last upstream seen, and only
    while the last two agreed; a varying upstream gets the factors (one scaling pass).
    """

    def __init__(self) -> None:
        self.last, self.steady = 1.0, True

    def guess(self) -> float | None:
        return self.last if self.steady else None

    def observe(self, value: float) -> None:
        self.steady = _same_float(value, self.last)
        self.last = value


def _as_dtype(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype`` as a 0-dim tensor of it holds it, for float32 without
    making one: the round trip rounds to nearest even as torch does, and a finite value
    beyond float32's range becomes ±inf as it does there."""
    if dtype == torch.float64:
        return value
    if dtype != torch.float32:  # (the compute dtypes are float32 and float64)
        return torch.tensor(value, dtype=dtype).item()
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def _same_float(a: float, b: float) -> bool:
    """Equal, signed zeros told apart (a −0 upstream gives −0 coefficients); NaN never."""
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


#: The process's guess (threads may race on it: that costs time, never bits).
UPSTREAM = UpstreamGuess()


_NO_GRADS = (None,) * 6  # old, adv, mask, inputs, flags, hparams


class _FusedRows(torch.autograd.Function):
    """``(row_sums, row_stats)`` as ``rlkern::policy_loss_fwd`` gives them; differentiable in
    ``lp`` only."""

    @staticmethod
    def forward(ctx: Any, lp: Tensor, old: Tensor, adv: Tensor, mask: Tensor,
                inputs: list[Tensor | None], flags: list[int], hparams: list[float],
                ) -> tuple[Tensor, Tensor]:
        row_stats = _forward(ctx, lp, old, adv, mask, inputs, flags, hparams)
        ctx.mark_non_differentiable(row_stats)
        return row_stats[grad_rows_slice()].clone(), row_stats

    @staticmethod
    def backward(ctx: Any, grad_row_sums: Tensor | None, _grad_row_stats: Tensor | None,
                 ) -> tuple[Tensor | None, ...]:
        if grad_row_sums is None:
            return (None, *_NO_GRADS)
        return (_backward(ctx, grad_row_sums.to(torch.float64).contiguous()), *_NO_GRADS)


def _linear_op(lp: Tensor, old: Tensor, adv: Tensor, mask: Tensor, inputs: list[Tensor | None],
               flags: list[int], hparams: list[float], linear: LinearAggregate,
               upstream: float | None, grad: bool
               ) -> tuple[Tensor, Tensor, dict[str, Tensor], Tensor, list[Tensor]]:
    """``rlkern::policy_loss_fused_linear`` → ``(loss, parts, metrics, row_stats, token_grad)``,
    the metrics by name; raises the NaN policy's error while checks are on."""
    loss, parts, metrics, row_stats, _, token_grad, non_finite = (
        torch.ops.rlkern.policy_loss_fused_linear(
            lp, old, adv, mask, inputs, flags, hparams, linear.agg, linear.values, upstream,
            grad, linear.metric_codes))
    if non_finite and checks_enabled():
        raise_non_finite(lp, old, adv, mask, inputs, flags)
    return (loss, parts, dict(zip(linear.metric_names, metrics, strict=True)), row_stats,
            token_grad)


class _FusedLoss(torch.autograd.Function):
    """``(loss, row_stats, parts)`` of a :class:`~.aggregate.LinearAggregate`: the loss in the
    compute dtype, differentiable in ``lp`` only, by one op (:func:`_linear_op`: the weights,
    the kernel, the loss, its parts and the metrics, which it appends to ``sink``). Its
    backward forms ∂loss/∂row_sums as autograd would through the aggregation
    (:meth:`~.aggregate.LinearAggregate.row_grads`) without building that graph.

    With an upstream gradient to expect (:class:`UpstreamGuess`), the op counts each row's
    valid tokens first (one read of the mask), forms the coefficients for that upstream and
    has the kernel write the gradient itself."""

    @staticmethod
    def forward(ctx: Any, lp: Tensor, old: Tensor, adv: Tensor, mask: Tensor,
                inputs: list[Tensor | None], flags: list[int], hparams: list[float],
                linear: LinearAggregate, sink: list[dict[str, Tensor]],
                ) -> tuple[Tensor, Tensor, Tensor]:
        guess = UPSTREAM.guess()
        loss, parts, metrics, row_stats, grads = _linear_op(
            lp, old, adv, mask, inputs, flags, hparams, linear, guess, True)
        _save(ctx, lp, old, adv, mask, inputs, flags, hparams, row_stats,
              (grads[0], grads[1] if len(grads) > 1 else None))
        ctx.is_gradient = guess is not None  # grads[0] is the gradient, not the factors
        # the guess as the loss's dtype holds it (what a matching upstream's .item() gives)
        ctx.upstream = None if guess is None else _as_dtype(guess, loss.dtype)
        ctx.linear = linear
        sink.append(metrics)
        ctx.mark_non_differentiable(row_stats, parts)
        return loss, row_stats, parts

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor | None, _grad_row_stats: Tensor | None,
                 _grad_parts: Tensor | None) -> tuple[Tensor | None, ...]:
        if grad_loss is None:
            return (None, *_NO_GRADS, None, None)
        upstream = grad_loss.item()
        UPSTREAM.observe(upstream)
        grad = ctx.factors[0] if ctx.factors is not None else None
        if (ctx.is_gradient and grad is not None and not torch.is_grad_enabled()
                and _same_float(upstream, ctx.upstream)):
            ctx.factors = None  # the forward's gradient, handed over once
            return (grad, *_NO_GRADS, None, None)
        row_stats = ctx.saved_tensors[4]
        grad_rows = ctx.linear.row_grads(row_stats[layout("policy_loss").row_stats.len],
                                         grad_loss)
        if not ctx.is_gradient:  # the forward wrote the factors: scale them
            return (_backward(ctx, grad_rows), *_NO_GRADS, None, None)
        # another upstream, a second backward or one that builds a graph
        return (_two_pass(ctx, grad_rows), *_NO_GRADS, None, None)


def fused_rows(p: Prepared) -> tuple[Tensor, Tensor]:
    """``(row_sums, row_stats)`` of ``p`` by the fused kernels (:func:`fused_applies` must
    hold)."""
    return _FusedRows.apply(p.lp, p.old, p.adv, p.mask, p.inputs, p.flags, p.hparams)


def fused_loss(p: Prepared, linear: LinearAggregate
               ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """``(loss, row_stats, metrics)`` of ``p`` by the fused linear op (:func:`fused_applies`
    and :meth:`LinearAggregate.applies` must hold); ``metrics`` as
    :func:`~rlkern.ops.policy_loss.aggregate.finish_metrics` gives them, the loss parts
    included."""
    sink: list[dict[str, Tensor]] = []
    loss, row_stats, _ = _FusedLoss.apply(p.lp, p.old, p.adv, p.mask, p.inputs, p.flags,
                                          p.hparams, linear, sink)
    return loss, row_stats, sink[0]


def linear_forward(p: Prepared, linear: LinearAggregate
                   ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """:func:`fused_loss` where no gradient is wanted (:func:`forward_applies`): the same op
    with the forward kernel alone (no factors, no autograd function)."""
    loss, _, metrics, row_stats, _ = _linear_op(p.lp, p.old, p.adv, p.mask, p.inputs, p.flags,
                                                p.hparams, linear, None, False)
    return loss, row_stats, metrics
