"""Triton kernels for token logprobs straight from hidden states and the LM head
(ALGORITHMS.md §1, "Fused linear form"): GEMM tiles with an online-softmax epilogue.

For row ``i`` with hidden state ``h_i`` (length ``H``), label ``y`` and temperature ``T``::

    x_iv   = h_i · W_v (+ b_v)                  logits, formed tile by tile, never stored
    z_iv   = x_iv / T                           (computed as x · (1/T), 1/T a runtime scalar)
    lse_i  = log Σ_v exp(z_iv)
    logp_i = z_iy − lse_i
    ent_i  = lse_i − Σ_v p_iv z_iv,             p_iv = exp(z_iv − lse_i)

and for the backward, with upstream gradients ``g_lp``, ``g_ent``, ``g_lse`` per row::

    dZ_iv = [ g_lp (1[v = y] − p_iv) + g_ent p_iv (E_p[z] − z_iv) + g_lse p_iv ] / T,
    E_p[z] = lse − entropy,
    ∂h = dZ W,   ∂W = dZᵀ h,   ∂b = Σ_rows dZ.

Logit soft-capping (``softcap=c``, Gemma 2): right after each tile's GEMM, ``x`` is replaced
by ``c·tanh(x/c)`` in registers (everything above then reads that ``x``), and the backward
multiplies ``dZ`` by ``∂z/∂x = 1 − tanh²(x/c)`` before its products.

The ``(N, V)`` logits never exist in memory: each program forms a ``(BLOCK_M, BLOCK_N)`` logits
tile in registers with ``tl.dot`` over ``K = H`` in ``BLOCK_K`` steps (fp32 accumulation) and
consumes it at once.

Forward (two kernels). Grid ``(row blocks, vocab splits)``: a program streams its vocabulary
range in ``BLOCK_N``-wide tiles and folds every tile into per-row online-softmax summaries
(Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"; the summary and merge
of ``csrc/include/rlkern/online_softmax.h``)::

    m = max x,   s = Σ exp((x − m)/T),   t = Σ exp((x − m)/T)·(x − m)/T

(the max of the *raw* logits, subtracted before ``1/T`` scales them: finite rows stay finite
at any magnitude and temperature), written per (split, row) to a small fp32 scratch together
with the label's logit (kept by the split that owns the label). A second tiny kernel merges
the splits of each row in a fixed order and writes ``logp = (x_y − m)/T − log s``,
``lse = m/T + log s``, ``entropy = log s − t/s``.

Backward (deterministic, three kernels, plus two small ones for the row references). Every
logits tile is recomputed from ``h`` and ``W`` and turned into ``dZ`` in registers, with
``p = exp((x − shift)/T − ref)``: ``shift = 0, ref = lse`` for a row with a moderate lse
(``|lse| < 256``), else the row's max and ``log s`` recomputed from the pass's own tiles
(``_linear_logprobs_refs_kernel``; row blocks without such a row skip the recompute); then

* ``_linear_logprobs_bwd_dh_kernel`` (grid ``(row blocks, vocab splits)``) accumulates
  ``dZ @ W_tile`` into the program's own slice of a per-split fp32 buffer and
  ``_sum_splits_kernel`` adds the splits into ``grad_hidden`` in a fixed order;
* ``_linear_logprobs_bwd_dw_kernel`` (grid: vocab tiles) owns ``BLOCK_N`` rows of ``∂W`` and
  the matching ``∂b``, loops over all row blocks in order and accumulates ``dZᵀ @ h_tile``.

Every fp32 element is thus updated by exactly one program in a fixed order: the gradients are
bitwise reproducible run to run (no atomics). The price is one more recompute of the logits
than an atomic scheme (the dh and dW passes each form the tiles: 8·N·H·V backward FLOPs
instead of 6·N·H·V). Both schemes move the same fp32 accumulator bytes — every tile
read-modify-writes ``(BLOCK_M + BLOCK_N)·H`` accumulator elements, atomically or not — and
that traffic, not the tensor-core work, bounds the backward at LM-head shapes, so the extra
recompute costs little wall time; see :func:`bwd_config`.

Units: the epilogues work in base 2, ``d = (x − m) · (log₂e / T)``, so that ``exp(z − m)`` is
one ``exp2`` (kernels/_common.py); per-row results are converted back with one multiply by
``ln 2``.

Files: the ``@triton.jit`` kernels and their tile helpers are in
``kernels/_linear_logprobs_kernels.py``, the launch heuristics (:func:`fwd_config`,
:func:`bwd_config`) in ``kernels/_linear_logprobs_config.py``; this module holds the launchers
and the ahead-of-time compilation specs.

Layouts: ``hidden (N, H)`` and ``weight (V, H)`` with unit last-dim stride and any row stride;
offsets are 64-bit (``N·H``, ``V·H`` may exceed 2³¹). This module imports only triton; the
launchers take torch tensors (anything with ``shape``, ``stride()``, ``element_size()`` and, for
the scratch buffers, ``new_empty`` / ``new_zeros``) but never import torch.
"""

