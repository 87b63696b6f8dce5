"""Launch heuristics of the Triton kernels of ``kernels/linear_logprobs.py``: the tile shapes,
warps, stages and vocabulary splits of the forward and of the backward's two passes, as
functions of the problem shape and dtype (never of the data). Imports only triton.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import triton


class LinearLaunchConfig(NamedTuple):
    """Compile-time shape of a launch: ``(block_m, block_n)`` logits tiles formed in
    ``block_k`` steps of ``H`` by ``num_warps`` warps with ``num_stages`` pipelined loads;
    ``split_cols`` vocabulary columns per split (a multiple of ``block_n``)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_cols: int


class LinearBwdConfig(NamedTuple):
    """Launch shapes of the backward's two passes: ``dh`` (its ``split_cols`` cuts the
    vocabulary into the ∂h splits) and ``dw`` (one program per ``block_n`` vocabulary rows;
    its ``split_cols`` is unused)."""

    dh: LinearLaunchConfig
    dw: LinearLaunchConfig


# Tiles of 128 × 128 logits are the usual tensor-core GEMM tile: 64 fp32 accumulators per
# thread over 8 warps, and with BLOCK_K = 64 (bf16/fp16) three pipeline stages take
# 3 · (128 + 128) · 64 · 2 B = 96 KiB of shared memory, which fits sm_80 (164 KiB) and sm_90.
# Register counts of these defaults are in the AOT report (all without spills on sm_90).
_MAX_BLOCK = 128
_BWD_SHORT = 64  # the backward tiles hold a second product: one side is halved (see bwd_config)
_MAX_SPLITS = 64  # forward: vocabulary splits (parallelism for few rows; a tiny merge)
_BWD_PROGRAMS = 256  # backward ∂h pass: target programs (about two per SM on an H100)
_BWD_PARTIAL_BYTES = 1 << 28  # cap on the per-split ∂h buffers (256 MiB)


def _pow2_clamp(value: int, low: int, high: int) -> int:
    return max(low, min(triton.next_power_of_2(max(int(value), 1)), high))


def _block_k(hidden_size: int, element_size: int) -> int:
    """``BLOCK_K``: 64 for 2-byte inputs (128 bytes of each row per stage), 16 for 4- and
    8-byte ones (fp32's tf32x3 products split every operand in two, doubling its registers:
    at 32, the fp32 forward spilled on sm_80).

    When ``H`` is not a multiple of 16, Triton cannot prove the rows 16-byte aligned and loads
    them element by element, each element with its own 64-bit address in registers: the K step
    drops to 16 (at 64 a bf16 forward tile needed over 1 KiB of spills on sm_90).
    """
    cap = 64 if element_size <= 2 and hidden_size % 16 == 0 else 16
    return _pow2_clamp(hidden_size, 16, cap)


def _num_warps(block_m: int, block_n: int) -> int:
    return 8 if block_m * block_n >= 64 * 64 else 4


def input_precision(element_size: int) -> str:
    """tl.dot precision: fp32 inputs use "tf32x3" (three TF32 tensor-core products of the
    split operands: close to fp32 accuracy at several times the speed of the "ieee" FMA path,
    which also needs far more registers); fp64 needs "ieee"; bf16/fp16 ignore it."""
    return "ieee" if element_size == 8 else "tf32x3"


# Whether the kernels above were decorated for Triton's interpreter (TRITON_INTERPRET=1 when
# this module was imported: Triton decides at decoration time).
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_options(element_size: int) -> dict[str, Any]:
    return {"INPUT_PRECISION": input_precision(element_size),
            "UPCAST_DOT": _INTERPRETED and element_size == 2}


