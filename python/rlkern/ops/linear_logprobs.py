"""Token logprobs and entropy straight from hidden states and the LM head, never materialising
the ``(N, V)`` logits.

Public entry points: :func:`linear_logprobs` (autograd; backward recomputes each logits tile)
and :func:`linear_logprobs_with_grad` (takes the upstream gradient up front and produces the
parameter gradients during the forward pass: three matmuls in total, no recompute).

Registered ops (``torch.ops.rlkern``): ``linear_logprobs_fwd``, ``linear_logprobs_bwd`` and
``linear_logprobs_fwd_bwd``; the compiled CPU epilogues they call are
``linear_logprobs_tile_fwd_``, ``linear_logprobs_finish_out`` and ``linear_logprobs_tile_bwd_``.

How the CPU path works: a tile of logits ``x = h[rows] W[cols]ᵀ (+ b[cols])`` is formed by one
ATen matmul (oneDNN, AMX for bf16) into a reused buffer; the C++ epilogue folds it into per-row
online-softmax statistics ``(m, Σe, Σe·(z−m), x_y)`` (the same block code as
:func:`rlkern.token_logprobs`). The backward recomputes each tile, turns it into ``∂/∂x`` in
place and accumulates ``∂/∂h`` and ``∂/∂W`` in float32 with two more matmuls. Peak extra memory
is the tile buffer plus the float32 accumulators, independent of ``N·V``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from rlkern import backends
from rlkern.ops.logprobs import TokenLogprobs, _validate_labels, _validate_rows
from rlkern.reference.linear_logprobs import linear_logprobs_reference

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_STATS_WIDTH = 4  # m, s, t, x_y per row (csrc/cpu/linear_logprobs.h)


@dataclass(frozen=True)
class LinearTiling:
    """Tile shape of the fused linear op: ``chunk_size`` rows × ``vocab_tile`` vocab columns.

    Tiles are near-square so that neither ``W`` nor ``h`` is re-read many times: the bytes
    moved are ``H·N·V·(1/chunk_size + 1/vocab_tile)`` for a fixed tile area.
    """

    chunk_size: int
    vocab_tile: int

    @classmethod
    def from_shape(cls, n: int, vocab: int, chunk_size: int | None = None) -> LinearTiling:
        rows = min(max(n, 1), 2048) if chunk_size is None else chunk_size
        if rows < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        # About 8M logits per tile (16 MiB in bf16), at least 256 columns.
        cols = max(256, min(max(vocab, 1), (1 << 23) // rows))
        return cls(chunk_size=rows, vocab_tile=cols)

    @classmethod
    def fused_rows(cls, vocab: int, chunk_size: int | None = None, n: int | None = None,
                   unit: int = 1) -> int:
        """Rows per chunk of the one-pass forward+backward, which holds full logits rows:
        at most about 2^28 logits (512 MiB in bf16) per chunk. Larger chunks mean fewer re-reads
        of W and fewer roundings of the ∂W accumulation; the buffer is still a fraction of what
        materialising the logits costs (a bf16 copy plus float32 log-softmax temporaries).

        With ``n`` given, the ``n`` rows are split into the fewest chunks of that size and the
        chunks are made equal (in multiples of ``unit`` rows, e.g. whole sequences): 2048 rows
        at V = 151936 run as 2 × 1024 rather than 1766 + 282, so that every chunk's matmuls
        have the same large shape and no small tail chunk is left over."""
        if chunk_size is not None:
            return chunk_size
        cap = max(16, min(16384, (1 << 28) // max(vocab, 1)))
        unit = max(1, unit)
        if n is None or n <= 0:
            return cap
        units = -(-n // unit)
        per_chunk = max(1, cap // unit)
        chunks = -(-units // per_chunk)
        return -(-units // chunks) * unit


class LinearLogprobsWithGrad(NamedTuple):
    """Outputs of :func:`linear_logprobs_with_grad`: the forward results and the gradients
    of ``Σ grad_logprobs·logprobs + Σ grad_entropy·entropy`` wrt the parameters."""

    outputs: TokenLogprobs
    grad_hidden: Tensor
    grad_weight: Tensor
    grad_bias: Tensor | None


# ---------------------------------------------------------------------------------------------
# Distributed helpers (vocabulary parallel): each rank holds rows [r·V/P, (r+1)·V/P) of W.


def _group(group_name: str):
    if not group_name:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


def _vocab_offset(group, local_vocab: int) -> int:
    return 0 if group is None else torch.distributed.get_rank(group) * local_vocab


def _allreduce_stats(stats: Tensor, group) -> None:
    """Combine per-rank ``(m, s, t)`` into the global row summaries, in place.

    ``m`` by max; then each rank rescales to the global max (s' = α s, t' = α (t + d s),
    d = m − m_glob, α = e^d) and ``s, t`` are summed. ``x_y`` stays local (NaN off the owner).
    """
    dist = torch.distributed
    m = stats[:, 0].clone()
    m_glob = m.clone()
    dist.all_reduce(m_glob, op=dist.ReduceOp.MAX, group=group)
    s, t = stats[:, 1], stats[:, 2]
    empty = s == 0
    d = torch.where(empty, torch.zeros_like(m), m - m_glob)
    alpha = torch.where(empty, torch.zeros_like(m), torch.exp(d))
    st = torch.stack([alpha * s, alpha * (t + d * s)], dim=1)
    dist.all_reduce(st, group=group)
    stats[:, 0] = m_glob
    stats[:, 1:3] = st


def _allreduce_owned(values: Tensor, group) -> Tensor:
    """Rows computed by the rank that owns the label (NaN elsewhere) → the same on all ranks."""
    out = torch.nan_to_num(values, nan=0.0)
    torch.distributed.all_reduce(out, group=group)
    return out


# ---------------------------------------------------------------------------------------------
# CPU implementation (ATen matmul tiles + C++ epilogues).


def _tile_logits(h: Tensor, w: Tensor, b: Tensor | None, out: Tensor) -> Tensor:
    if b is None:
        return torch.mm(h, w.t(), out=out)
    return torch.addmm(b, h, w.t(), out=out)


def _stats_init(n: int, device: torch.device) -> Tensor:
    stats = torch.zeros(n, _STATS_WIDTH, dtype=torch.float64, device=device)
    stats[:, 0] = -math.inf
    stats[:, 3] = math.nan
    return stats


def _forward_cpu(hidden, weight, labels, bias, temperature, ignore_index, with_entropy, tiling,
                 group):
    ops = backends.cpp_ops()
    n, vocab = hidden.shape[0], weight.shape[0]
    offset = _vocab_offset(group, vocab)
    stats = _stats_init(n, hidden.device)
    rows, cols = tiling.chunk_size, tiling.vocab_tile
    buf = torch.empty(min(rows, n) * min(cols, vocab), dtype=hidden.dtype)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        for v0 in range(0, vocab, cols):
            v1 = min(vocab, v0 + cols)
            tile = _tile_logits(hidden[r0:r1], weight[v0:v1], None if bias is None else
                                bias[v0:v1], buf[: (r1 - r0) * (v1 - v0)].view(r1 - r0, v1 - v0))
            ops.linear_logprobs_tile_fwd_(tile, labels[r0:r1], offset + v0, temperature,
                                          ignore_index, with_entropy, stats[r0:r1])
    if group is not None:
        _allreduce_stats(stats, group)
    return _finish(stats, labels, temperature, ignore_index, with_entropy, hidden.dtype, group)


def _finish(stats, labels, temperature, ignore_index, with_entropy, dtype, group):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    n = labels.shape[0]
    logprobs = torch.empty(n, dtype=acc)
    lse = torch.empty(n, dtype=acc)
    entropy = torch.empty(n, dtype=acc) if with_entropy else None
    backends.cpp_ops().linear_logprobs_finish_out(stats, labels, temperature, ignore_index,
                                                  logprobs, lse, entropy)
    if group is not None:
        logprobs = _allreduce_owned(logprobs, group)
    return logprobs, lse, entropy


def _backward_cpu(hidden, weight, labels, bias, lse, entropy, g_lp, g_ent, g_lse, temperature,
                  ignore_index, tiling, group):
    """Vocab tiles outside, row chunks inside: ∂W of a vocab tile is finished (one write) before
    the next tile, so only a (vocab_tile, H) float32 accumulator is needed for it; ∂h
    accumulates in a (N, H) float32 buffer."""
    ops = backends.cpp_ops()
    n, vocab = hidden.shape[0], weight.shape[0]
    offset = _vocab_offset(group, vocab)
    rows, cols = tiling.chunk_size, tiling.vocab_tile
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    grad_h = torch.zeros(n, hidden.shape[1], dtype=acc)
    grad_w = torch.empty_like(weight)
    grad_b = None if bias is None else torch.empty_like(bias)
    buf = torch.empty(min(rows, n) * min(cols, vocab), dtype=hidden.dtype)
    single_chunk = n <= rows
    gw_acc = None if single_chunk else torch.empty(min(cols, vocab), weight.shape[1], dtype=acc)
    for v0 in range(0, vocab, cols):
        v1 = min(vocab, v0 + cols)
        w_tile = weight[v0:v1]
        gb_tile = None if bias is None else torch.zeros(v1 - v0, dtype=acc)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            tile = _tile_logits(hidden[r0:r1], w_tile, None if bias is None else bias[v0:v1],
                                buf[: (r1 - r0) * (v1 - v0)].view(r1 - r0, v1 - v0))
            sl = slice(r0, r1)
            ops.linear_logprobs_tile_bwd_(
                tile, labels[sl], offset + v0, lse[sl], None if entropy is None else entropy[sl],
                None if g_lp is None else g_lp[sl], None if g_ent is None else g_ent[sl],
                None if g_lse is None else g_lse[sl], temperature, ignore_index, tile)
            if single_chunk:
                torch.mm(tile.t(), hidden[sl], out=grad_w[v0:v1])
            elif r0 == 0:
                gw_acc[: v1 - v0].copy_(tile.t() @ hidden[sl])
            else:
                gw_acc[: v1 - v0] += tile.t() @ hidden[sl]
            grad_h[sl] += tile @ w_tile
            if gb_tile is not None:
                gb_tile += tile.sum(0, dtype=acc)
        if not single_chunk:
            grad_w[v0:v1].copy_(gw_acc[: v1 - v0])
        if grad_b is not None:
            grad_b[v0:v1].copy_(gb_tile)
    if group is not None:
        torch.distributed.all_reduce(grad_h, group=group)
    return grad_h.to(hidden.dtype), grad_w, grad_b


def _fused_cpu(hidden, weight, labels, bias, temperature, ignore_index, with_entropy,
               chunk_rows, grad_fn, group):
    """One pass: per row chunk, the full logits rows → stats → upstream grads → ∂x in place →
    ∂h = ∂x W (one matmul over V) and ∂W += ∂xᵀ h.

    ∂W accumulates in the weight's dtype with ``addmm_`` (oneDNN sums each chunk's product in
    float32 and rounds once per chunk): a float32 copy of ∂W would cost 4·V·H bytes and a
    read-modify-write of them per chunk. The default chunk holds 2^28 logits, so bf16 sees a
    handful of roundings at most."""
    ops = backends.cpp_ops()
    n, vocab = hidden.shape[0], weight.shape[0]
    offset = _vocab_offset(group, vocab)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    grad_h = torch.empty_like(hidden)
    grad_w = torch.empty_like(weight)
    gb_acc = None if bias is None else torch.zeros(vocab, dtype=acc)
    logprobs = torch.empty(n, dtype=acc)
    lse = torch.empty(n, dtype=acc)
    entropy = torch.empty(n, dtype=acc) if with_entropy else None
    buf = torch.empty(min(chunk_rows, n) * vocab, dtype=hidden.dtype)
    for r0 in range(0, n, chunk_rows):
        r1 = min(n, r0 + chunk_rows)
        sl = slice(r0, r1)
        tile = _tile_logits(hidden[sl], weight, bias, buf[: (r1 - r0) * vocab].view(r1 - r0, vocab))
        stats = _stats_init(r1 - r0, hidden.device)
        ops.linear_logprobs_tile_fwd_(tile, labels[sl], offset, temperature, ignore_index,
                                      with_entropy, stats)
        if group is not None:
            _allreduce_stats(stats, group)
        lp, ls, ent = _finish(stats, labels[sl], temperature, ignore_index, with_entropy,
                              hidden.dtype, group)
        logprobs[sl], lse[sl] = lp, ls
        if entropy is not None:
            entropy[sl] = ent
        g_lp, g_ent = grad_fn(lp, ent, sl)
        ops.linear_logprobs_tile_bwd_(tile, labels[sl], offset, ls, ent, g_lp, g_ent, None,
                                      temperature, ignore_index, tile)
        torch.mm(tile, weight, out=grad_h[sl])
        if r0 == 0:
            torch.mm(tile.t(), hidden[sl], out=grad_w)
        else:
            grad_w.addmm_(tile.t(), hidden[sl])
        if gb_acc is not None:
            gb_acc += tile.sum(0, dtype=acc)
    if group is not None:
        gh = grad_h.to(acc)
        torch.distributed.all_reduce(gh, group=group)
        grad_h = gh.to(hidden.dtype)
    grad_b = None if gb_acc is None else gb_acc.to(bias.dtype)
    return (logprobs, lse, entropy), grad_h, grad_w, grad_b


# ---------------------------------------------------------------------------------------------
# Reference backend (materialises the logits; the ground truth of the tests).


def _forward_torch(hidden, weight, labels, bias, temperature, ignore_index, with_entropy):
    ref = linear_logprobs_reference(hidden, weight, labels, bias=bias, temperature=temperature,
                                    ignore_index=ignore_index)
    return ref["logprobs"], ref["lse"], ref["entropy"] if with_entropy else None


def _backward_torch(hidden, weight, labels, bias, lse, entropy, g_lp, g_ent, g_lse, temperature,
                    ignore_index):
    with torch.enable_grad():
        h = hidden.detach().requires_grad_()
        w = weight.detach().requires_grad_()
        b = None if bias is None else bias.detach().requires_grad_()
        ref = linear_logprobs_reference(h, w, labels, bias=b, temperature=temperature,
                                        ignore_index=ignore_index)
        total = sum(((g * ref[k]).sum() for g, k in ((g_lp, "logprobs"), (g_ent, "entropy"),
                                                     (g_lse, "lse")) if g is not None),
                    start=torch.zeros((), dtype=ref["lse"].dtype))
        inputs = [h, w] + ([b] if b is not None else [])
        grads = torch.autograd.grad(total, inputs, allow_unused=True)
    fill = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, inputs, strict=True)]
    return fill[0], fill[1], fill[2] if b is not None else None


# ---------------------------------------------------------------------------------------------
# Triton backend (kernels/linear_logprobs.py): GEMM tiles with an online-softmax epilogue; the
# logits exist only tile by tile in registers. CUDA tensors, or CPU tensors in the interpreter.


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _unit_last_stride(t: Tensor) -> Tensor:
    """The kernels take any row stride but need a unit last-dim stride."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _forward_triton(hidden, weight, labels, bias, temperature, ignore_index, with_entropy):
    kernels = backends.triton_module("linear_logprobs", hidden.device)
    acc = _acc_dtype(hidden.dtype)
    new = lambda: torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
    logprobs, lse = new(), new()
    entropy = new() if with_entropy else None
    kernels.linear_logprobs_fwd(
        _unit_last_stride(hidden), _unit_last_stride(weight), labels,
        None if bias is None else bias.contiguous(), logprobs, lse, entropy,
        temperature=temperature, ignore_index=ignore_index)
    return logprobs, lse, entropy