from __future__ import annotations

from typing import Any

import triton

from rlkern.kernels._common import (
    AOT_DTYPES,
    aot_signature,
    aot_spec,
    split_inv_temperature,
)
from rlkern.kernels._linear_logprobs_config import (
    LinearBwdConfig,
    LinearLaunchConfig,
    bwd_config,
    dot_options,
    fwd_config,
    input_precision,
)
from rlkern.kernels._linear_logprobs_kernels import (
    N_STATS,
    _linear_logprobs_bwd_dh_kernel,
    _linear_logprobs_bwd_dw_kernel,
    _linear_logprobs_fwd_kernel,
    _linear_logprobs_merge_kernel,
    _linear_logprobs_refs_kernel,
    _sum_splits_kernel,
)

__all__ = [
    "AOT_SPECS",
    "LinearBwdConfig",
    "LinearLaunchConfig",
    "bwd_config",
    "fwd_config",
    "linear_logprobs_bwd",
    "linear_logprobs_fwd",
]

# ---------------------------------------------------------------------------------------------
# Launchers


def _check_rows_layout(hidden: Any, weight: Any, bias: Any | None) -> tuple[int, int, int]:
    n_rows, hidden_size = hidden.shape
    vocab, k = weight.shape
    if k != hidden_size:
        raise ValueError(f"weight must have shape (V, {hidden_size}), got {tuple(weight.shape)}")
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(f"{name} must have a unit last-dim stride, got {t.stride()}")
    if bias is not None and (tuple(bias.shape) != (vocab,) or (vocab > 1 and bias.stride(0) != 1)):
        raise ValueError(f"bias must be a contiguous ({vocab},) tensor")
    return n_rows, vocab, hidden_size


