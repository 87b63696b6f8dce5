"""Pieces shared by the Triton kernel modules: base-2 constants, the runtime temperature, and
the ahead-of-time compilation spec format (consumed by ``rlkern.aot``). Imports only triton.

The kernels work in base 2, ``z₂ = z·log₂e = x·(log₂e / T)``: ``exp(z − m) = exp2(z₂ − m₂)``
costs one multiply fewer per element than ``exp()`` (which is ``exp2`` of a product anyway),
and per-row results are converted back with one multiply by ``ln 2``.
"""

from __future__ import annotations

import struct
from typing import Any

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# The lowest finite float32: z − m is clamped to it so that a −inf logit (or padding) gives
# w = exp2(·) = 0 and w·(z − m) = 0, the limit, instead of 0·(−inf) = NaN (NaN still
# propagates: the clamp is a max with PropagateNan.ALL).
LOWEST = tl.constexpr(-3.4028234663852886e38)


# The largest finite and the smallest normal float32.
FLT_MAX = tl.constexpr(3.4028234663852886e38)
FLT_MIN = tl.constexpr(1.1754943508222875e-38)


def split_inv_temperature(temperature: float) -> tuple[float, float]:
    """``1/T`` as an fp32 value plus its fp32 residual: Triton passes float arguments as fp32,
    and a temperature is a runtime scalar (a constexpr would recompile per value). Beyond the
    fp32 range ``1/T`` is passed as the largest float (see :func:`row_scales`)."""
    inv_t = min(1.0 / float(temperature), FLT_MAX.value)
    hi = struct.unpack("f", struct.pack("f", inv_t))[0]
    return hi, inv_t - hi


@triton.jit
def inv_t_from(hi, lo, ACC: tl.constexpr):
    """``1/T`` in ``ACC`` from :func:`split_inv_temperature`'s pair: the low part matters only
    in fp64 (in fp32 the sum rounds back to ``hi`` exactly)."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit
def row_scales(hi, lo, ACC: tl.constexpr):
    """``(1/T, log₂e/T)`` in ``ACC``, both finite and the second normal, as the CPU kernels
    clamp them: the kernels multiply ``x − max x`` by the scale, so a temperature beyond the
    float range (``T = 1e300``: ``1/T`` rounds to 0, and ``−inf · 0`` would be NaN) acts as the
    largest one that is not, which changes nothing unless a row spans more than ~1e30."""
    inv_t = tl.minimum(inv_t_from(hi, lo, ACC), FLT_MAX)
    scale = tl.minimum(tl.maximum(inv_t * LOG2E, FLT_MIN), FLT_MAX)
    return inv_t, scale


#: The input dtypes the AOT specs are compiled for: (Triton type name, element size).
AOT_DTYPES = (("bf16", 2), ("fp16", 2), ("fp32", 4))


def aot_spec(name: str, fn: Any, signature: dict[str, str], constexprs: dict[str, Any],
             num_warps: int, divisible_by_16: list[str],
             num_stages: int | None = None) -> dict[str, Any]:
    """One entry of a module's ``AOT_SPECS``: ``name`` (config label), ``fn`` (the JIT
    function), ``signature`` (arg name → Triton type, ``"constexpr"`` for constexprs),
    ``constexprs``, ``num_warps``, ``divisible_by_16`` (the args Triton's launcher would
    specialise as 16-divisible) and, when the launcher passes one, ``num_stages``."""
    spec = {"name": name, "fn": fn, "signature": signature, "constexprs": constexprs,
            "num_warps": num_warps, "divisible_by_16": divisible_by_16}
    if num_stages is not None:
        spec["num_stages"] = num_stages
    return spec


def aot_signature(fn: Any, types: dict[str, str], default: Any = None) -> dict[str, str]:
    """Triton signature of ``fn`` in argument order: ``types[name]`` where given, else
    ``"constexpr"`` for an upper-case (constexpr) argument, else ``default(name)`` (a
    ``KeyError`` naming the argument when there is no default)."""
    signature = {}
    for name in fn.arg_names:
        if name in types:
            signature[name] = types[name]
        elif name.isupper():
            signature[name] = "constexpr"
        elif default is not None:
            signature[name] = default(name)
        else:
            raise KeyError(f"no AOT type for argument {name!r} of {fn.__name__}")
    return signature
