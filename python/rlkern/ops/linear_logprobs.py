"""Token logprobs and entropy straight from hidden states and the LM head, never materialising
the ``(N, V)`` logits.

Public entry points: :func:`linear_logprobs` (autograd; backward recomputes each logits tile)
and :func:`linear_logprobs_with_grad` (takes the upstream gradient up front and produces the
parameter gradients during the forward pass: three matmuls in total, no recompute).

Registered ops (``torch.ops.rlkern``): ``linear_logprobs_fwd``, ``linear_logprobs_bwd`` and
``linear_logprobs_fwd_bwd``. The backends they dispatch to are in
:mod:`rlkern.ops.linear_logprobs_dispatch` (cpu / triton / torch) and
:mod:`rlkern.ops.linear_logprobs_cpu` (ATen matmul tiles + the compiled C++ epilogues
``linear_logprobs_tile_fwd_``, ``linear_logprobs_finish_out``, ``linear_logprobs_tile_bwd_``,
and the vocabulary-parallel helpers).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from rlkern import backends
from rlkern.config.dtypes import FLOAT_DTYPES, INDEX_DTYPES, acc_dtype
from rlkern.ops.linear_logprobs_cpu import LinearTiling, check_replicated, global_vocab, group_of
from rlkern.ops.linear_logprobs_dispatch import backward, forward, run_fused
from rlkern.ops.linear_truncated import (
    check_filters_allowed,
    check_lora,
    filters_given,
    truncated_linear_logprobs,
)
from rlkern.ops.logprobs import (
    TokenLogprobs,
    _validate_labels,
    _validate_rows,
    check_ignore_index,
    check_temperature,
    checks_enabled,
)

# The fused losses (rlkern.ops.linear_grpo_loss) drive the same machinery.
_group = group_of


class LinearLogprobsWithGrad(NamedTuple):
    """Outputs of :func:`linear_logprobs_with_grad`: the forward results and the gradients
    of ``Σ grad_logprobs·logprobs + Σ grad_entropy·entropy`` wrt the parameters."""

    outputs: TokenLogprobs
    grad_hidden: Tensor
    grad_weight: Tensor
    grad_bias: Tensor | None


# ---------------------------------------------------------------------------------------------
# Registered ops.



def _validate_group_rows(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int,
                         group) -> None:
    """Labels within the (global) vocabulary; with a process group and checks on, the same
    hidden states and labels on every rank."""
    _validate_labels(labels, global_vocab(weight, group), ignore_index)
    if group is not None and checks_enabled():
        check_replicated(group, hidden=hidden, labels=labels)

def _check_backend(backend: str, group) -> None:
    if backend == "cuda":
        raise backends.BackendUnavailableError(
            "linear_logprobs has no CUDA C++ implementation; use backend='triton' on CUDA "
            "tensors (backend='cpu' on CPU tensors, or 'torch')"
        )
    if backend in ("torch", "triton") and group is not None:
        raise ValueError("process_group is supported by the 'cpu' backend only")


def _resolve_backend(backend: str, device: torch.device) -> str:
    """:func:`backends.resolve_backend`, except that ``"auto"`` on CUDA tensors always means
    Triton here (even with ``RLKERN_BACKEND=cuda``): this op has no CUDA C++ kernels."""
    resolved = backends.resolve_backend(backend, device)
    return "triton" if backend == "auto" and resolved == "cuda" else resolved


def _empty() -> Tensor:
    return torch.empty(0)


def _empty_rows(hidden: Tensor, with_entropy: bool):
    z = torch.zeros(0, dtype=acc_dtype(hidden.dtype))
    return z, z.clone(), z.clone() if with_entropy else None


@torch.library.custom_op("rlkern::linear_logprobs_fwd", mutates_args=())
def linear_logprobs_fwd(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
    chunk_size: int,
    vocab_tile: int,
    group_name: str,
    backend: str,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    group = group_of(group_name)
    _check_backend(backend, group)
    labels = labels.to(torch.int64).contiguous()
    _validate_group_rows(hidden, weight, labels, ignore_index, group)
    if labels.numel() == 0:
        lp, lse, ent = _empty_rows(hidden, with_entropy)
    else:
        lp, lse, ent = forward(backend, hidden, weight, labels, bias, temperature, ignore_index,
                               with_entropy, LinearTiling(chunk_size, vocab_tile), group,
                               softcap)
        _validate_rows(lse.view(1, -1), lp.view(1, -1), labels.view(1, -1), ignore_index)
    return lp, lse, ent if ent is not None else _empty()


@linear_logprobs_fwd.register_fake
def _(hidden, weight, labels, bias, temperature, ignore_index, with_entropy, chunk_size,
      vocab_tile, group_name, backend, softcap=0.0):
    rows = lambda: hidden.new_empty((hidden.shape[0],), dtype=acc_dtype(hidden.dtype))
    return rows(), rows(), rows() if with_entropy else hidden.new_empty((0,), dtype=torch.float32)


@torch.library.custom_op("rlkern::linear_logprobs_bwd", mutates_args=())
def linear_logprobs_bwd(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    lse: Tensor,
    entropy: Tensor | None,
    grad_logprobs: Tensor | None,
    grad_entropy: Tensor | None,
    grad_lse: Tensor | None,
    temperature: float,
    ignore_index: int,
    chunk_size: int,
    vocab_tile: int,
    group_name: str,
    backend: str,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    labels = labels.to(torch.int64).contiguous()
    if labels.numel() == 0:
        return (torch.zeros_like(hidden), torch.zeros_like(weight),
                torch.zeros_like(bias) if bias is not None else _empty())
    rows = lambda t: None if t is None or t.numel() == 0 else t.contiguous()
    gh, gw, gb = backward(backend, hidden, weight, labels, bias, rows(lse), rows(entropy),
                          rows(grad_logprobs), rows(grad_entropy), rows(grad_lse), temperature,
                          ignore_index, LinearTiling(chunk_size, vocab_tile),
                          group_of(group_name), softcap)
    return gh, gw, gb if gb is not None else _empty()


@linear_logprobs_bwd.register_fake
def _(hidden, weight, labels, bias, lse, entropy, grad_logprobs, grad_entropy, grad_lse,
      temperature, ignore_index, chunk_size, vocab_tile, group_name, backend, softcap=0.0):
    gb = torch.empty_like(bias) if bias is not None else hidden.new_empty((0,))
    return torch.empty_like(hidden), torch.empty_like(weight), gb


def _setup_context(ctx, inputs, output):
    (hidden, weight, labels, bias, temperature, ignore_index, with_entropy, chunk_size,
     vocab_tile, group_name, backend, *rest) = inputs
    softcap = rest[0] if rest else 0.0
    _, lse, entropy = output
    ctx.save_for_backward(hidden, weight, labels, bias, lse, entropy if with_entropy else None)
    ctx.options = (temperature, ignore_index, chunk_size, vocab_tile, group_name, backend,
                   softcap)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_logprobs, grad_lse, grad_entropy):
    hidden, weight, labels, bias, lse, entropy = ctx.saved_tensors
    temperature, ignore_index, chunk_size, vocab_tile, group_name, backend, softcap = ctx.options
    gh, gw, gb = torch.ops.rlkern.linear_logprobs_bwd(
        hidden, weight, labels, bias, lse, entropy, grad_logprobs,
        grad_entropy if entropy is not None else None, grad_lse, temperature, ignore_index,
        chunk_size, vocab_tile, group_name, backend, softcap)
    # one entry per argument the caller passed (a defaulted softcap may be absent)
    grads = (gh, gw, None, gb if ctx.has_bias else None)
    return grads + (None,) * (len(ctx.needs_input_grad) - len(grads))


torch.library.register_autograd("rlkern::linear_logprobs_fwd", _backward,
                                setup_context=_setup_context)


@torch.library.custom_op("rlkern::linear_logprobs_fwd_bwd", mutates_args=())
def linear_logprobs_fwd_bwd(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    grad_logprobs: Tensor | None,
    grad_entropy: Tensor | None,
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
    chunk_size: int,
    group_name: str,
    backend: str,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    group = group_of(group_name)
    _check_backend(backend, group)
    labels = labels.to(torch.int64).contiguous()
    _validate_group_rows(hidden, weight, labels, ignore_index, group)

    def given(lp, ent, sl):
        return (None if grad_logprobs is None else grad_logprobs[sl],
                None if grad_entropy is None else grad_entropy[sl])

    (lp, lse, ent), gh, gw, gb = run_fused(hidden, weight, labels, bias, temperature,
                                           ignore_index, with_entropy or grad_entropy is not None,
                                           chunk_size, given, group, backend, softcap)
    _validate_rows(lse.view(1, -1), lp.view(1, -1), labels.view(1, -1), ignore_index)
    return (lp, lse, ent if with_entropy else _empty(), gh, gw,
            gb if gb is not None else _empty())


@linear_logprobs_fwd_bwd.register_fake
def _(hidden, weight, labels, bias, grad_logprobs, grad_entropy, temperature, ignore_index,
      with_entropy, chunk_size, group_name, backend, softcap=0.0):
    rows = lambda: hidden.new_empty((hidden.shape[0],), dtype=acc_dtype(hidden.dtype))
    gb = torch.empty_like(bias) if bias is not None else hidden.new_empty((0,))
    return (rows(), rows(), rows() if with_entropy else hidden.new_empty((0,), dtype=torch.float32),
            torch.empty_like(hidden), torch.empty_like(weight), gb)


# ---------------------------------------------------------------------------------------------
# Public API


def check_softcap(softcap: float | None) -> None:
    """``softcap`` must be None (no capping) or a finite float > 0 (the cap ``c`` of
    ``c·tanh(x/c)``)."""
    if softcap is None:
        return
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a float or None, got {type(softcap).__name__}")
    if not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be a finite float > 0 (or None), got {softcap!r}")


def _softcap_arg(softcap: float | None) -> float:
    """The registered ops' encoding: 0.0 for no capping."""
    return 0.0 if softcap is None else float(softcap)