def _backward_triton(hidden, weight, labels, bias, lse, entropy, g_lp, g_ent, g_lse,
                     temperature, ignore_index):
    """The kernels add into float32 (float64) accumulators, cast here to the parameter dtypes.
    Deterministic: the kernels use no atomics (see kernels/linear_logprobs.py)."""
    kernels = backends.triton_module("linear_logprobs", hidden.device)
    acc = _acc_dtype(hidden.dtype)
    as_acc = lambda t: None if t is None else t.to(acc).contiguous()
    zeros = lambda shape: torch.zeros(shape, dtype=acc, device=hidden.device)
    grad_h, grad_w = zeros(hidden.shape), zeros(weight.shape)
    grad_b = None if bias is None else zeros(bias.shape)
    kernels.linear_logprobs_bwd(
        _unit_last_stride(hidden), _unit_last_stride(weight), labels,
        None if bias is None else bias.contiguous(), as_acc(lse), as_acc(entropy), as_acc(g_lp),
        as_acc(g_ent), as_acc(g_lse), grad_h, grad_w, grad_b, temperature=temperature,
        ignore_index=ignore_index)
    return (grad_h.to(hidden.dtype), grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype))


def _fused_triton(hidden, weight, labels, bias, temperature, ignore_index, with_entropy, grad_fn):
    """Forward kernels, ``grad_fn`` on all rows, backward kernels: on this backend the
    "one pass" re-forms every logits tile in the backward (the logits are never stored; the
    ∂h and ∂W passes each form them), 10·N·H·V FLOPs against the CPU pass's 6·N·H·V."""
    # The entropy is always formed: grad_fn may return an entropy gradient, whose E_p[z]
    # needs it.
    lp, lse, ent = _forward_triton(hidden, weight, labels, bias, temperature, ignore_index,
                                   True)
    g_lp, g_ent = grad_fn(lp, ent if with_entropy else None, slice(0, labels.shape[0]))
    gh, gw, gb = _backward_triton(hidden, weight, labels, bias, lse, ent, g_lp, g_ent, None,
                                  temperature, ignore_index)
    return (lp, lse, ent if with_entropy else None), gh, gw, gb


