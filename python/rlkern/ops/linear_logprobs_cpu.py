"""The CPU path of the fused linear logprobs op (:mod:`rlkern.ops.linear_logprobs`): ATen matmul
tiles and the C++ epilogues, plus the vocabulary-parallel (``process_group``) helpers.

A tile of logits ``x = h[rows] W[cols]ᵀ (+ b[cols])`` is formed by one ATen matmul (oneDNN, AMX
for bf16) into a reused buffer; the C++ epilogue ``linear_logprobs_tile_fwd_`` folds it into the
per-row online-softmax state ``stats`` (columns :func:`rlkern.config.logprobs.linear_stats`:
``m, s, t, x_y``) and ``linear_logprobs_finish_out`` turns that into the outputs. The backward
recomputes each tile, turns it into ``∂/∂x`` in place (``linear_logprobs_tile_bwd_``) and
accumulates ``∂/∂h`` and ``∂/∂W`` in float32 with two more matmuls. Peak extra memory is the tile
buffer plus the float32 accumulators, independent of ``N·V``.

With ``softcap`` c > 0 (logit soft-capping) the C++ epilogues read ``z = c·tanh(x/c)`` of the
tile's ``x`` and the backward epilogue applies ``∂z/∂x = 1 − tanh²(x/c)``; the tiles and the
matmuls are unchanged.

With a vocabulary-parallel ``group`` each rank holds a consecutive block of ``W``'s rows (ranks
in order, blocks of any size): the per-row ``(m, s, t)`` are combined with all-reduces, the label
logit comes from the rank that owns it, ``∂W`` / ``∂b`` stay local and ``∂h`` is all-reduced.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from rlkern import backends
from rlkern.config.dtypes import acc_dtype
from rlkern.config.logprobs import linear_stats, outputs

#: A backward takes ``p`` from the forward's ``lse`` while ``|lse|`` is below this bound (the
#: C++ ``rlkern::logprobs::kBwdLseBound``); other rows need their complete summary.
BWD_LSE_BOUND = 256.0

#: ``grad_fn(logprobs_chunk, entropy_chunk, row_slice) -> (grad_logprobs, grad_entropy)``: the
#: upstream gradient of a row chunk, given its forward results (either may be None).
GradFn = Callable[[Tensor, Tensor | None, slice], tuple[Tensor | None, Tensor | None]]


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


# ---------------------------------------------------------------------------------------------
# Vocabulary-parallel helpers: rank r holds a consecutive block of W's rows, after those of the
# ranks before it (blocks may differ in size).


def group_of(group_name: str):
    """The process group registered under ``group_name`` ("" for none)."""
    if not group_name:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


def _shard_sizes(weight: Tensor, group) -> list[int]:
    """Every rank's number of vocabulary rows (one small all-gather)."""
    world = torch.distributed.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    torch.distributed.all_gather(sizes, torch.tensor([weight.shape[0]]), group=group)
    return [int(s) for s in sizes]


def global_vocab(weight: Tensor, group) -> int:
    """V of the full vocabulary: the sum of the ranks' shard sizes (which may differ, as when
    FSDP2 chunks dim 0 of a V not divisible by the world size)."""
    if group is None:
        return weight.shape[0]
    return sum(_shard_sizes(weight, group))


def _vocab_offset(group, weight: Tensor) -> int:
    """The first vocabulary id of this rank's shard: the rows of the ranks before it."""
    if group is None:
        return 0
    return sum(_shard_sizes(weight, group)[: torch.distributed.get_rank(group)])


def _bit_checksum(t: Tensor) -> Tensor:
    """An exact, order-independent fingerprint of ``t``'s bits: Σ bits·(i mod 65521 + 1) in
    int64 (wrapping), so equal tensors give equal sums on every rank whatever the threading,
    and a swap of two elements changes it."""
    flat = t.detach().contiguous().view(-1)
    if flat.is_floating_point():
        flat = flat.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[flat.element_size()])
    weights = torch.arange(flat.numel(), device=flat.device) % 65521 + 1
    return (flat.to(torch.int64) * weights).sum()


def check_replicated(group, **tensors: Tensor) -> None:
    """With a vocabulary-parallel group every rank must pass the same hidden states and labels
    (only the head is sharded). One all-reduce of a checksum per tensor (MAX and −MIN in one
    call) detects ranks that disagree; raises ``ValueError`` naming the tensor."""
    if group is None:
        return
    sums = torch.stack([_bit_checksum(t) for t in tensors.values()])
    both = torch.cat([sums, -sums])
    torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX, group=group)
    hi, neg_lo = both[: len(sums)], both[len(sums):]
    for name, h, lo in zip(tensors, hi.tolist(), (-neg_lo).tolist(), strict=True):
        if h != lo:
            raise ValueError(
                f"process_group: {name} differ across ranks (only the LM head may be sharded; "
                "every rank must pass the same rows)")


