"""Token log-probabilities, entropy and softmax statistics in one pass over the vocabulary.

Public entry point: :func:`token_logprobs`. Registered ops (``torch.ops.rlkern``):

* ``logprobs_fwd(logits, labels, temperature, ignore_index, with_entropy, with_stats, backend)``
  → ``(logprobs, lse, entropy, self_certainty, sum_p_sq)``; outputs not asked for are empty.
* ``logprobs_bwd(logits, labels, lse, entropy, grad_logprobs, grad_entropy, grad_lse,
  temperature, ignore_index, backend)`` → ``grad_logits``.
* ``logprobs_bwd_inplace(...)``: the same, writing the gradient over ``logits``.

The compiled backends register ``logprobs_fwd_out`` / ``logprobs_bwd_out`` (C++, filling
caller-provided outputs); this module allocates and dispatches. The per-row outputs travel as one
list indexed by :func:`rlkern.config.logprobs.outputs` (the C++ header's layout), and the
backward takes the forward's outputs and their upstream gradients as two such lists. Backward
recomputes from the saved per-row ``lse`` and ``entropy``: nothing of size ``(N, V)`` is saved.

The CPU backend takes each direction in one C++ call instead (``logprobs_fwd_cpu`` /
``logprobs_bwd_cpu``: the layout, the allocations and the data checks done there), and in plain
eager mode :func:`token_logprobs` calls the op's body and autograd rule directly
(``_EagerLogprobs``): at the sizes of a micro-batch the fixed cost of a call, not the
kernel, was most of its time (docs/logprobs.md, "Fixed cost of a call").
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
from torch import Tensor

from rlkern import backends
from rlkern.config.dtypes import FLOAT_DTYPES, INDEX_DTYPES, acc_dtype
from rlkern.config.logprobs import STATS_OUTPUTS, output_names, outputs
from rlkern.ops import eager
from rlkern.ops.eager import plain_eager
from rlkern.reference.logprobs import token_logprobs_grad_reference, token_logprobs_reference


class TokenLogprobs(NamedTuple):
    """Per-token outputs of :func:`token_logprobs`, each of shape ``logits.shape[:-1]``.

    Float32 (float64 for float64 logits). Fields that were not asked for are ``None``.
    """

    logprobs: Tensor
    entropy: Tensor | None
    lse: Tensor
    self_certainty: Tensor | None
    sum_p_sq: Tensor | None


_checks_enabled = os.environ.get("RLKERN_CHECKS", "1") != "0"


def set_checks(enabled: bool) -> None:
    """Turn the data-dependent input checks on or off (default on; env ``RLKERN_CHECKS=0``).

    The checks are label range and all ``-inf`` rows. On CPU they cost one pass over the
    labels / per-row results; on CUDA they also cost a host synchronisation, which is why they
    can be switched off. Kernels never read out of bounds either way: with checks off an
    out-of-range label yields NaN for its row.
    """
    global _checks_enabled
    _checks_enabled = bool(enabled)


def checks_enabled() -> bool:
    return _checks_enabled


# ---------------------------------------------------------------------------------------------
# Layout: every backend sees logits as a (B, L, V) view with a unit vocab stride.


def rows3d(logits: Tensor) -> Tensor:
    """View ``logits`` (..., V) as (B, L, V) without copying.

    (N, V) → (1, N, V); (B, L, V) as is (any strides, e.g. TRL's ``logits[:, :-1, :]``);
    more leading dims are merged when their strides allow it.
    """
    if logits.dim() == 2:
        return logits.unsqueeze(0)
    if logits.dim() == 3:
        return logits
    lead = logits.shape[:-2]
    try:
        return logits.view(-1, logits.shape[-2], logits.shape[-1])
    except RuntimeError as exc:
        raise ValueError(
            f"logits of shape {tuple(logits.shape)} with strides {logits.stride()}: the "
            f"leading dims {tuple(lead)} cannot be merged without a copy; pass a (N, V) or "
            "(B, L, V) tensor"
        ) from exc


def _empty() -> Tensor:
    return torch.empty(0)


def _validate_data(logits3: Tensor, labels2: Tensor, ignore_index: int) -> None:
    _validate_labels(labels2, logits3.shape[-1], ignore_index)


def _validate_labels(labels: Tensor, vocab: int, ignore_index: int) -> None:
    """Labels in [0, vocab) or ignore_index (data-dependent: skipped while checks are off)."""
    if not _checks_enabled or labels.numel() == 0:
        return
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if bool(bad.any()):
        idx = int(bad.flatten().nonzero()[0])
        value = int(labels.flatten()[idx])
        raise ValueError(
            f"labels: value {value} at flat position {idx} is outside [0, {vocab}) and is not "
            f"ignore_index={ignore_index}"
        )


def _validate_rows(lse: Tensor, logprobs: Tensor, labels2: Tensor, ignore_index: int) -> None:
    """An all ``-inf`` row is the one whose ``lse`` is ``-inf`` *and* whose logprob is NaN: a
    finite row can have ``lse = -inf`` too (``max x / T`` below the float range, e.g. a bf16
    row of ``finfo.min`` at ``T = 1e-10``), but its logprob is then finite (or ``-inf``)."""
    if not _checks_enabled or lse.numel() == 0:
        return
    bad = torch.isneginf(lse) & torch.isnan(logprobs) & (labels2 != ignore_index)
    if bool(bad.any()):
        idx = int(bad.flatten().nonzero()[0])
        raise ValueError(
            f"logits: row {idx} (flat index over the leading dims) is all -inf, so its "
            "softmax is undefined"
        )


# ---------------------------------------------------------------------------------------------
# Backend dispatch. Each fills caller-provided outputs: ``outputs`` / ``grad_outputs`` are lists
# indexed by outputs() (None where not computed / no gradient).


def _fwd_out(backend: str, logits3: Tensor, labels2: Tensor, temperature: float,
             ignore_index: int, outs: list[Tensor | None]) -> None:
    if backend in ("cpu", "cuda"):
        backends.compiled_ops(backend).logprobs_fwd_out(logits3, labels2, temperature,
                                                        ignore_index, outs)
    elif backend == "triton":
        # The launcher's output arguments are in the layout's order.
        kernels = backends.triton_module("logprobs", logits3.device)
        kernels.logprobs_fwd(logits3, labels2, *outs, temperature=temperature,
                             ignore_index=ignore_index)
    else:
        ref = token_logprobs_reference(logits3, labels2, temperature=temperature,
                                       ignore_index=ignore_index)
        for o in outputs():
            if outs[o] is not None:
                outs[o].copy_(ref[o.name])


def _bwd_out(backend: str, logits3: Tensor, labels2: Tensor, outs: list[Tensor | None],
             grad_outs: list[Tensor | None], temperature: float, ignore_index: int,
             grad_logits3: Tensor) -> None:
    if backend in ("cpu", "cuda"):
        backends.compiled_ops(backend).logprobs_bwd_out(logits3, labels2, outs, grad_outs,
                                                        temperature, ignore_index, grad_logits3)
        return
    # What the backward reads: lse, entropy, and the gradients of logprobs, entropy and lse.
    OUT = outputs()
    rows = (outs[OUT.lse], outs[OUT.entropy], grad_outs[OUT.logprobs], grad_outs[OUT.entropy],
            grad_outs[OUT.lse])
    if backend == "triton":
        kernels = backends.triton_module("logprobs", logits3.device)
        kernels.logprobs_bwd(logits3, labels2, *rows, grad_logits3, temperature=temperature,
                             ignore_index=ignore_index)
    else:
        grad_logits3.copy_(token_logprobs_grad_reference(
            logits3, labels2, *rows, temperature=temperature, ignore_index=ignore_index))


# ---------------------------------------------------------------------------------------------
# Registered functional ops (what autograd and torch.compile see).


@eager.custom_op("rlkern::logprobs_fwd", mutates_args=())
def logprobs_fwd(
    logits: Tensor,
    labels: Tensor,
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
    with_stats: bool,
    inplace_backward: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The outputs in the order of :func:`rlkern.config.logprobs.outputs`; those not asked for
    are empty."""
    if backend == "cpu":
        return _fwd_cpu(logits, labels, temperature, ignore_index, with_entropy, with_stats)
    logits3 = rows3d(logits)
    lead = logits.shape[:-1]
    labels2 = labels.reshape(logits3.shape[:-1]).to(torch.int64).contiguous()
    _validate_data(logits3, labels2, ignore_index)
    acc = acc_dtype(logits.dtype)
    outs = [torch.empty(logits3.shape[:-1], dtype=acc, device=logits.device)
            if _wanted(o.name, with_entropy, with_stats) else None for o in outputs()]
    if labels2.numel() > 0:
        _fwd_out(backend, logits3, labels2, temperature, ignore_index, outs)
        _validate_rows(outs[outputs().lse], outs[outputs().logprobs], labels2, ignore_index)
    return tuple(_empty().to(logits.device) if t is None else t.view(lead) for t in outs)


def _fwd_cpu(logits: Tensor, labels: Tensor, temperature: float, ignore_index: int,
             with_entropy: bool, with_stats: bool) -> tuple[Tensor, ...]:
    """The CPU backend's forward as one C++ call (``rlkern::logprobs_fwd_cpu``: the layout,
    the allocations and the data checks of :func:`logprobs_fwd`'s other backends, without
    their small torch calls)."""
    return backends.cpp_ops().logprobs_fwd_cpu(logits, labels, temperature, ignore_index,
                                               with_entropy, with_stats, _checks_enabled)


def _wanted(name: str, with_entropy: bool, with_stats: bool) -> bool:
    if name == "entropy":
        return with_entropy
    return with_stats if name in STATS_OUTPUTS else True


@logprobs_fwd.register_fake
def _(logits, labels, temperature, ignore_index, with_entropy, with_stats, inplace_backward,
      backend):
    acc = acc_dtype(logits.dtype)
    lead = logits.shape[:-1]
    return tuple(logits.new_empty(lead, dtype=acc) if _wanted(o.name, with_entropy, with_stats)
                 else logits.new_empty((0,), dtype=torch.float32) for o in outputs())


def _grad_logits_buffer(logits: Tensor) -> Tensor:
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _bwd_common(logits, labels, lse, entropy, grad_logprobs, grad_entropy, grad_lse,
                temperature, ignore_index, backend, grad_logits):
    if backend == "cpu":  # one C++ call: the layout and the per-row arrays there
        backends.cpp_ops().logprobs_bwd_cpu(logits, labels, lse, entropy, grad_logprobs,
                                            grad_entropy, grad_lse, temperature, ignore_index,
                                            grad_logits)
        return
    logits3 = rows3d(logits)
    if logits3.numel() == 0:
        grad_logits.zero_()
        return
    rows = logits3.shape[:-1]
    as2d = lambda t: None if t is None or t.numel() == 0 else t.reshape(rows).contiguous()
    OUT = outputs()
    outs: list[Tensor | None] = [None] * len(OUT)
    grads: list[Tensor | None] = [None] * len(OUT)
    outs[OUT.lse], outs[OUT.entropy] = as2d(lse), as2d(entropy)
    for o, g in ((OUT.logprobs, grad_logprobs), (OUT.entropy, grad_entropy), (OUT.lse, grad_lse)):
        grads[o] = as2d(g)
    _bwd_out(backend, logits3, labels.reshape(rows).to(torch.int64).contiguous(), outs, grads,
             temperature, ignore_index, rows3d(grad_logits))


# The arguments of the two backward ops after `logits`, stated once: logprobs_bwd returns
# the gradient, logprobs_bwd_inplace writes it over `logits`.
_BWD_ARGS = ("Tensor labels, Tensor lse, Tensor? entropy, Tensor? grad_logprobs, "
             "Tensor? grad_entropy, Tensor? grad_lse, float temperature, int ignore_index, "
             "str backend")


@eager.custom_op("rlkern::logprobs_bwd", mutates_args=(),
                         schema=f"(Tensor logits, {_BWD_ARGS}) -> Tensor")
def logprobs_bwd(logits: Tensor, *args) -> Tensor:
    grad_logits = _grad_logits_buffer(logits)
    _bwd_common(logits, *args, grad_logits)
    return grad_logits


@logprobs_bwd.register_fake
def _(logits, *args):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@eager.custom_op("rlkern::logprobs_bwd_inplace", mutates_args=("logits",),
                         schema=f"(Tensor(a!) logits, {_BWD_ARGS}) -> ()")
def logprobs_bwd_inplace(logits: Tensor, *args) -> None:
    # Each logit is read once and its gradient written to the same address; the per-row
    # constants (lse, entropy) were computed in the forward, so no element is read after
    # it has been overwritten.
    _bwd_common(logits, *args, logits)


@logprobs_bwd_inplace.register_fake
def _(logits, *args):
    return None


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, ignore_index, with_entropy, _, inplace_backward, backend = inputs
    OUT = outputs()
    # self_certainty and sum_p_sq are statistics (rewards, baselines), not training targets.
    ctx.mark_non_differentiable(*(output[OUT[name]] for name in STATS_OUTPUTS))
    ctx.save_for_backward(logits, labels, output[OUT.lse],
                          output[OUT.entropy] if with_entropy else None)
    ctx.options = (temperature, ignore_index, backend)
    ctx.inplace = inplace_backward


def _backward(ctx, *grad_outputs):
    logits, labels, lse, entropy = ctx.saved_tensors
    temperature, ignore_index, backend = ctx.options
    OUT = outputs()
    grad_entropy = grad_outputs[OUT.entropy] if entropy is not None else None
    args = (labels, lse, entropy, grad_outputs[OUT.logprobs], grad_entropy, grad_outputs[OUT.lse],
            temperature, ignore_index, backend)
    # In plain eager mode without a graph to build (create_graph=False), the backward op's
    # body runs directly, as ``_EagerLogprobs`` does for the forward.
    no_graph = not torch.is_grad_enabled()
    if ctx.inplace:
        eager.call("rlkern::logprobs_bwd_inplace", logits, *args, no_graph=no_graph)
        grad = logits
    else:
        grad = eager.call("rlkern::logprobs_bwd", logits, *args, no_graph=no_graph)
    return grad, None, None, None, None, None, None, None


torch.library.register_autograd(
    "rlkern::logprobs_fwd", _backward, setup_context=_setup_context
)


#: ``rlkern::logprobs_fwd``'s body and autograd rule as a ``torch.autograd.Function``, for
#: token_logprobs on the CPU backend in plain eager mode where a gradient is wanted: the same
#: bits, without the registered op's dispatch and Python autograd glue. torch.compile,
#: dispatch modes and functorch still see the registered op.
_EagerLogprobs = eager.autograd_function("rlkern::logprobs_fwd", _setup_context, _backward)


# ---------------------------------------------------------------------------------------------
# Public API


def check_temperature(temperature) -> None:
    """A number ``T > 0`` whose inverse is finite (so ``x / T`` is defined for every float)."""
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    # Comparisons, not math.isinf: under torch.compile(dynamic=True) T is a symbolic float.
    if not temperature > 0 or temperature == math.inf or 1.0 / temperature == math.inf:
        raise ValueError(f"temperature must be finite and > 0 (with 1/T finite), got "
                         f"{temperature}")


def check_ignore_index(ignore_index) -> None:
    """An ``int`` that fits in int64 (the labels' range)."""
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")


def _overlaps_itself(t: Tensor) -> bool:
    """Whether two elements of ``t`` may share memory (a stride-0 expansion, or any view whose
    strides cannot be ordered so that each exceeds the extent of the smaller ones). Strided
    views without overlap, such as TRL's ``logits[:, :-1, :]``, are fine."""
    dims = sorted((st, n) for st, n in zip(t.stride(), t.shape, strict=True) if n > 1)
    extent = 0
    for stride, size in dims:
        if stride <= extent:
            return True
        extent += (size - 1) * stride
    return False


def _check_inputs(logits: Tensor, labels: Tensor, temperature: float, ignore_index) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be bfloat16, float16, float32 or float64, got {logits.dtype}")
    if labels.dtype not in INDEX_DTYPES:
        raise TypeError(f"labels must be int32 or int64, got {labels.dtype}")
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape (N, V) or (B, L, V), got {tuple(logits.shape)}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, "
            f"got {tuple(labels.shape)}"
        )
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device} but logits on {logits.device}")
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        raise ValueError(
            f"logits must be contiguous along the vocab (last) dim, got stride {logits.stride(-1)}"
            "; the other dims may have any strides"
        )
    if logits.shape[-1] == 0 and logits.numel() == 0 and labels.numel() > 0:
        raise ValueError("logits has an empty vocab dim (V = 0) but labels are not empty")
    check_temperature(temperature)
    check_ignore_index(ignore_index)