# ---------------------------------------------------------------------------------------------
# Registered ops.


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
) -> tuple[Tensor, Tensor, Tensor]:
    group = _group(group_name)
    _check_backend(backend, group)
    labels = labels.to(torch.int64).contiguous()
    _validate_labels(labels, _global_vocab(weight, group), ignore_index)
    if labels.numel() == 0:
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        z = torch.zeros(0, dtype=acc)
        return z, z.clone(), z.clone() if with_entropy else _empty()
    if backend == "torch":
        lp, lse, ent = _forward_torch(hidden, weight, labels, bias, temperature, ignore_index,
                                      with_entropy)
    elif backend == "triton":
        lp, lse, ent = _forward_triton(hidden, weight, labels, bias, temperature, ignore_index,
                                       with_entropy)
    else:
        lp, lse, ent = _forward_cpu(hidden, weight, labels, bias, temperature, ignore_index,
                                    with_entropy, LinearTiling(chunk_size, vocab_tile), group)
    _validate_rows(lse.view(1, -1), labels.view(1, -1), ignore_index)
    return lp, lse, ent if ent is not None else _empty()


@linear_logprobs_fwd.register_fake
def _(hidden, weight, labels, bias, temperature, ignore_index, with_entropy, chunk_size,
      vocab_tile, group_name, backend):
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    n = hidden.shape[0]
    ent = hidden.new_empty((n,), dtype=acc) if with_entropy else hidden.new_empty((0,),
                                                                                 dtype=torch.float32)
    return hidden.new_empty((n,), dtype=acc), hidden.new_empty((n,), dtype=acc), ent


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
) -> tuple[Tensor, Tensor, Tensor]:
    group = _group(group_name)
    labels = labels.to(torch.int64).contiguous()
    if labels.numel() == 0:
        return (torch.zeros_like(hidden), torch.zeros_like(weight),
                torch.zeros_like(bias) if bias is not None else _empty())
    rows = lambda t: None if t is None or t.numel() == 0 else t.contiguous()
    args = (hidden, weight, labels, bias, rows(lse), rows(entropy), rows(grad_logprobs),
            rows(grad_entropy), rows(grad_lse), temperature, ignore_index)
    if backend == "torch":
        gh, gw, gb = _backward_torch(*args)
    elif backend == "triton":
        gh, gw, gb = _backward_triton(*args)
    else:
        gh, gw, gb = _backward_cpu(*args, LinearTiling(chunk_size, vocab_tile), group)
    return gh, gw, gb if gb is not None else _empty()