def _check_linear_inputs(hidden, weight, labels, bias, temperature, chunk_size,
                         ignore_index: int = -100, softcap: float | None = None) -> None:
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be bfloat16, float16, float32 or float64, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if labels.dtype not in INDEX_DTYPES:
        raise TypeError(f"labels must be int32 or int64, got {labels.dtype}")
    if hidden.dim() < 2:
        raise ValueError(f"hidden must have shape (N, H) or (B, L, H), got {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (V, H), got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape (V, H) with H = hidden.shape[-1] = {hidden.shape[-1]}, got "
            f"{tuple(weight.shape)}"
        )
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels must have shape hidden.shape[:-1] = "
                         f"{tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape (V,) = ({weight.shape[0]},), got "
                             f"{tuple(bias.shape) if isinstance(bias, Tensor) else bias!r}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match hidden dtype {hidden.dtype}")
    for name, t in (("weight", weight), ("labels", labels), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden on {hidden.device}")
    check_temperature(temperature)
    check_ignore_index(ignore_index)
    check_softcap(softcap)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


class _Call(NamedTuple):
    """A public call's arguments as the registered ops take them: rows flattened, the backend
    resolved, the process group by name."""

    hidden: Tensor  # (N, H)
    labels: Tensor  # (N,)
    backend: str
    group_name: str


def _prepare(hidden, weight, labels, bias, temperature, ignore_index, chunk_size, process_group,
             backend, softcap=None) -> _Call:
    _check_linear_inputs(hidden, weight, labels, bias, temperature, chunk_size, ignore_index,
                         softcap)
    # (N, H) with N given explicitly: with H = 0 a reshape to (-1, 0) would be ambiguous.
    return _Call(hidden.reshape(labels.numel(), hidden.shape[-1]), labels.reshape(-1),
                 _resolve_backend(backend, hidden.device),
                 "" if process_group is None else process_group.group_name)


def _flat(value):
    """A per-row filter tensor shaped like ``labels`` → ``(N,)``; numbers pass through."""
    return value.reshape(-1) if isinstance(value, Tensor) else value


def _token_logprobs(lp: Tensor, lse: Tensor, ent: Tensor, lead: torch.Size,
                    return_entropy: bool) -> TokenLogprobs:
    """The per-row results, shaped like ``hidden.shape[:-1]``; this op has no statistics."""
    return TokenLogprobs(logprobs=lp.view(lead), entropy=ent.view(lead) if return_entropy else None,
                         lse=lse.view(lead), self_certainty=None, sum_p_sq=None)


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    process_group: torch.distributed.ProcessGroup | None = None,
    backend: str = "auto",
    softcap: float | None = None,
    top_k: int | Tensor | None = None,
    top_p: float | Tensor | None = None,
    min_p: float | Tensor | None = None,
    filter_order: str = "top_k_first",
    lora: tuple[Tensor, Tensor, float] | None = None,
) -> TokenLogprobs:
    r""":func:`rlkern.token_logprobs` of ``hidden @ weight.T + bias`` without forming the logits.

    Same outputs and gradients as ``token_logprobs(hidden @ weight.T + bias, labels, ...)``
    (ALGORITHMS.md §1, fused linear form), computed tile by tile: peak extra memory is one
    logits tile plus float32 gradient accumulators, independent of ``N·V``. Under
    ``torch.no_grad()`` (old / reference logprobs) the cost is one matmul plus the epilogue;
    with autograd the backward recomputes each tile (four matmuls in total). For a fused
    loss that knows its per-token derivative, :func:`linear_logprobs_with_grad` needs only three.

    Args:
        hidden: ``(N, H)`` or ``(B, L, H)`` bf16 / fp16 / fp32 / fp64 hidden states.
        weight: ``(V, H)`` LM-head weight, same dtype (with ``process_group``: this rank's
            shard: a block of consecutive rows, rank ``r``'s after rank ``r − 1``'s; blocks
            may differ in size, as FSDP2's dim-0 chunks do when ``P`` does not divide ``V``).
        labels: int32 / int64 of shape ``hidden.shape[:-1]``, global vocab ids or
            ``ignore_index``.
        bias: optional ``(V,)`` (this rank's shard with ``process_group``).
        temperature: ``T > 0``; logits are divided by it.
        return_entropy: also return the entropy (differentiable).
        ignore_index: rows with this label give zeros and no gradient.
        chunk_size: rows per tile (default: up to 2048; the vocab tile is chosen to keep about
            8M logits per tile).
        process_group: vocabulary-parallel group: per-row ``(max, Σexp, Σp·z)`` are combined
            with all-reduces, the label logit comes from the rank that owns it, ``∂W`` and
            ``∂b`` stay local and ``∂hidden`` is all-reduced (it equals the single-process
            gradient on every rank). Every rank passes the same ``hidden`` and ``labels``;
            with checks on (:func:`rlkern.set_checks`) a checksum all-reduce verifies it and
            raises ``ValueError`` where ranks differ.
        backend: ``"auto"`` (CPU tensors → ``"cpu"``, CUDA tensors → ``"triton"``),
            ``"cpu"`` (ATen matmul tiles + C++ epilogue), ``"triton"`` (GEMM tiles with an
            online-softmax epilogue, the logits only ever in registers; its backward forms
            each tile twice, for ∂h and for ∂W, and is deterministic; CPU tensors run it in
            Triton's interpreter; ``chunk_size`` is ignored, the kernels pick their own
            tiles) or ``"torch"`` (materialises the logits: the
            reference). There is no ``"cuda"`` C++ backend for this op.
        softcap: logit soft-capping (Gemma 2's ``final_logit_softcapping``): with ``c`` given,
            the logits are ``z = c·tanh(x/c)`` of the head's output ``x = h Wᵀ + b``, before
            the temperature divides them (``softmax(z / T)``); applied in every backend's tile
            epilogue with its exact gradient ``∂z/∂x = 1 − tanh²(x/c)``. ``None``: ``z = x``.

        top_k / top_p / min_p / filter_order: the sampler's filters (numbers, or tensors of
            one value per row, shaped like ``labels``), as in :func:`rlkern.token_logprobs`:
            ``logprobs`` and ``entropy`` of the truncated, renormalised distribution (a label
            outside the kept set: −inf, no gradient), bitwise equal to
            ``sample(...).processed_logprobs`` of the same logits. The kept set needs whole
            rows: the head runs on checkpointed chunks of complete rows (about 16M logits
            each, :mod:`rlkern.ops.linear_truncated`), not in vocabulary tiles; not with
            ``process_group``.
        lora: ``(A, B, s)`` of a LoRA-adapted head — ``A (r, H)``, ``B (V, r)`` (peft's
            ``lora_A.weight`` / ``lora_B.weight``), ``s`` its scaling (``lora_alpha / r``): the
            logits are ``h Wᵀ + s·(h Aᵀ) Bᵀ + b``, the adapted weight ``W + s·B·A`` never
            formed; differentiable wrt ``A`` and ``B`` (and ``W``, ``hidden``, ``bias``). Runs on
            checkpointed chunks of whole rows, as with the filters (combinable with them and
            with ``softcap``); not with ``process_group``.

    Returns:
        :class:`rlkern.TokenLogprobs` with ``logprobs``, ``lse`` (and ``entropy``) of shape
        ``hidden.shape[:-1]``, float32 (float64 for float64 inputs); the stats fields are None.

    Example::

        >>> h = torch.randn(4, 64, 896, dtype=torch.bfloat16)          # (B, L, H)
        >>> W = torch.randn(151936, 896, dtype=torch.bfloat16) * 0.02  # lm_head.weight
        >>> ids = torch.randint(0, 151936, (4, 64))
        >>> out = rlkern.linear_logprobs(h, W, ids, return_entropy=True)
        >>> out.logprobs.shape
        torch.Size([4, 64])
    """
    by_rows = filters_given(top_k, top_p, min_p) or lora is not None
    if by_rows:
        check_filters_allowed(process_group)
    lora_a, lora_b, lora_scale = check_lora(lora, weight)
    c = _prepare(hidden, weight, labels, bias, temperature, ignore_index, chunk_size,
                 process_group, backend, softcap)
    if by_rows:
        lp, lse, ent = truncated_linear_logprobs(
            c.hidden, weight, c.labels, bias, lora_a=lora_a, lora_b=lora_b,
            lora_scale=lora_scale, temperature=temperature, softcap=softcap,
            return_entropy=return_entropy, ignore_index=ignore_index, chunk_size=chunk_size,
            backend=c.backend, top_k=_flat(top_k), top_p=_flat(top_p), min_p=_flat(min_p),
            filter_order=filter_order)
        return _token_logprobs(lp, lse, ent, hidden.shape[:-1], return_entropy)
    tiling = LinearTiling.from_shape(c.hidden.shape[0], weight.shape[0], chunk_size)
    lp, lse, ent = torch.ops.rlkern.linear_logprobs_fwd(
        c.hidden, weight, c.labels, bias, float(temperature), int(ignore_index),
        bool(return_entropy), tiling.chunk_size, tiling.vocab_tile, c.group_name, c.backend,
        _softcap_arg(softcap))
    return _token_logprobs(lp, lse, ent, hidden.shape[:-1], return_entropy)


