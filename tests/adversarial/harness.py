"""Run one call of a public op on every backend and judge the results (issue: reliability).

A call is described by a :class:`Call`: the public function, its arguments, and which tensor
arguments are differentiated. :func:`run` evaluates it on each backend (``auto``, ``torch`` and
``triton`` in the interpreter) on fresh copies of the inputs and returns, per backend, either
the outputs (forward values, then the gradients of a fixed random projection of the
differentiable outputs) or the type of the error raised. :func:`judge` applies the suite's
rules:

* the backends agree within a per-dtype tolerance (NaN where NaN, ±inf where ±inf), or all raise
  an error of the same type;
* finite inputs give finite outputs and gradients;
* no output depends on uninitialised memory: the ``auto`` backend is run a second time with
  torch's fill of uninitialised memory switched on (every ``torch.empty`` filled with NaN /
  the largest integer) and must give bitwise the same outputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from rlkern import BackendUnavailableError

BACKENDS = ("auto", "torch", "triton")

#: (rtol, atol) for comparing two backends' outputs, by the dtype of the op's main input.
#: Each backend has its own fp32 reduction order (and the CPU kernels a fast exp): the bounds
#: are the per-dtype tolerances of the unit tests, widened 10× because two kernels are compared
#: with each other rather than each with the float64 reference.
AGREE_TOL = {
    torch.float64: (1e-8, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (1e-3, 1e-4),
    torch.float16: (1e-3, 1e-4),
}


#: Relative spacing of a 16-bit float (one unit in the last place, at its widest): two backends
#: that compute the same fp32 value and store it in such a format (e.g. the gradient of bf16
#: logits) may round it to neighbouring values, this far apart — finer than AGREE_TOL can tell.
STORAGE_ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@dataclasses.dataclass
class Call:
    """One call of a public op: ``fn(*args, **kwargs)`` with ``backend=`` added."""

    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    #: names of tensor arguments (positional index as str, or keyword) to differentiate
    grad_wrt: tuple[str, ...] = ()
    #: the dtype whose tolerance applies
    dtype: torch.dtype = torch.float32
    #: backends that do not implement this call by design (documented); skipped, not judged
    skip_backends: tuple[str, ...] = ()
    #: the op is not differentiable: its outputs must not require grad even when an input does
    nondiff: bool = False
    #: the outputs are sums / products of the inputs, which can overflow the output dtype for
    #: finite inputs (e.g. two float32 maxima): finite where the float64 reference is finite
    #: then suffices. Log-probabilities, entropies and draws are bounded and never overflow.
    overflow_ok: bool = False
    #: (rtol, atol) replacing AGREE_TOL[dtype] for this call, where the backends round an
    #: intermediate differently by design (the builder says which and why).
    tol: tuple[float, float] | None = None
    #: an input breaks the op's contract in a way only a data check sees (a tensor count ≤ 0)
    #: and the call runs with checks off: NaN outputs are then the documented answer, so the
    #: finite-output rule does not apply (the backends must still agree)
    poisoned: bool = False

    def inputs_finite(self) -> bool:
        if self.poisoned:
            return False
        return all(bool(torch.isfinite(t).all()) for t in _tensors(self.args, self.kwargs)
                   if t.is_floating_point() and t.device.type != "meta")


@dataclasses.dataclass
class Outcome:
    backend: str
    values: list[torch.Tensor] | None = None
    error: BaseException | None = None
    #: whether any output required grad
    requires_grad: bool = False

    @property
    def kind(self) -> str:
        if self.error is None:
            return "ok"
        return type(self.error).__name__


def _tensors(args: Sequence[Any], kwargs: dict[str, Any]) -> Iterator[torch.Tensor]:
    for v in [*args, *kwargs.values()]:
        if isinstance(v, torch.Tensor):
            yield v


def _clone(v: Any, requires_grad: bool) -> Any:
    """A fresh copy of ``v`` with the same shape, strides and storage offset (stride-0
    expansions and transposed views stay what they are), as a new leaf."""
    if not isinstance(v, torch.Tensor) or v.device.type == "meta":
        return v
    storage = v.detach().untyped_storage().clone()
    out = torch.empty(0, dtype=v.dtype, device=v.device).set_(
        storage, v.storage_offset(), v.shape, v.stride())
    if requires_grad:
        out.requires_grad_(True)
    return out


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _flatten(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    return []


def _evaluate(call: Call, backend: str) -> tuple[list[torch.Tensor], bool]:
    args = [_clone(a, str(i) in call.grad_wrt) for i, a in enumerate(call.args)]
    kwargs = {k: _clone(v, k in call.grad_wrt) for k, v in call.kwargs.items()}
    out = call.fn(*args, backend=backend, **kwargs)
    values = [t.detach().clone() for t in _flatten(out)]
    leaves = [args[int(k)] if k.isdigit() else kwargs[k] for k in call.grad_wrt]
    leaves = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    diff = [t for t in _flatten(out) if t.requires_grad and t.is_floating_point()]
    if leaves and diff and not call.nondiff:
        gen = torch.Generator().manual_seed(0)
        # A fixed projection that touches every output element with a distinct weight; NaN
        # outputs (documented) are skipped so that they do not poison every gradient.
        total = sum((torch.where(torch.isnan(t.detach()), 0.0,
                                 torch.rand(t.shape, generator=gen, dtype=torch.float64)
                                 .to(t.dtype)) * torch.nan_to_num(t, nan=0.0)).sum()
                    for t in diff)
        grads = torch.autograd.grad(total, leaves, allow_unused=True)
        values += [g if g is not None else torch.zeros_like(x)
                   for g, x in zip(grads, leaves, strict=False)]
    return values, bool(diff)


def run(call: Call, backends: Sequence[str] = BACKENDS) -> dict[str, Outcome]:
    outcomes = {}
    for backend in backends:
        if backend in call.skip_backends:
            continue
        try:
            values, requires_grad = _evaluate(call, backend)
            outcomes[backend] = Outcome(backend, values=values, requires_grad=requires_grad)
        except BackendUnavailableError:
            continue
        except Exception as exc:
            outcomes[backend] = Outcome(backend, error=exc)
    return outcomes


@contextlib.contextmanager
def filled_uninitialised_memory() -> Iterator[None]:
    """Every ``torch.empty`` (and ``at::empty``) returns NaN / max-int filled memory."""
    was = torch.are_deterministic_algorithms_enabled()
    warn = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
    return bool((a == b).all())


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype,
          tol: tuple[float, float] | None = None) -> str | None:
    """None when ``a`` and ``b`` agree, else why not."""
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    if not a.is_floating_point() or not b.is_floating_point():
        return None if torch.equal(a, b) else "integer outputs differ"
    rtol, atol = tol or AGREE_TOL[dtype]
    rtol = max(rtol, STORAGE_ULP.get(a.dtype, 0.0))
    a, b = a.double(), b.double()
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return "NaN in different places"
    for sign in (1, -1):
        if not torch.equal(a == sign * torch.inf, b == sign * torch.inf):
            return f"{'+' if sign > 0 else '-'}inf in different places"
    fin = torch.isfinite(a) & torch.isfinite(b)
    # Relative to the output's own magnitude: losses and gradients are sums of many terms.
    scale = float(torch.maximum(a[fin].abs(), b[fin].abs()).max()) if fin.any() else 0.0
    err = (a[fin] - b[fin]).abs() - rtol * b[fin].abs() - atol * max(1.0, scale)
    if err.numel() and float(err.max()) > 0:
        i = int(err.argmax())
        return f"values differ: {float(a[fin][i])!r} vs {float(b[fin][i])!r}"
    return None


def judge(call: Call, outcomes: dict[str, Outcome]) -> list[str]:
    """The rules the outcomes break (empty: none)."""
    problems = []
    kinds = {b: o.kind for b, o in outcomes.items()}
    if len(set(kinds.values())) > 1:
        detail = {b: (str(o.error)[:160] if o.error else "ok") for b, o in outcomes.items()}
        problems.append(f"backends disagree on raising: {detail}")
        return problems
    first = next(iter(outcomes.values()), None)
    if first is None or first.error is not None:
        return problems
    if call.nondiff:
        problems += [f"{b}: an output requires grad (the op is not differentiable)"
                     for b, o in outcomes.items() if o.requires_grad]
    for backend, outcome in outcomes.items():
        if backend == first.backend:
            continue
        if len(outcome.values) != len(first.values):
            problems.append(f"{backend}: {len(outcome.values)} outputs vs {len(first.values)}")
            continue
        for i, (a, b) in enumerate(zip(outcome.values, first.values, strict=False)):
            why = close(a, b, call.dtype, call.tol)
            if why:
                problems.append(f"output {i}: {backend} vs {first.backend}: {why}")
    if call.inputs_finite():
        reference = outcomes.get("torch")
        for backend, outcome in outcomes.items():
            for i, t in enumerate(outcome.values):
                if not t.is_floating_point():
                    continue
                bad = ~torch.isfinite(t)
                if call.overflow_ok and reference is not None:
                    bad &= torch.isfinite(reference.values[i])
                if bool(bad.any()):
                    problems.append(f"{backend}: output {i} not finite for finite inputs")
    if "auto" in outcomes and outcomes["auto"].error is None:
        with filled_uninitialised_memory():
            try:
                again, _ = _evaluate(call, "auto")
            except Exception as exc:
                problems.append(f"auto raises only with filled memory: {exc!r}")
                again = None
        if again is not None:
            for i, (a, b) in enumerate(zip(again, outcomes["auto"].values, strict=False)):
                if not same_bits(a, b):
                    problems.append(f"auto: output {i} depends on uninitialised memory")
    return problems