@linear_logprobs_bwd.register_fake
def _(hidden, weight, labels, bias, lse, entropy, grad_logprobs, grad_entropy, grad_lse,
      temperature, ignore_index, chunk_size, vocab_tile, group_name, backend):
    gb = torch.empty_like(bias) if bias is not None else hidden.new_empty((0,))
    return torch.empty_like(hidden), torch.empty_like(weight), gb


def _setup_context(ctx, inputs, output):
    (hidden, weight, labels, bias, temperature, ignore_index, with_entropy, chunk_size,
     vocab_tile, group_name, backend) = inputs
    _, lse, entropy = output
    ctx.save_for_backward(hidden, weight, labels, bias, lse, entropy if with_entropy else None)
    ctx.options = (temperature, ignore_index, chunk_size, vocab_tile, group_name, backend)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_logprobs, grad_lse, grad_entropy):
    hidden, weight, labels, bias, lse, entropy = ctx.saved_tensors
    temperature, ignore_index, chunk_size, vocab_tile, group_name, backend = ctx.options
    gh, gw, gb = torch.ops.rlkern.linear_logprobs_bwd(
        hidden, weight, labels, bias, lse, entropy, grad_logprobs,
        grad_entropy if entropy is not None else None, grad_lse, temperature, ignore_index,
        chunk_size, vocab_tile, group_name, backend)
    return (gh, gw, None, gb if ctx.has_bias else None, None, None, None, None, None, None,
            None)


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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    group = _group(group_name)
    _check_backend(backend, group)
    labels = labels.to(torch.int64).contiguous()
    _validate_labels(labels, _global_vocab(weight, group), ignore_index)

    def given(lp, ent, sl):
        return (None if grad_logprobs is None else grad_logprobs[sl],
                None if grad_entropy is None else grad_entropy[sl])

    (lp, lse, ent), gh, gw, gb = run_fused(hidden, weight, labels, bias, temperature,
                                           ignore_index, with_entropy or grad_entropy is not None,
                                           chunk_size, given, group, backend)
    _validate_rows(lse.view(1, -1), labels.view(1, -1), ignore_index)
    return (lp, lse, ent if with_entropy else _empty(), gh, gw,
            gb if gb is not None else _empty())