def linear_logprobs_fwd(
    hidden: Any,
    weight: Any,
    labels: Any,
    bias: Any | None,
    logprobs: Any,
    lse: Any,
    entropy: Any | None,
    *,
    temperature: float,
    ignore_index: int,
    config: LinearLaunchConfig | None = None,
    softcap: float = 0.0,
) -> None:
    """Fill the per-row outputs of ``token_logprobs(hidden @ weight.T + bias, labels)``.

    Args:
        hidden: ``(N, H)`` bf16 / fp16 / fp32 / fp64, ``stride(1) == 1``, any row stride.
        weight: ``(V, H)`` same dtype, ``stride(1) == 1``, any row stride.
        labels: ``(N,)`` int64, contiguous; each in ``[0, V)`` or ``ignore_index``.
        bias: ``(V,)`` same dtype, contiguous, or ``None``.
        logprobs, lse: ``(N,)`` contiguous outputs, fp32 (fp64 for fp64 inputs).
        entropy: like ``logprobs``, or ``None`` (not computed: the ``t`` sums are skipped).
        temperature: ``T > 0``; logits are multiplied by ``1/T`` (a runtime scalar).
        ignore_index: rows with this label get 0 in every output.
        config: override of :func:`fwd_config` (tests, tuning).
        softcap: ``c > 0``: every logit is ``c·tanh(x/c)`` (formed in the tile epilogue,
            before ``1/T``; ``c`` is a runtime fp32 scalar); 0: none.

    Formulas: ``lse = m + log s``, ``logp = z_y − lse``, ``entropy = log s − t/s`` from the
    merged summaries (module docstring). A label outside ``[0, V)`` that is not
    ``ignore_index`` gives NaN in ``logprobs`` and is never used as an address.

    Scratch: ``splits · 4 · N`` elements of the output dtype (``lse.new_empty``); no ``(N, V)``
    buffer. Two launches: the tile kernel, grid ``(cdiv(N, block_m), splits)``, and the merge.
    """
    n_rows, vocab, hidden_size = _check_rows_layout(hidden, weight, bias)
    if n_rows == 0:
        return
    if vocab == 0:
        raise ValueError("weight must have at least one row (V >= 1)")
    cfg = config or fwd_config(n_rows, vocab, hidden_size, hidden.element_size())
    n_splits = triton.cdiv(vocab, cfg.split_cols)
    stats = lse.new_empty((n_splits, N_STATS, n_rows))
    inv_t = split_inv_temperature(temperature)
    has_entropy = entropy is not None
    _split_stats(hidden, weight, labels, bias, lse, stats, cfg, inv_t, ignore_index,
                 has_entropy, only_far=False, softcap=softcap)
    _linear_logprobs_merge_kernel[(triton.cdiv(n_rows, _MERGE_BLOCK),)](
        stats, labels, logprobs, lse, entropy if has_entropy else lse,
        n_rows, vocab, n_splits, cfg.split_cols, *inv_t, int(ignore_index),
        BLOCK=_MERGE_BLOCK, HAS_ENTROPY=has_entropy, num_warps=4,
    )


