"""Fused, batch-invariant sampling with logprobs (ALGORITHMS.md §4).

Public entry point: :func:`sample`. Registered ops (``torch.ops.rlkern``):

* ``sample(logits, indices, temperature, top_k, top_p, min_p, seeds, steps, joint,
  raw_temperature, with_entropy, backend)`` → ``(tokens, raw_logprobs, processed_logprobs,
  entropy, lse)`` (functional; ``entropy`` is empty unless asked for);
* ``sample_out`` (C++, filling caller-provided outputs) for the compiled backends.

Randomness is counter-based (Philox-4x32-10 keyed by the row's ``seed``, counter from its
``step``, see ``csrc/include/rlkern/philox.h``), so a row's token is a pure function of
``(logits row, options, seed, step)``: batch invariant and replayable.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import NamedTuple

import torch
from torch import Tensor

from rlkern import backends
from rlkern.config.dtypes import FLOAT_DTYPES, INDEX_DTYPES
from rlkern.config.sample import filter_order_names
from rlkern.ops import eager
from rlkern.ops.logprobs import checks_enabled
from rlkern.reference.sample import row_lse, sample_reference


class SampleOutput(NamedTuple):
    """Per-output-row results of :func:`sample`, each of shape ``(N,)``.

    ``tokens`` int64; ``raw_logprobs`` = ``log_softmax(x / T)[token]`` (``log_softmax(x)`` with
    ``raw_temperature=False``); ``processed_logprobs`` = the log probability of the token under
    the filtered, renormalised distribution (what the sampler drew from); ``entropy`` of
    ``softmax(x / T)`` or ``None``. Float32.
    """

    tokens: Tensor
    raw_logprobs: Tensor
    processed_logprobs: Tensor
    entropy: Tensor | None


# ---------------------------------------------------------------------------------------------
# Backend dispatch.


def _sample_out(backend, logits, indices, temperature, top_k, top_p, min_p, seeds, steps, joint,
                raw_temperature, tokens, raw, proc, entropy, lse, num_samples: int = 1) -> None:
    if backend in ("cpu", "cuda"):
        ops = backends.compiled_ops(backend)
        if num_samples == 1:
            ops.sample_out(logits, indices, temperature, top_k, top_p, min_p, seeds, steps,
                           joint, raw_temperature, tokens, raw, proc, entropy, lse)
        else:
            ops.sample_n_out(logits, indices, temperature, top_k, top_p, min_p, seeds, steps,
                             joint, raw_temperature, num_samples, tokens, raw, proc, entropy, lse)
    elif backend == "triton":
        kernels = backends.triton_module("sample", logits.device)
        kernels.sample(logits, indices, temperature, top_k, top_p, min_p, seeds, steps, joint,
                       raw_temperature, tokens, raw, proc, entropy, lse, num_samples=num_samples)
    else:
        ref = sample_reference(
            logits.cpu(), temperature=temperature.cpu(),
            top_k=None if top_k is None else top_k.cpu(),
            top_p=None if top_p is None else top_p.cpu(),
            min_p=None if min_p is None else min_p.cpu(), seeds=seeds.cpu(), steps=steps.cpu(),
            indices=None if indices is None else indices.cpu(),
            filter_order="joint" if joint else "top_k_first", raw_temperature=raw_temperature,
            num_samples=num_samples)
        tokens.copy_(ref["tokens"])
        raw.copy_(ref["raw_logprobs"])
        proc.copy_(ref["processed_logprobs"])
        if entropy is not None:
            entropy.copy_(ref["entropy"])
        rows = (indices if indices is not None else torch.arange(logits.shape[0])).tolist()
        lse.copy_(torch.tensor([row_lse(logits[r].cpu(), float(t))
                                for r, t in zip(rows, temperature.tolist(), strict=True)
                                for _ in range(num_samples)]))


@eager.custom_op("rlkern::sample", mutates_args=())
def _sample_op(
    logits: Tensor,
    indices: Tensor | None,
    temperature: Tensor,
    top_k: Tensor | None,
    top_p: Tensor | None,
    min_p: Tensor | None,
    seeds: Tensor,
    steps: Tensor,
    joint: bool,
    raw_temperature: bool,
    with_entropy: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _sample_impl(logits, indices, temperature, top_k, top_p, min_p, seeds, steps, joint,
                        raw_temperature, with_entropy, backend, 1)


def _sample_impl(logits, indices, temperature, top_k, top_p, min_p, seeds, steps, joint,
                 raw_temperature, with_entropy, backend, num_samples):
    n = seeds.numel() * num_samples
    dev = logits.device
    tokens = torch.empty(n, dtype=torch.int64, device=dev)
    new = lambda: torch.empty(n, dtype=torch.float32, device=dev)
    raw, proc, lse = new(), new(), new()
    entropy = new() if with_entropy else None
    if n > 0:
        _sample_out(backend, logits, indices, temperature, top_k, top_p, min_p, seeds, steps,
                    joint, raw_temperature, tokens, raw, proc, entropy, lse, num_samples)
    return tokens, raw, proc, entropy if entropy is not None else new()[:0], lse


def _sample_fake(logits, seeds, with_entropy, num_samples):
    n = seeds.shape[0] * num_samples
    f = lambda m: logits.new_empty((m,), dtype=torch.float32)
    return (logits.new_empty((n,), dtype=torch.int64), f(n), f(n), f(n) if with_entropy else f(0),
            f(n))


@_sample_op.register_fake
def _(logits, indices, temperature, top_k, top_p, min_p, seeds, steps, joint, raw_temperature,
      with_entropy, backend):
    return _sample_fake(logits, seeds, with_entropy, 1)


@eager.custom_op(
    "rlkern::sample_n", mutates_args=(),
    schema="(Tensor logits, Tensor? indices, Tensor temperature, Tensor? top_k, Tensor? top_p, "
           "Tensor? min_p, Tensor seeds, Tensor steps, bool joint, bool raw_temperature, "
           "bool with_entropy, str backend, int num_samples) "
           "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")
def _sample_n_op(logits, indices, temperature, top_k, top_p, min_p, seeds, steps, joint,
                 raw_temperature, with_entropy, backend, num_samples):
    """``rlkern::sample`` with ``num_samples`` draws per row from one filtering pass: outputs
    of ``seeds.numel() · num_samples`` rows (row ``i``, draw ``j`` at ``i·G + j``)."""
    return _sample_impl(logits, indices, temperature, top_k, top_p, min_p, seeds, steps, joint,
                        raw_temperature, with_entropy, backend, num_samples)


@_sample_n_op.register_fake
def _(logits, indices, temperature, top_k, top_p, min_p, seeds, steps, joint, raw_temperature,
      with_entropy, backend, num_samples):
    return _sample_fake(logits, seeds, with_entropy, num_samples)


# ---------------------------------------------------------------------------------------------
# Validation.


def _per_row(name: str, value, n: int, device, *, integer: bool, lo, hi, lo_open: bool,
             off) -> Tensor | None:
    """A scalar or a per-row tensor → a (n,) tensor (int64 or float64), or None when off.

    ``lo``/``hi`` bound the legal values (``lo_open``: lo excluded); ``off(v)`` tells whether
    a value switches the filter off for its row.
    """
    if value is None:
        return None
    dtype = torch.int64 if integer else torch.float64
    if isinstance(value, Tensor):
        _check_readable(name, value)
        if value.dim() > 1 or (value.dim() == 1 and value.numel() != n):
            raise ValueError(f"{name}: a per-row tensor must have shape ({n},), got "
                             f"{tuple(value.shape)}")
        if integer and value.is_floating_point():
            raise TypeError(f"{name}: expected an integer tensor, got {value.dtype}")
        t = value.to(device=device, dtype=dtype).reshape(-1).expand(n).contiguous()
        if torch.compiler.is_compiling():  # value checks are data-dependent: eager only
            return t
    else:
        if isinstance(value, bool) or not isinstance(value, (Integral if integer else Real)):
            raise TypeError(f"{name}: expected {'an int' if integer else 'a number'} or a "
                            f"tensor, got {type(value).__name__}")
        # A Python number is checked in Python: the same check on a tensor is a data-dependent
        # branch, on which torch.compile without fullgraph breaks the graph.
        v = int(value) if integer else float(value)
        bad = (v <= lo) if lo_open else (v < lo)
        if (not integer and math.isnan(v)) or (hi is not None and v > hi) or bad:
            raise ValueError(f"{name} must lie in {_interval(lo, hi, lo_open)}, got {v}")
        if off is not None and off(v):
            return None
        return torch.full((n,), value, dtype=dtype, device=device)
    if n:
        _check_values(name, t, integer, lo, hi, lo_open)
        if off is not None and bool(off(t).all()):
            return None
    return t


def _check_readable(name: str, t: Tensor) -> None:
    """A tensor argument must hold data: tensors on another device are copied to the logits'
    device, but a meta tensor has nothing to copy."""
    if t.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (no data); pass it on the device of "
                         "logits (or on the CPU)")


def _interval(lo, hi, lo_open) -> str:
    return f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]"


def _check_values(name, t, integer, lo, hi, lo_open) -> None:
    bad = (t <= lo) if lo_open else (t < lo)
    if not integer:
        bad |= torch.isnan(t)
    if hi is not None:
        bad |= t > hi
    if bool(bad.any()):
        v = t[bad.nonzero()[0, 0]].item()
        raise ValueError(f"{name} must lie in {_interval(lo, hi, lo_open)}, got {v}")


def sample(
    logits: Tensor,
    *,
    temperature: float | Tensor = 1.0,
    top_k: int | Tensor | None = None,
    top_p: float | Tensor | None = None,
    min_p: float | Tensor | None = None,
    seeds: Tensor,
    steps: Tensor,
    indices: Tensor | None = None,
    filter_order: str = "top_k_first",
    raw_temperature: bool = True,
    return_entropy: bool = False,
    backend: str = "auto",
    num_samples: int = 1,
) -> SampleOutput:
    """Draw one token per output row from temperature-scaled, filtered logits.

    Args:
        logits: ``(R, V)`` float (bf16, fp16, fp32, fp64), vocab dim contiguous. Read in place.
        temperature: ``T > 0``, a number or a ``(N,)`` tensor; ``z = x / T``.
        top_k: keep the ``k ≥ 1`` largest ``z`` (ties at the k-th value: lower indices first);
            ``k ≥ V`` is off. Number or ``(N,)`` int tensor.
        top_p: in ``(0, 1]``; keep token ``j`` (in descending-probability order) while the mass
            before it is ``< top_p`` (so the crossing token is kept); 1 is off.
        min_p: in ``[0, 1]``; keep ``p_v ≥ min_p · max p``; 0 is off.
        seeds, steps: ``(N,)`` int64: the counter-based randomness of each output row (Philox
            keyed by the seed, counter from the step). Same ``(row, seed, step)`` ⇒ same token.
        indices: optional ``(N,)`` int64: output row ``i`` draws from ``logits[indices[i]]``
            (the G members of a group at their first step share one row). Default ``N = R``.
        filter_order: ``"top_k_first"`` (top-k → top-p → min-p, each on the distribution
            renormalised after the previous one; HF/vLLM order) or ``"joint"`` (each filter
            on the unfiltered distribution; the kept set is the intersection).
        raw_temperature: raw logprob of ``x / T`` (True) or of ``x`` (False, vLLM
            ``raw_logprobs``).
        return_entropy: also return the entropy of ``softmax(x / T)``.
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"`` (reference).
        num_samples: ``G ≥ 1`` draws per row from one filtering pass (the GRPO group): the
            outputs have ``N·G`` rows, row ``i``'s draw ``j`` at ``i·G + j``. Draw ``j`` is
            keyed by ``(seeds[i], steps[i], j)`` — the Philox counter's first word is ``j`` —
            so it is a pure function of its row, seed, step and ``j`` (batch invariant,
            replayable), and draw 0 is the token of ``num_samples=1``. Not on ``"cuda"``.

    Returns:
        :class:`SampleOutput` ``(tokens, raw_logprobs, processed_logprobs, entropy)``; none
        of them requires grad (sampling is not differentiable).

    Finite logits are sampled at any magnitude and temperature (``z`` is formed relative to
    the row max). A row that cannot be sampled — NaN or ``+inf`` logits, or all ``-inf`` —
    raises ``ValueError`` while checks are on (:func:`rlkern.set_checks`); with checks off it
    gives token ``-1`` and NaN logprobs and entropy, on every backend. Tensor arguments on
    another device are copied to the logits' device; meta tensors are refused.

    The draw is exact for the filtered distribution: an inverse CDF over the kept tokens in
    vocabulary order with one Philox uniform per row; the kept set is found by radix selection
    on the fp32 bit pattern of ``z`` (no sort). Example::

        out = rlkern.sample(logits, temperature=0.7, top_p=0.9,
                            seeds=torch.arange(n), steps=torch.zeros(n, dtype=torch.long))
    """
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be bfloat16, float16, float32 or float64, got {logits.dtype}")
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (R, V), got {tuple(logits.shape)}")
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        raise ValueError("logits: the vocab (last) dim must be contiguous")
    if filter_order not in filter_order_names():
        raise ValueError(f"filter_order must be one of {filter_order_names()}, got "
                         f"{filter_order!r}")
    R, V = logits.shape
    dev = logits.device
    if indices is not None:
        if not isinstance(indices, Tensor) or indices.dtype not in INDEX_DTYPES \
                or indices.dim() != 1:
            raise TypeError("indices must be a 1-D int32/int64 tensor")
        _check_readable("indices", indices)
        indices = indices.to(device=dev, dtype=torch.int64).contiguous()
        n = indices.numel()
        if n and not torch.compiler.is_compiling() and (
                int(indices.min()) < 0 or int(indices.max()) >= R):
            raise ValueError(f"indices must lie in [0, {R})")
    else:
        n = R
    if n and V == 0:
        raise ValueError("logits: the vocabulary is empty")
    for name, t in (("seeds", seeds), ("steps", steps)):
        if not isinstance(t, Tensor) or t.dtype not in INDEX_DTYPES:
            raise TypeError(f"{name} must be an int64 tensor of shape ({n},)")
        if tuple(t.shape) != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
        _check_readable(name, t)
    seeds = seeds.to(device=dev, dtype=torch.int64).contiguous()
    steps = steps.to(device=dev, dtype=torch.int64).contiguous()
    temp = _per_row("temperature", temperature, n, dev, integer=False, lo=0.0, hi=None,
                    lo_open=True, off=None)
    if n and not torch.compiler.is_compiling() and bool(torch.isinf(temp).any()):
        raise ValueError("temperature must be finite")
    k = _per_row("top_k", top_k, n, dev, integer=True, lo=1, hi=None, lo_open=False,
                 off=lambda t: t >= V)
    p = _per_row("top_p", top_p, n, dev, integer=False, lo=0.0, hi=1.0, lo_open=True,
                 off=lambda t: t >= 1.0)
    mp = _per_row("min_p", min_p, n, dev, integer=False, lo=0.0, hi=1.0, lo_open=False,
                  off=lambda t: t <= 0.0)
    if isinstance(num_samples, bool) or not isinstance(num_samples, Integral):
        raise TypeError(f"num_samples: expected an int, got {type(num_samples).__name__}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    be = backends.resolve_backend(backend, dev)
    # Sampling is not differentiable: the op sees detached inputs, so its outputs never require
    # grad (and no backward can reach it).
    args = (logits.detach(), indices, temp.detach(), k, None if p is None else p.detach(),
            None if mp is None else mp.detach(), seeds, steps, filter_order == "joint",
            raw_temperature, return_entropy, be)
    if num_samples == 1:
        tokens, raw, proc, ent, lse = eager.call("rlkern::sample", *args)
    else:
        tokens, raw, proc, ent, lse = eager.call("rlkern::sample_n", *args, int(num_samples))
    if checks_enabled() and n and not torch.compiler.is_compiling():
        # A row that cannot be sampled gets token −1 (lse: NaN for NaN or +inf logits, −inf
        # for all −inf ones). A finite row never does, even when its lse overflows (huge
        # logits at a tiny temperature).
        bad = tokens < 0
        if bool(bad.any()):
            o = int(bad.nonzero()[0, 0])  # an output row; its source row is o // num_samples
            i = o // num_samples
            row = int(indices[i]) if indices is not None else i
            what = "contains NaN (or +inf)" if not bool(torch.isneginf(lse[o])) else "is all -inf"
            raise ValueError(f"logits: row {row} {what}; it cannot be sampled")
    return SampleOutput(tokens, raw, proc, ent if return_entropy else None)
