"""Which implementation of an op runs where.

``backend="auto"`` (the default) picks, by the device of the inputs:

* CPU tensors  → ``"cpu"``: the C++ kernels of ``rlkern._C``;
* CUDA tensors → ``"triton"`` (or ``"cuda"``, the CUDA C++ kernels, when the environment
  variable ``RLKERN_BACKEND=cuda`` is set).

``"torch"`` runs the pure-torch reference anywhere. ``"triton"`` on CPU tensors runs the Triton
kernels in Triton's interpreter (``TRITON_INTERPRET=1``, set automatically on a machine without
CUDA before the kernels are first imported): slow, but it executes the real kernel code, which
is how the Triton kernels are tested without a GPU.

A backend that cannot run raises :class:`BackendUnavailableError` naming what is missing.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (missing build, package or device)."""


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map a user-facing backend name to the concrete one for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cpu":
            return "cpu"
        if device.type == "cuda":
            env = os.environ.get("RLKERN_BACKEND", "triton")
            if env not in ("triton", "cuda", "torch"):
                raise ValueError(f"RLKERN_BACKEND must be triton, cuda or torch, got {env!r}")
            return env
        return "torch"
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
    if backend == "triton" and device.type not in ("cpu", "cuda"):
        raise ValueError(f"backend='triton' needs CUDA tensors (or CPU tensors for the "
                         f"interpreter), got tensors on {device}")
    return backend


_cpp_loaded: bool | None = None


def cpp_ops() -> object:
    """``torch.ops.rlkern`` with the compiled kernels of ``rlkern._C`` registered."""
    global _cpp_loaded
    if _cpp_loaded is None:
        try:
            importlib.import_module("rlkern._C")
            _cpp_loaded = True
        except ImportError as exc:  # pragma: no cover - exercised only on broken installs
            _cpp_loaded = False
            _cpp_error[0] = exc
    if not _cpp_loaded:
        raise BackendUnavailableError(
            "the compiled extension rlkern._C is not importable "
            f"({_cpp_error[0]}); build it with `pip install --no-build-isolation -e .`, "
            "or pass backend='torch'"
        )
    return torch.ops.rlkern


_cpp_error: list[BaseException | None] = [None]


def has_cpp() -> bool:
    try:
        cpp_ops()
    except BackendUnavailableError:
        return False
    return True


def has_cuda_kernels() -> bool:
    """True when ``rlkern._C`` was built with the CUDA kernels."""
    if not has_cpp():
        return False
    import rlkern._C as C

    return bool(getattr(C, "WITH_CUDA", False))


def compiled_ops(backend: str) -> object:
    """``torch.ops.rlkern`` for a compiled backend, ``"cpu"`` or ``"cuda"``; the latter only when
    ``rlkern._C`` was built with the CUDA kernels (else :class:`BackendUnavailableError`)."""
    if backend == "cuda" and not has_cuda_kernels():
        raise BackendUnavailableError(
            "backend='cuda' needs rlkern._C built with the CUDA kernels (a CUDA toolkit and a "
            "CUDA build of torch at install time)"
        )
    return cpp_ops()


def triton_module(name: str, device: torch.device) -> ModuleType:
    """Import ``rlkern.kernels.<name>`` for tensors on ``device``.

    On a machine without CUDA the Triton interpreter is switched on first, because Triton
    decides between compiling and interpreting when a kernel is decorated.
    """
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailableError(
            "backend='triton' needs the triton package (pip install triton)"
        ) from exc
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device.type == "cpu" and not interpreting:
        if torch.cuda.is_available() or f"rlkern.kernels.{name}" in _imported_compiled:
            raise BackendUnavailableError(
                "backend='triton' on CPU tensors runs Triton's interpreter: set "
                "TRITON_INTERPRET=1 before importing rlkern"
            )
        os.environ["TRITON_INTERPRET"] = "1"
    if device.type == "cpu" and not _interpreted_jit[0]:
        _interpret_imported_jit_functions()
        _interpreted_jit[0] = True
    if device.type == "cuda" and interpreting:
        raise BackendUnavailableError(
            "TRITON_INTERPRET=1 is set, so Triton kernels cannot run on CUDA tensors"
        )
    module = importlib.import_module(f"rlkern.kernels.{name}")
    if device.type == "cuda":
        _imported_compiled.add(module.__name__)
    return module


_imported_compiled: set[str] = set()
_interpreted_jit = [False]


def _interpret_imported_jit_functions() -> None:
    """Turn the ``@triton.jit`` functions created before the interpreter was switched on into
    interpreted ones.

    Triton picks compiled or interpreted when a function is decorated. ``torch._dynamo``
    imports ``triton.language`` (rlkern's own import reaches it through
    ``torch.compiler.assume_constant_result``, as does any use of ``torch.compile``), so
    unless ``TRITON_INTERPRET=1`` was set before that, the library functions defined there
    with ``@jit`` (``tl.zeros``, ``tl.max``, ``tl.sum``, …) are compiled-mode objects, which
    the interpreter refuses to call from a kernel ("Cannot call @triton.jit'd outside of the
    scope of a kernel"). Called once, the first time Triton runs on CPU tensors (in the
    interpreter, the only way it can); a no-op when everything was interpreted from the start.
    """
    import sys

    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    # Modules, and the tensor class whose methods (``x.sum()``) are library functions too.
    owners = [m for n, m in list(sys.modules.items())
              if m is not None and (n.startswith("triton.language") or
                                    n.startswith("rlkern.kernels"))] + [tl.tensor]
    for owner in owners:
        for attr, value in list(vars(owner).items()):
            if type(value) is JITFunction:
                setattr(owner, attr, InterpretedFunction(value.fn))