def _split_stats(hidden, weight, labels, bias, lse, stats, cfg: LinearLaunchConfig, inv_t,
                 ignore_index: int, has_entropy: bool, *, only_far: bool,
                 softcap: float = 0.0) -> None:
    """The forward tile kernel: per (split, row) summaries into ``stats``."""
    n_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    _linear_logprobs_fwd_kernel[(triton.cdiv(n_rows, cfg.block_m), stats.shape[0])](
        hidden, weight, bias if bias is not None else hidden, labels, lse, stats,
        n_rows, vocab, hidden_size, cfg.split_cols, hidden.stride(0), weight.stride(0),
        *inv_t, int(ignore_index), float(softcap),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        HAS_BIAS=bias is not None, HAS_ENTROPY=has_entropy, **dot_options(hidden.element_size()),
        ONLY_FAR=only_far, SOFTCAP=softcap > 0, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def _row_refs(hidden, weight, labels, bias, lse, entropy, cfg: LinearLaunchConfig, inv_t,
              ignore_index: int, with_ez: bool, softcap: float = 0.0) -> tuple[Any, Any, Any]:
    """The per-row references ``(shift, ref₂, E_p[z'])`` a backward pass needs, for the tiles
    of the pass configuration ``cfg`` (see ``_linear_logprobs_refs_kernel``). Rows with a
    moderate lse take them from the forward; the rest are recomputed by the forward's tile
    kernel run with ``cfg``'s blocks, so that their max is that of exactly the logits the
    pass forms (another blocking may round a logit of 1e10 by 1e3, i.e. ``p`` by ``e^1000``).
    Row blocks without such a row return at once: on ordinary inputs this costs two small
    launches and reads of ``lse``, no matmul."""
    n_rows = hidden.shape[0]
    vocab = weight.shape[0]
    tiles = triton.cdiv(vocab, cfg.block_n)
    # Whole tiles per split, as the pass walks them (at most _MAX_REF_SPLITS splits).
    split_cols = cfg.block_n * triton.cdiv(tiles, min(tiles, _MAX_REF_SPLITS))
    ref_cfg = cfg._replace(split_cols=split_cols)
    n_splits = triton.cdiv(vocab, split_cols)
    stats = lse.new_empty((n_splits, N_STATS, n_rows))
    _split_stats(hidden, weight, labels, bias, lse, stats, ref_cfg, inv_t, ignore_index, with_ez,
                 only_far=True, softcap=softcap)
    shift, ref2 = lse.new_empty((n_rows,)), lse.new_empty((n_rows,))
    ez = lse.new_empty((n_rows,)) if with_ez else ref2
    _linear_logprobs_refs_kernel[(triton.cdiv(n_rows, _MERGE_BLOCK),)](
        stats, labels, lse, entropy if with_ez else lse, shift, ref2, ez, n_rows, n_splits,
        *inv_t, int(ignore_index), BLOCK=_MERGE_BLOCK, HAS_ENTROPY=with_ez, num_warps=4,
    )
    return shift, ref2, ez


_MAX_REF_SPLITS = 64


_MERGE_BLOCK = 128
_SUM_BLOCK = 1024


def linear_logprobs_bwd(
    hidden: Any,
    weight: Any,
    labels: Any,
    bias: Any | None,
    lse: Any,
    entropy: Any | None,
    grad_logprobs: Any | None,
    grad_entropy: Any | None,
    grad_lse: Any | None,
    grad_hidden: Any | None,
    grad_weight: Any | None,
    grad_bias: Any | None,
    *,
    temperature: float,
    ignore_index: int,
    config: LinearBwdConfig | None = None,
    softcap: float = 0.0,
) -> None:
    """Add the parameter gradients of ``L = Σ g_lp·logp + Σ g_ent·entropy + Σ g_lse·lse``
    into fp32 accumulators.

    Per logit (recomputed tile by tile, never stored), with ``p = exp(z − lse)``::

        dZ = [ g_lp (1[v = y] − p) + g_ent p (E_p[z] − z) + g_lse p ] / T,  E_p[z] = lse − entropy

    (``p`` and ``E_p[z] − z`` taken relative to the row max, recomputed, for rows whose
    ``|lse|`` is 256 or more: see ``_linear_logprobs_refs_kernel``).

    and ``grad_hidden += dZ W``, ``grad_weight += dZᵀ h``, ``grad_bias += Σ_rows dZ``.

    Args:
        hidden, weight, labels, bias, temperature, ignore_index: as in
            :func:`linear_logprobs_fwd` (the same values as the forward).
        lse: ``(N,)`` fp32 (fp64 for fp64 inputs), contiguous, from the forward.
        entropy: like ``lse``; required when ``grad_entropy`` is given.
        grad_logprobs, grad_entropy, grad_lse: like ``lse``, or ``None`` (no such term).
        grad_hidden: ``(N, H)``, ``grad_weight``: ``(V, H)``, ``grad_bias``: ``(V,)``: the
            **accumulators** — contiguous, in the dtype of ``lse`` (fp32, or fp64 for fp64
            inputs), never the parameter dtype. The gradient is *added* to what they hold
            (pass zeros for a plain gradient); the caller casts them to the parameter dtype.
            Each may be ``None`` to skip it (e.g. a frozen LM head: ``grad_weight=None``).
        config: override of :func:`bwd_config` (tests, tuning).
        softcap: as in :func:`linear_logprobs_fwd`; ``dZ`` is then taken wrt the capped
            logits and multiplied by ``1 − tanh²(x/c)``.

    Ignored rows contribute nothing (whatever their upstream gradients hold). ``dZ`` is rounded
    to the input dtype before the ∂h / ∂W products (tensor-core inputs), as the CPU path
    rounds its logits-gradient tile.

    Deterministic: every accumulator element is updated by a single program in a fixed order
    (no atomics), so repeated calls give bitwise-identical gradients. Scratch: when the ∂h pass
    runs in ``splits > 1`` vocabulary splits, ``splits · N · H`` accumulator-dtype elements
    (``grad_hidden.new_zeros``), at most 256 MiB (see :func:`bwd_config`).
    """
    if grad_entropy is not None and entropy is None:
        raise ValueError("grad_entropy needs the forward's entropy")
    if grad_bias is not None and bias is None:
        raise ValueError("grad_bias needs bias")
    n_rows, vocab, hidden_size = _check_rows_layout(hidden, weight, bias)
    for name, acc, shape in (("grad_hidden", grad_hidden, (n_rows, hidden_size)),
                             ("grad_weight", grad_weight, (vocab, hidden_size)),
                             ("grad_bias", grad_bias, (vocab,))):
        if acc is None:
            continue
        if tuple(acc.shape) != shape or not acc.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {shape} accumulator")
        if acc.dtype != lse.dtype:
            raise TypeError(f"{name} must have the accumulator dtype {lse.dtype}, got "
                            f"{acc.dtype} (cast to the parameter dtype afterwards)")
    if n_rows == 0 or vocab == 0:  # H = 0 still has a bias gradient (the logits are b)
        return
    cfg = config or bwd_config(n_rows, vocab, hidden_size, hidden.element_size())
    inv_t = split_inv_temperature(temperature)
    has = {"HAS_BIAS": bias is not None, "HAS_GRAD_LP": grad_logprobs is not None,
           "HAS_GRAD_ENT": grad_entropy is not None, "HAS_GRAD_LSE": grad_lse is not None,
           "SOFTCAP": softcap > 0, **dot_options(hidden.element_size())}

    def rows_in(pass_cfg: LinearLaunchConfig) -> tuple:
        refs = _row_refs(hidden, weight, labels, bias, lse, entropy, pass_cfg, inv_t,
                         ignore_index, grad_entropy is not None, softcap)
        return (hidden, weight, bias if bias is not None else hidden, labels, *refs,
                grad_logprobs if grad_logprobs is not None else lse,  # placeholders: unread
                grad_entropy if grad_entropy is not None else lse,
                grad_lse if grad_lse is not None else lse)

    if grad_hidden is not None:
        dh = cfg.dh
        n_splits = triton.cdiv(vocab, dh.split_cols)
        # One split writes straight into the caller's accumulator; several write their own
        # zeroed slices, added in split order afterwards.
        partial = grad_hidden if n_splits == 1 else grad_hidden.new_zeros(
            (n_splits, n_rows, hidden_size))
        _linear_logprobs_bwd_dh_kernel[(triton.cdiv(n_rows, dh.block_m), n_splits)](
            *rows_in(dh), partial, n_rows, vocab, hidden_size, dh.split_cols,
            hidden.stride(0), weight.stride(0), *inv_t, int(ignore_index), float(softcap), **has,
            BLOCK_M=dh.block_m, BLOCK_N=dh.block_n, BLOCK_K=dh.block_k,
            num_warps=dh.num_warps, num_stages=dh.num_stages,
        )
        if n_splits > 1:
            numel = n_rows * hidden_size
            _sum_splits_kernel[(triton.cdiv(numel, _SUM_BLOCK),)](
                partial, grad_hidden, numel, n_splits, BLOCK=_SUM_BLOCK, num_warps=4)

    if grad_weight is not None or grad_bias is not None:
        dw = cfg.dw
        _linear_logprobs_bwd_dw_kernel[(triton.cdiv(vocab, dw.block_n),)](
            *rows_in(dw),
            grad_weight if grad_weight is not None else lse,
            grad_bias if grad_bias is not None else lse,
            n_rows, vocab, hidden_size, hidden.stride(0), weight.stride(0), *inv_t,
            int(ignore_index), float(softcap), **has, HAS_GRAD_WEIGHT=grad_weight is not None,
            HAS_GRAD_BIAS=grad_bias is not None,
            BLOCK_M=dw.block_m, BLOCK_N=dw.block_n, BLOCK_K=dw.block_k,
            num_warps=dw.num_warps, num_stages=dw.num_stages,
        )


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation specs (consumed by rlkern.aot)

# (N, H, V) of the default configs: a Qwen-sized LM head (H = 2048, V = 151936) on a
# 4096-token micro-batch, and a small odd shape (the interpreter tests' kind).
_AOT_SHAPES = ((4096, 2048, 151936), (33, 40, 257))


def _aot_signature(fn: Any, dtype: str) -> dict[str, str]:
    """Triton signature of ``fn`` in argument order: ``hidden/weight/bias`` in ``dtype``,
    labels int64, other pointers fp32, constexprs ``constexpr``, scalars i32 / fp32."""
    types = {"hidden_ptr": f"*{dtype}", "weight_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}",
             "labels_ptr": "*i64", "inv_temperature": "fp32", "inv_temperature_lo": "fp32",
             "softcap": "fp32"}
    return aot_signature(fn, types, lambda name: "*fp32" if name.endswith("_ptr") else "i32")


def _aot_divisible(signature: dict[str, str], values: dict[str, int]) -> list[str]:
    """Args Triton's launcher would specialise as 16-divisible: pointers (fresh allocations
    are) and the integer args whose value at this shape is."""
    return [n for n, ty in signature.items()
            if ty.startswith("*") or (ty == "i32" and values.get(n, 1) % 16 == 0)]


def _aot_specs() -> list[dict[str, Any]]:
    """The default configurations, as :func:`fwd_config` / :func:`bwd_config` pick them at
    ``_AOT_SHAPES``, for bf16 / fp16 / fp32: the forward tile kernel with entropy (the common
    case; no bias, as LM heads have none), the ∂h and ∂W kernels with every gradient term
    (the most live registers; ∂W with a bias and its gradient), and once per shape the
    dtype-independent merge, row-reference and split-sum kernels.

    Keys as in ``kernels/logprobs.py``, plus ``num_stages``: what the launcher passes (3,
    which is also Triton's default, the value ``rlkern.aot`` compiles with).
    """
    specs: list[dict[str, Any]] = []
    grads = {"HAS_GRAD_LP": True, "HAS_GRAD_ENT": True, "HAS_GRAD_LSE": True}
    for n_rows, hidden_size, vocab in _AOT_SHAPES:
        shape = f"N={n_rows} H={hidden_size} V={vocab}"
        for dtype, size in AOT_DTYPES:
            fwd = fwd_config(n_rows, vocab, hidden_size, size)
            bwd = bwd_config(n_rows, vocab, hidden_size, size)
            precision = input_precision(size)
            kernels = (
                (_linear_logprobs_fwd_kernel, fwd, "entropy",
                 {"HAS_BIAS": False, "HAS_ENTROPY": True, "ONLY_FAR": False, "SOFTCAP": False}),
                (_linear_logprobs_bwd_dh_kernel, bwd.dh, "lp+ent+lse",
                 {"HAS_BIAS": False, **grads, "SOFTCAP": False}),
                (_linear_logprobs_bwd_dw_kernel, bwd.dw, "lp+ent+lse bias",
                 {"HAS_BIAS": True, **grads, "HAS_GRAD_WEIGHT": True, "HAS_GRAD_BIAS": True,
                  "SOFTCAP": False}),
            )
            for fn, cfg, label, flags in kernels:
                signature = _aot_signature(fn, dtype)
                values = {"n_rows": n_rows, "vocab": vocab, "hidden_size": hidden_size,
                          "split_cols": cfg.split_cols, "stride_hidden_0": hidden_size,
                          "stride_weight_0": hidden_size}
                constexprs = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                              "BLOCK_K": cfg.block_k, "INPUT_PRECISION": precision,
                              "UPCAST_DOT": False, **flags}
                specs.append(aot_spec(
                    f"{dtype} {shape} {label} BM={cfg.block_m} BN={cfg.block_n} BK={cfg.block_k}",
                    fn, signature, constexprs, cfg.num_warps, _aot_divisible(signature, values),
                    num_stages=cfg.num_stages))
        for fn, block, constexprs in (
            (_linear_logprobs_merge_kernel, _MERGE_BLOCK, {"HAS_ENTROPY": True}),
            (_linear_logprobs_refs_kernel, _MERGE_BLOCK, {"HAS_ENTROPY": True}),
            (_sum_splits_kernel, _SUM_BLOCK, {}),
        ):
            signature = _aot_signature(fn, "fp32")
            specs.append(aot_spec(f"{shape} BLOCK={block}", fn, signature,
                                  {"BLOCK": block, **constexprs}, 4,
                                  _aot_divisible(signature, {"n_rows": n_rows, "vocab": vocab}),
                                  num_stages=3))
    return specs


AOT_SPECS: list[dict[str, Any]] = _aot_specs()