def fwd_config(n_rows: int, vocab: int, hidden_size: int, element_size: int
               ) -> LinearLaunchConfig:
    """Forward launch shape for ``hidden (N, H)``, ``weight (V, H)`` of ``element_size`` bytes.

    ``block_n = clamp(next_pow2(V), 16, 128)``, ``block_m = clamp(next_pow2(N), 16, 128)``,
    ``block_k`` from :func:`_block_k` (bf16 at H = 2048: 64), 8 warps from 64 × 64 tiles up
    (4 below), 3 stages; the vocabulary is cut into at most 64 splits of whole tiles (bf16 at
    V = 151936: 1187 tiles in 63 splits of 19 tiles). fp64 (a correctness path: gradchecks)
    caps both sides at 64, its accumulators taking two registers each.

    Batch invariance: ``block_n``, ``block_k`` and the splits — which fix the per-row
    arithmetic (which columns are summarised together, in which order, and each logit's
    K-summation) — depend on ``(V, H, dtype)`` only, never on ``N``. Only ``block_m`` shrinks
    for ``N < 128`` (small problems and the interpreter); that regroups rows but leaves every
    row's reduction order as is (on a GPU the MMA instruction shape may change with it).
    """
    side = _MAX_BLOCK if element_size <= 4 else _BWD_SHORT  # fp64: 64 × 64 (8-byte acc)
    block_n = _pow2_clamp(vocab, 16, side)
    block_k = _block_k(hidden_size, element_size)
    block_m = _pow2_clamp(n_rows, 16, side)
    tiles = triton.cdiv(max(vocab, 1), block_n)
    split_cols = block_n * triton.cdiv(tiles, min(tiles, _MAX_SPLITS))
    return LinearLaunchConfig(block_m, block_n, block_k, _num_warps(block_m, block_n), 3,
                              split_cols)


def bwd_config(n_rows: int, vocab: int, hidden_size: int, element_size: int
               ) -> LinearBwdConfig:
    """Backward launch shapes: the ∂h pass and the ∂W pass.

    Each tile ends in a second product whose fp32 accumulator lives in memory: the ∂h pass
    read-modify-writes ``block_m × H`` elements per tile, the ∂W pass ``block_n × H``. That
    traffic falls with the *other* side of the tile (∂h: ``block_n/4`` MMA FLOPs per
    accumulator byte, ∂W: ``block_m/4``), so the long side of each pass's tile is the one
    that divides its traffic and the short side (64) keeps registers below spilling:

    * ∂h: ``block_m = clamp(next_pow2(N), 16, 64)``, ``block_n = clamp(next_pow2(V), 16, 128)``;
      the vocabulary is cut into ``splits`` so that ``row blocks × splits`` reaches about 256
      programs, within a 256 MiB budget for the per-split ∂h buffers (a single split, written
      straight into ``grad_hidden``, once ``N ≥ 256·block_m``);
    * ∂W: ``block_m = clamp(next_pow2(N), 16, 128)``, ``block_n = clamp(next_pow2(V), 16, 64)``,
      one program per vocabulary tile.

    fp32 / fp64 inputs (tf32x3 / fp64 products need about twice the registers) use 64 × 64
    tiles in both passes, and 32 on the short side when ``H % 16 != 0``. ``block_k`` as in
    the forward; 8 warps from 64 × 64 tiles up (4 below); 3 stages.

    Where the time goes at LM-head shapes: the accumulator traffic, at 16–32 FLOPs per byte,
    is an order of magnitude below an H100's ridge point (~300 FLOP/B for bf16), so the
    backward is bound by memory (L2) traffic rather than by tensor-core throughput — as an
    atomic-add scheme, which moves the same bytes, would be. The owned-slice scheme's extra
    logits recompute therefore costs little wall time and buys determinism.
    """
    long_side = _MAX_BLOCK if element_size <= 2 else _BWD_SHORT
    # fp32 with an unaligned H (element-wise loads, see _block_k) on top of tf32x3: 32.
    short_side = _BWD_SHORT // 2 if element_size > 2 and hidden_size % 16 else _BWD_SHORT
    block_k = _block_k(hidden_size, element_size)
    # ∂h pass
    bm = _pow2_clamp(n_rows, 16, short_side)
    bn = _pow2_clamp(vocab, 16, long_side)
    tiles = triton.cdiv(max(vocab, 1), bn)
    row_blocks = triton.cdiv(max(n_rows, 1), bm)
    acc_size = 8 if element_size == 8 else 4
    by_memory = max(1, _BWD_PARTIAL_BYTES // max(n_rows * hidden_size * acc_size, 1))
    splits = max(1, min(triton.cdiv(_BWD_PROGRAMS, row_blocks), tiles, by_memory))
    dh = LinearLaunchConfig(bm, bn, block_k, _num_warps(bm, bn), 3,
                            bn * triton.cdiv(tiles, splits))
    # ∂W pass
    bm = _pow2_clamp(n_rows, 16, long_side)
    bn = _pow2_clamp(vocab, 16, short_side)
    dw = LinearLaunchConfig(bm, bn, block_k, _num_warps(bm, bn), 3, bn)
    return LinearBwdConfig(dh, dw)