def _allreduce_stats(stats: Tensor, group, temperature: float) -> None:
    """Combine per-rank ``(m, s, t)`` into the global row summaries, in place.

    ``m`` (the raw max) by max; then each rank rescales to the global max (s' = α s,
    t' = α (t + d s), d = (m − m_glob) / T, α = e^d) and ``s, t`` are summed. ``x_y`` stays
    local (NaN off the owner).
    """
    dist = torch.distributed
    S = linear_stats()
    m = stats[:, S.m].clone()
    m_glob = m.clone()
    dist.all_reduce(m_glob, op=dist.ReduceOp.MAX, group=group)
    s, t = stats[:, S.s], stats[:, S.t]
    empty = s == 0
    d = torch.where(empty, torch.zeros_like(m), (m - m_glob) / temperature)
    alpha = torch.where(empty, torch.zeros_like(m), torch.exp(d))
    st = torch.stack([alpha * s, alpha * (t + d * s)], dim=1)
    dist.all_reduce(st, group=group)
    stats[:, S.m] = m_glob
    stats[:, S.s], stats[:, S.t] = st[:, 0], st[:, 1]


def _allreduce_owned(values: Tensor, group) -> Tensor:
    """Rows computed by the rank that owns the label (NaN elsewhere) → the same on all ranks."""
    out = torch.nan_to_num(values, nan=0.0)
    torch.distributed.all_reduce(out, group=group)
    return out


# ---------------------------------------------------------------------------------------------
# Tiles and the C++ epilogues


def _tile_logits(h: Tensor, w: Tensor, b: Tensor | None, out: Tensor) -> Tensor:
    if b is None:
        return torch.mm(h, w.t(), out=out)
    return torch.addmm(b, h, w.t(), out=out)


def _tile_buffer(buf: Tensor, rows: int, cols: int) -> Tensor:
    return buf[: rows * cols].view(rows, cols)


def _stats_init(n: int, device: torch.device) -> Tensor:
    """An empty running state per row: m = −inf, s = t = 0, no label logit yet (NaN)."""
    S = linear_stats()
    stats = torch.zeros(n, len(S), dtype=torch.float64, device=device)
    stats[:, S.m] = -math.inf
    stats[:, S.x_y] = math.nan
    return stats


def _row_lists(**rows: Tensor | None) -> list[Tensor | None]:
    """A list indexed by :func:`rlkern.config.logprobs.outputs` holding ``rows`` by name."""
    return [rows.get(o.name) for o in outputs()]


def _finish(stats, labels, temperature, ignore_index, with_entropy, dtype, group):
    acc = acc_dtype(dtype)
    n = labels.shape[0]
    logprobs = torch.empty(n, dtype=acc)
    lse = torch.empty(n, dtype=acc)
    entropy = torch.empty(n, dtype=acc) if with_entropy else None
    backends.cpp_ops().linear_logprobs_finish_out(
        stats, labels, temperature, ignore_index,
        _row_lists(logprobs=logprobs, lse=lse, entropy=entropy))
    if group is not None:
        logprobs = _allreduce_owned(logprobs, group)
    return logprobs, lse, entropy


def _tile_bwd(tile, labels, offset, lse, entropy, g_lp, g_ent, g_lse, temperature, ignore_index,
              stats=None, softcap=0.0):
    """``tile`` → its gradient ``∂L/∂x``, in place; rows with a complete summary in ``stats``
    (``m`` not NaN) take it from there, exactly (see :func:`_exact_stats`). With ``softcap``
    c > 0 the epilogue forms ``z = c·tanh(x/c)`` itself and applies ``∂z/∂x = 1 − tanh²``."""
    backends.cpp_ops().linear_logprobs_tile_bwd_(
        tile, labels, offset, _row_lists(lse=lse, entropy=entropy),
        _row_lists(logprobs=g_lp, entropy=g_ent, lse=g_lse), temperature, ignore_index, tile,
        stats, softcap)


def _row_stats(hidden, weight, labels, bias, temperature, ignore_index, with_entropy, tiling,
               group, softcap=0.0) -> Tensor:
    """The complete float64 row summaries ``(n, len(linear_stats()))``, tile by tile."""
    ops = backends.cpp_ops()
    n, vocab = hidden.shape[0], weight.shape[0]
    offset = _vocab_offset(group, weight)
    stats = _stats_init(n, hidden.device)
    rows, cols = tiling.chunk_size, tiling.vocab_tile
    buf = torch.empty(min(rows, n) * min(cols, vocab), dtype=hidden.dtype)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        for v0 in range(0, vocab, cols):
            v1 = min(vocab, v0 + cols)
            tile = _tile_logits(hidden[r0:r1], weight[v0:v1],
                                None if bias is None else bias[v0:v1],
                                _tile_buffer(buf, r1 - r0, v1 - v0))
            ops.linear_logprobs_tile_fwd_(tile, labels[r0:r1], offset + v0, temperature,
                                          ignore_index, with_entropy, stats[r0:r1], softcap)
    if group is not None:
        _allreduce_stats(stats, group, temperature)
    return stats