def token_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    return_stats: bool = False,
    ignore_index: int = -100,
    inplace_backward: bool = False,
    backend: str = "auto",
    top_k: int | Tensor | None = None,
    top_p: float | Tensor | None = None,
    min_p: float | Tensor | None = None,
    filter_order: str = "top_k_first",
) -> TokenLogprobs:
    r"""Log-probability of each label, and optionally the entropy, in one pass over the logits.

    For each row ``x`` of ``logits`` (length ``V``) with label ``y`` (ALGORITHMS.md §1)::

        z        = x / temperature
        lse      = log Σ_v exp(z_v)
        logprobs = z_y − lse
        entropy  = lse − Σ_v p_v z_v,       p_v = exp(z_v − lse)
        self_certainty = lse − mean_v z_v   (return_stats; Intuitor's KL(U‖p) + log V)
        sum_p_sq       = Σ_v p_v²           (return_stats; verl's optimal-token baseline)

    This is TRL's ``selective_log_softmax(logits / T, ids)`` + ``entropy_from_logits`` and
    verl's ``logprobs_from_logits`` + ``entropy_from_logits`` fused: the logits are read once,
    accumulation is float32, and no ``(N, V)`` temporary is created.

    Args:
        logits: ``(N, V)`` or ``(B, L, V)`` bfloat16 / float16 / float32 / float64 tensor.
            Only the vocab dim must be contiguous: strided views such as TRL's
            ``logits[:, :-1, :]`` are read in place, without a copy.
        labels: int32 / int64 tensor of shape ``logits.shape[:-1]``; each value in ``[0, V)``
            or equal to ``ignore_index``.
        temperature: ``T > 0``; the logits are divided by it (gradients too).
        return_entropy: also return the entropy of ``softmax(z)`` (differentiable).
        return_stats: also return ``self_certainty`` and ``sum_p_sq`` (not differentiable).
        ignore_index: rows with this label give 0 for every output and a zero gradient.
        inplace_backward: write the gradient wrt ``logits`` over the ``logits`` buffer
            (saves one ``(N, V)`` allocation in backward; ``logits`` must not be used after
            the backward pass). Logits whose elements share memory (a stride-0 ``expand``)
            cannot hold their own gradient: they get it out of place, as without the flag.
        backend: ``"auto"`` (C++ on CPU, Triton on CUDA), ``"cpu"``, ``"cuda"``, ``"triton"``
            (on CPU tensors: the Triton interpreter) or ``"torch"`` (the reference).
        top_k, top_p, min_p, filter_order: the sampler's filters (:func:`rlkern.sample`:
            same semantics, tie rule, checks and messages; numbers or per-row tensors of shape
            ``(N,)`` or ``logits.shape[:-1]``). With any of them given, ``logprobs`` is the
            log-probability under the truncated, renormalised distribution the sampler draws
            from (``−inf`` for a label outside the kept set; bitwise equal to ``sample(...)
            .processed_logprobs`` of that token on the same backend, the filters acting on
            ``x / T``) and ``entropy`` that distribution's entropy; ``lse`` stays the whole
            row's. Gradients hold the kept set fixed (0 outside it). Not with
            ``return_stats``; the gradient is then written out of place; no ``cuda`` C++
            kernel (Triton, CPU C++ and ``torch`` have it). Outputs are computed in fp32 (the
            sampler's arithmetic) on the compiled backends, in float64 by ``"torch"``.

    Returns:
        :class:`TokenLogprobs` ``(logprobs, entropy, lse, self_certainty, sum_p_sq)``, each of
        shape ``logits.shape[:-1]``, float32 (float64 for float64 logits); ``entropy`` is
        ``None`` unless ``return_entropy``, the stats ``None`` unless ``return_stats``.
        ``logprobs``, ``entropy`` and ``lse`` are differentiable wrt ``logits``; the backward
        recomputes ``p`` from the saved per-row ``lse`` and ``entropy``.

    Finite logits give finite ``logprobs``, ``entropy``, stats and gradients at any magnitude
    and temperature (everything is formed relative to the row max before ``1/T`` scales it);
    only ``lse`` itself may round to ``±inf`` when ``max x / T`` leaves the float range. A row
    holding NaN or ``+inf`` gives NaN in every output and in its gradient row; a row of all
    ``-inf`` (checks off) gives ``lse = -inf`` and NaN elsewhere (docs/logprobs.md).

    Raises:
        TypeError: wrong dtypes, a non-number temperature or a non-int ``ignore_index``.
        ValueError: shape mismatch, non-unit vocab stride, ``temperature <= 0`` (or ``1/T``
        not finite), ``ignore_index`` outside int64, tensors on different devices, labels
        out of range, or a row of all ``-inf`` logits (the last two only while checks are
        on, see :func:`set_checks`).

    Example::

        >>> logits = torch.randn(2, 5, 32000, dtype=torch.bfloat16)
        >>> ids = torch.randint(0, 32000, (2, 5))
        >>> out = rlkern.token_logprobs(logits, ids, temperature=0.7, return_entropy=True)
        >>> out.logprobs.shape, out.entropy.dtype
        (torch.Size([2, 5]), torch.float32)
    """
    _check_inputs(logits, labels, temperature, ignore_index)
    resolved = backends.resolve_backend(backend, logits.device)
    if top_k is not None or top_p is not None or min_p is not None:
        return _truncated(logits, labels, temperature, ignore_index, return_entropy,
                          return_stats, resolved, top_k, top_p, min_p, filter_order)
    # The gradient cannot be written over logits whose elements share memory (a stride-0
    # expansion): those get it out of place.
    inplace_backward = bool(inplace_backward) and not _overlaps_itself(logits)
    args = (logits, labels, float(temperature), int(ignore_index), bool(return_entropy),
            bool(return_stats))
    if resolved == "cpu" and plain_eager(logits, labels, no_graph=True):
        # Plain eager mode on the CPU: the registered op's body and autograd rule called
        # directly (the same bits; rlkern.ops.eager says when this is the same computation).
        if torch.is_grad_enabled() and logits.requires_grad:
            out = _EagerLogprobs.apply(*args, inplace_backward, resolved)
        else:
            out = _fwd_cpu(*args)
    else:
        out = torch.ops.rlkern.logprobs_fwd(*args, inplace_backward, resolved)
    # Traced by torch.compile: output_names() is a constant to it, the enum is not.
    return TokenLogprobs(**{
        name: t if _wanted(name, return_entropy, return_stats) else None
        for name, t in zip(output_names(), out, strict=True)
    })