@linear_logprobs_fwd_bwd.register_fake
def _(hidden, weight, labels, bias, grad_logprobs, grad_entropy, temperature, ignore_index,
      with_entropy, chunk_size, group_name, backend):
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    n = hidden.shape[0]
    ent = hidden.new_empty((n,), dtype=acc) if with_entropy else hidden.new_empty((0,))
    gb = torch.empty_like(bias) if bias is not None else hidden.new_empty((0,))
    return (hidden.new_empty((n,), dtype=acc), hidden.new_empty((n,), dtype=acc), ent,
            torch.empty_like(hidden), torch.empty_like(weight), gb)


GradFn = Callable[[Tensor, Tensor | None, slice], tuple[Tensor | None, Tensor | None]]


def run_fused(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None,
              temperature: float, ignore_index: int, with_entropy: bool, chunk_size: int,
              grad_fn: GradFn, group=None, backend: str = "cpu"):
    """The one-pass forward+backward, with the upstream gradient given per row chunk by
    ``grad_fn(logprobs_chunk, entropy_chunk, row_slice) -> (grad_logprobs, grad_entropy)``
    (either may be None). Used by the fused losses, whose per-token derivative needs the chunk's
    logprobs first. Returns ``((logprobs, lse, entropy), grad_hidden, grad_weight, grad_bias)``.

    With ``backend="triton"``, ``grad_fn`` is called once, with all rows
    (``slice(0, N)``), between the forward and the backward kernels; the backward re-forms
    the logits tiles (a recompute the CPU path's single pass does not need).
    """
    if labels.numel() == 0:
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        z = torch.zeros(0, dtype=acc)
        return ((z, z.clone(), z.clone() if with_entropy else None), torch.zeros_like(hidden),
                torch.zeros_like(weight), None if bias is None else torch.zeros_like(bias))
    if backend == "torch":
        return _fused_torch(hidden, weight, labels, bias, temperature, ignore_index,
                            with_entropy, grad_fn)
    if backend == "triton":
        return _fused_triton(hidden, weight, labels, bias, temperature, ignore_index,
                             with_entropy, grad_fn)
    return _fused_cpu(hidden, weight, labels, bias, temperature, ignore_index, with_entropy,
                      chunk_size, grad_fn, group)