def forward_cpu(hidden, weight, labels, bias, temperature, ignore_index, with_entropy, tiling,
                group, softcap=0.0):
    """``(logprobs, lse, entropy or None)`` of the rows of ``hidden``, tile by tile (of the
    soft-capped logits ``c·tanh(x/c)`` when ``softcap`` c > 0)."""
    stats = _row_stats(hidden, weight, labels, bias, temperature, ignore_index, with_entropy,
                       tiling, group, softcap)
    return _finish(stats, labels, temperature, ignore_index, with_entropy, hidden.dtype, group)


def _exact_stats(hidden, weight, labels, bias, lse, temperature, ignore_index, tiling,
                 group, softcap=0.0) -> Tensor | None:
    """The row summaries the backward needs besides the forward's ``lse``: ``None`` while every
    ``|lse|`` is below :data:`BWD_LSE_BOUND` (the float lse then pins ``p`` down), else the
    complete summaries, recomputed with the backward's own tiles (one more matmul pass). The
    same tiles matter: the shift must be the max of exactly the logits the backward forms (a
    different blocking may round a logit of 1e10 by 1e3, i.e. ``p`` by ``e^1000``).

    With a process group ``lse`` is the global one, the same on every rank, so every rank
    takes the same branch and joins the same all-reduces."""
    far = ~(lse.abs() < BWD_LSE_BOUND) & ~torch.isnan(lse) & (labels != ignore_index)
    if not bool(far.any()):
        return None
    return _row_stats(hidden, weight, labels, bias, temperature, ignore_index, True, tiling,
                      group, softcap)


def backward_cpu(hidden, weight, labels, bias, lse, entropy, g_lp, g_ent, g_lse, temperature,
                 ignore_index, tiling, group, softcap=0.0):
    """Vocab tiles outside, row chunks inside: ∂W of a vocab tile is finished (one write) before
    the next tile, so only a (vocab_tile, H) float32 accumulator is needed for it; ∂h
    accumulates in a (N, H) float32 buffer. Rows whose ``|lse|`` is not moderate take their
    gradient from recomputed summaries (:func:`_exact_stats`)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    offset = _vocab_offset(group, weight)
    rows, cols = tiling.chunk_size, tiling.vocab_tile
    acc = acc_dtype(hidden.dtype)
    grad_h = torch.zeros(n, hidden.shape[1], dtype=acc)
    grad_w = torch.empty_like(weight)
    grad_b = None if bias is None else torch.empty_like(bias)
    buf = torch.empty(min(rows, n) * min(cols, vocab), dtype=hidden.dtype)
    single_chunk = n <= rows
    gw_acc = None if single_chunk else torch.empty(min(cols, vocab), weight.shape[1], dtype=acc)
    part = lambda t, sl: None if t is None else t[sl]
    exact = _exact_stats(hidden, weight, labels, bias, lse, temperature, ignore_index, tiling,
                         group, softcap)
    for v0 in range(0, vocab, cols):
        v1 = min(vocab, v0 + cols)
        w_tile = weight[v0:v1]
        gb_tile = None if bias is None else torch.zeros(v1 - v0, dtype=acc)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            sl = slice(r0, r1)
            tile = _tile_logits(hidden[sl], w_tile, None if bias is None else bias[v0:v1],
                                _tile_buffer(buf, r1 - r0, v1 - v0))
            _tile_bwd(tile, labels[sl], offset + v0, lse[sl], part(entropy, sl), part(g_lp, sl),
                      part(g_ent, sl), part(g_lse, sl), temperature, ignore_index,
                      part(exact, sl), softcap)
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


def fused_cpu(hidden, weight, labels, bias, temperature, ignore_index, with_entropy,
              chunk_rows, grad_fn: GradFn, group, softcap=0.0):
    """One pass: per row chunk, the full logits rows → stats → upstream grads → ∂x in place →
    ∂h = ∂x W (one matmul over V) and ∂W += ∂xᵀ h.

    ∂W accumulates in the weight's dtype with ``addmm_`` (oneDNN sums each chunk's product in
    float32 and rounds once per chunk): a float32 copy of ∂W would cost 4·V·H bytes and a
    read-modify-write of them per chunk. The default chunk holds 2^28 logits, so bf16 sees a
    handful of roundings at most."""
    ops = backends.cpp_ops()
    n, vocab = hidden.shape[0], weight.shape[0]
    offset = _vocab_offset(group, weight)
    acc = acc_dtype(hidden.dtype)
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
        tile = _tile_logits(hidden[sl], weight, bias, _tile_buffer(buf, r1 - r0, vocab))
        stats = _stats_init(r1 - r0, hidden.device)
        ops.linear_logprobs_tile_fwd_(tile, labels[sl], offset, temperature, ignore_index,
                                      with_entropy, stats, softcap)
        if group is not None:
            _allreduce_stats(stats, group, temperature)
        lp, ls, ent = _finish(stats, labels[sl], temperature, ignore_index, with_entropy,
                              hidden.dtype, group)
        logprobs[sl], lse[sl] = lp, ls
        if entropy is not None:
            entropy[sl] = ent
        g_lp, g_ent = grad_fn(lp, ent, sl)
        # The chunk's complete summaries are at hand: every row takes the exact path.
        _tile_bwd(tile, labels[sl], offset, ls, ent, g_lp, g_ent, None, temperature,
                  ignore_index, stats, softcap)
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
