"""Agreement check: an implementation is timed only if it computes what rlkern computes.

Two levels per output (see :class:`~rlkern.bench.cases.Tolerance`): outside the precision
tolerance gives a warning shown next to the numbers; outside the identity gate is a mismatch,
and no number is reported for that implementation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from rlkern.bench.cases import Outputs, Tolerance

#: Rows compared at a time, so comparing (N, V) gradients needs no full-size fp64 temporaries.
_CHUNK_ROWS = 256


@dataclass(frozen=True)
class CheckResult:
    """Outcome of comparing one implementation's outputs with rlkern's.

    ``errors`` maps each compared output to its worst error in units of the precision
    tolerance (≤ 1 is within it); ``ok`` is False when some output failed the identity gate or
    was missing; ``warnings`` name outputs outside the precision tolerance; ``message`` is a
    short text for tables.
    """

    ok: bool
    errors: Mapping[str, float]
    warnings: tuple[str, ...] = ()
    message: str = "ok"
    gate_errors: Mapping[str, float] = field(default_factory=dict)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(-1, 1)


def _nan_to_inf(t: torch.Tensor) -> torch.Tensor:
    # NaN anywhere (in either tensor) is a disagreement, not something max() may skip.
    return torch.where(torch.isnan(t), torch.full_like(t, float("inf")), t)


def errors(out: torch.Tensor, ref: torch.Tensor, tol: Tolerance) -> tuple[float, float]:
    """Worst error of ``out`` against ``ref``: (in precision-tolerance units, in gate units).

    Both pass at ≤ 1. Computed in float64 over chunks of rows.
    """
    if out.shape != ref.shape:
        if out.numel() != ref.numel():
            return float("inf"), float("inf")
        out = out.reshape(ref.shape)  # e.g. (B, L) against (N,): same elements, same order
    diff_max = ref_max = elem = 0.0
    for ca, cb in zip(_rows(out).split(_CHUNK_ROWS), _rows(ref).split(_CHUNK_ROWS), strict=True):
        a, b = ca.double(), cb.double()
        diff = _nan_to_inf((a - b).abs())
        diff_max = max(diff_max, float(diff.max()))
        ref_max = max(ref_max, float(b.abs().max()))
        if not tol.scale_by_max:
            elem = max(elem, float((diff / (tol.atol + tol.rtol * b.abs())).max()))

    def ratio(num: float, den: float) -> float:
        return 0.0 if num == 0 else num / den if den > 0 else float("inf")

    precision = ratio(diff_max, tol.rtol * ref_max) if tol.scale_by_max else elem
    return precision, ratio(diff_max, tol.gate * ref_max + tol.gate_atol)


def compare(out: Outputs, ref: Outputs, tolerances: Mapping[str, Tolerance]) -> CheckResult:
    """Compare every output that ``ref`` and ``tolerances`` both name; all must be in ``out``."""
    precision: dict[str, float] = {}
    gate: dict[str, float] = {}
    bad: list[str] = []
    warn: list[str] = []
    for key, tol in tolerances.items():
        if key not in ref:
            continue
        if key not in out:
            bad.append(f"{key} missing")
            continue
        precision[key], gate[key] = errors(out[key], ref[key], tol)
        if not gate[key] <= 1.0:
            bad.append(f"{key} differs by {gate[key] * tol.gate:.3g}·max|ref|")
        elif not precision[key] <= 1.0:
            warn.append(f"{key} {precision[key]:.3g}× tol")
    message = "; ".join(bad) if bad else ("warn: " + ", ".join(warn)) if warn else "ok"
    return CheckResult(ok=not bad, errors=precision, warnings=tuple(warn), message=message,
                       gate_errors=gate)