def _fused_torch(hidden, weight, labels, bias, temperature, ignore_index, with_entropy, grad_fn):
    lp, lse, ent = _forward_torch(hidden, weight, labels, bias, temperature, ignore_index, True)
    g_lp, g_ent = grad_fn(lp, ent if with_entropy else None, slice(0, labels.shape[0]))
    gh, gw, gb = _backward_torch(hidden, weight, labels, bias, lse, ent, g_lp, g_ent, None,
                                 temperature, ignore_index)
    return (lp, lse, ent if with_entropy else None), gh, gw, gb


def _global_vocab(weight: Tensor, group) -> int:
    if group is None:
        return weight.shape[0]
    world = torch.distributed.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    torch.distributed.all_gather(sizes, torch.tensor([weight.shape[0]]), group=group)
    if len({int(s) for s in sizes}) != 1:
        raise ValueError(
            "process_group: every rank must hold an equal shard of the vocabulary (V divisible "
            f"by the world size); got shard sizes {[int(s) for s in sizes]}"
        )
    return weight.shape[0] * world


# ---------------------------------------------------------------------------------------------
# Public API


def _check_linear_inputs(hidden, weight, labels, bias, temperature, chunk_size) -> None:
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be bfloat16, float16, float32 or float64, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if labels.dtype not in (torch.int32, torch.int64):
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
    if not isinstance(temperature, (int, float)) or not temperature > 0 or math.isinf(temperature):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _flatten(hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    return hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)


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
            shard of ``V / P`` consecutive rows, rank ``r`` holding rows ``[r V/P, (r+1) V/P)``).
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
            gradient on every rank).
        backend: ``"auto"`` (CPU tensors → ``"cpu"``, CUDA tensors → ``"triton"``),
            ``"cpu"`` (ATen matmul tiles + C++ epilogue), ``"triton"`` (GEMM tiles with an
            online-softmax epilogue, the logits only ever in registers; its backward forms
            each tile twice, for ∂h and for ∂W, and is deterministic; CPU tensors run it in
            Triton's interpreter; ``chunk_size`` is ignored, the kernels pick their own
            tiles) or ``"torch"`` (materialises the logits: the
            reference). There is no ``"cuda"`` C++ backend for this op.

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
    _check_linear_inputs(hidden, weight, labels, bias, temperature, chunk_size)
    resolved = _resolve_backend(backend, hidden.device)
    h2, y = _flatten(hidden, labels)
    tiling = LinearTiling.from_shape(h2.shape[0], weight.shape[0], chunk_size)
    group_name = "" if process_group is None else process_group.group_name
    lp, lse, ent = torch.ops.rlkern.linear_logprobs_fwd(
        h2, weight, y, bias, float(temperature), int(ignore_index), bool(return_entropy),
        tiling.chunk_size, tiling.vocab_tile, group_name, resolved)
    lead = hidden.shape[:-1]
    return TokenLogprobs(
        logprobs=lp.view(lead),
        entropy=ent.view(lead) if return_entropy else None,
        lse=lse.view(lead),
        self_certainty=None,
        sum_p_sq=None,
    )


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
    _check_linear_inputs(hidden, weight, labels, bias, temperature, chunk_size)
    lead = hidden.shape[:-1]
    for name, g in (("grad_logprobs", grad_logprobs), ("grad_entropy", grad_entropy)):
        if g is not None and tuple(g.shape) != tuple(lead):
            raise ValueError(f"{name} must have shape {tuple(lead)}, got {tuple(g.shape)}")
    resolved = _resolve_backend(backend, hidden.device)
    h2, y = _flatten(hidden, labels)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    flat = lambda g: None if g is None else g.reshape(-1).to(acc)
    rows = LinearTiling.fused_rows(weight.shape[0], chunk_size, n=h2.shape[0])
    group_name = "" if process_group is None else process_group.group_name
    lp, lse, ent, gh, gw, gb = torch.ops.rlkern.linear_logprobs_fwd_bwd(
        h2, weight, y, bias, flat(grad_logprobs), flat(grad_entropy), float(temperature),
        int(ignore_index), bool(return_entropy), rows, group_name, resolved)
    outputs = TokenLogprobs(
        logprobs=lp.view(lead),
        entropy=ent.view(lead) if return_entropy else None,
        lse=lse.view(lead),
        self_certainty=None,
        sum_p_sq=None,
    )
    return LinearLogprobsWithGrad(outputs, gh.view(hidden.shape), gw,
                                  gb if bias is not None else None)


__all__ = [
    "LinearLogprobsWithGrad",
    "LinearTiling",
    "linear_logprobs",
    "linear_logprobs_with_grad",
    "run_fused",
]