def _truncated(logits, labels, temperature, ignore_index, return_entropy, return_stats,
               backend, top_k, top_p, min_p, filter_order) -> TokenLogprobs:
    """token_logprobs with the sampler's filters (rlkern/ops/truncated_logprobs.py)."""
    from rlkern.ops.truncated_logprobs import EagerTruncatedLogprobs, row_filters

    if return_stats:
        raise ValueError("return_stats is not available with top_k / top_p / min_p")
    temp, k, p, mp = row_filters(logits, temperature, top_k, top_p, min_p, filter_order)
    logits3 = rows3d(logits)
    lead = logits.shape[:-1]
    labels1 = labels.reshape(-1).to(torch.int64).contiguous()
    args = (logits3, labels1, temp, k, p, mp, filter_order == "joint", int(ignore_index),
            bool(return_entropy), backend)
    graph = torch.is_grad_enabled() and logits.requires_grad
    if graph and backend == "cpu" and plain_eager(logits, labels, no_graph=True):
        # as token_logprobs' unfiltered calls: the op's body and autograd rule, directly
        lp, ent, lse = EagerTruncatedLogprobs.apply(*args)
    else:  # the body where no graph is built in plain eager mode, else the registered op
        lp, ent, lse = eager.call("rlkern::truncated_logprobs_fwd", *args,
                                  no_graph=not torch.is_grad_enabled())
    return TokenLogprobs(lp.view(lead), ent.view(lead) if return_entropy else None,
                         lse.view(lead), None, None)