def linear_logprobs_with_grad(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    grad_logprobs: Tensor | None = None,
    grad_entropy: Tensor | None = None,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    process_group: torch.distributed.ProcessGroup | None = None,
    backend: str = "auto",
    softcap: float | None = None,
) -> LinearLogprobsWithGrad:
    r"""Forward results and parameter gradients in one chunked pass (no recompute).

    Computes :func:`linear_logprobs` and, with the upstream gradients given up front, the
    gradients of ``L = Σ grad_logprobs · logprobs + Σ grad_entropy · entropy`` wrt
    ``hidden``, ``weight`` and ``bias``: per chunk of rows, the full logits rows are formed
    (one matmul), reduced to ``lse``/``entropy``, turned into ``∂L/∂x`` in place, then
    ``∂h = ∂x W`` and ``∂W += ∂xᵀ h`` (accumulated in the weight's dtype, one rounding per
    chunk): ``6·N·H·V`` FLOPs in total.

    With ``backend="triton"`` the logits are never stored, so this runs the forward kernels
    and then the backward kernels with the given gradients, which re-form every logits tile
    (once for ``∂h``, once for ``∂W``): the cost of :func:`linear_logprobs` plus its backward,
    ``10·N·H·V`` FLOPs, with deterministic gradients.

    Args: as :func:`linear_logprobs`, plus ``grad_logprobs`` / ``grad_entropy`` of shape
    ``hidden.shape[:-1]`` (float32; either may be None). ``chunk_size`` here is the number of
    rows whose full logits are held at once (default: about 2^28 logits; ignored by Triton).

    Returns:
        :class:`LinearLogprobsWithGrad` ``(outputs, grad_hidden, grad_weight, grad_bias)``;
        gradients in the parameters' dtypes, ``grad_bias`` None without a bias.
    """
    c = _prepare(hidden, weight, labels, bias, temperature, ignore_index, chunk_size,
                 process_group, backend, softcap)
    lead = hidden.shape[:-1]
    for name, g in (("grad_logprobs", grad_logprobs), ("grad_entropy", grad_entropy)):
        if g is None:
            continue
        if not isinstance(g, Tensor) or not g.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor or None")
        if tuple(g.shape) != tuple(lead):
            raise ValueError(f"{name} must have shape {tuple(lead)}, got {tuple(g.shape)}")
        if g.device != hidden.device:
            raise ValueError(f"{name} is on {g.device} but hidden on {hidden.device}")
    flat = lambda g: None if g is None else g.reshape(-1).to(acc_dtype(hidden.dtype))
    rows = LinearTiling.fused_rows(weight.shape[0], chunk_size, n=c.hidden.shape[0])
    lp, lse, ent, gh, gw, gb = torch.ops.rlkern.linear_logprobs_fwd_bwd(
        c.hidden, weight, c.labels, bias, flat(grad_logprobs), flat(grad_entropy),
        float(temperature), int(ignore_index), bool(return_entropy), rows, c.group_name,
        c.backend, _softcap_arg(softcap))
    return LinearLogprobsWithGrad(_token_logprobs(lp, lse, ent, lead, return_entropy),
                                  gh.view(hidden.shape), gw, gb if bias is not None else None)


__all__ = [
    "LinearLogprobsWithGrad",
    "LinearTiling",
    "linear_logprobs",
    "linear_logprobs_with_grad",
    "run_fused",
]
