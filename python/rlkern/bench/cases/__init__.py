"""Registry of benchmark cases: one module per op, named by the op's stem (``logprobs.py``).

A case says *what* to measure; :mod:`rlkern.bench.runner` does the measuring. Adding an op's
benchmark is one new module in this package holding a factory decorated with :func:`register`::

    @register("advantages")
    def advantages_case(options: CaseOptions) -> Case:
        return Case(name="advantages", sizes=[...], quick_sizes=[...], modes=("fwd",),
                    make_inputs=..., implementations=..., tolerances={...})

Modules here are discovered and imported by :func:`all_cases`, so nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

#: What one implementation call returns: named per-row outputs (and gradients) for the check.
Outputs = Mapping[str, torch.Tensor]


class ImplUnavailableError(RuntimeError):
    """Raised by an implementation's first call when it cannot run here (e.g. a peer package
    fails to import); the runner reports the implementation as skipped with this message."""


#: Role of an implementation: the one peers are compared with, a peer, or the machine's floor.
RLKERN, PEER, FLOOR = "rlkern", "peer", "floor"


@dataclass(frozen=True)
class Size:
    """One problem size, e.g. ``Size({"N": 1024, "V": 151936})``; the dims are the case's."""

    dims: Mapping[str, int]

    def label(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.dims.items())

    def __getitem__(self, key: str) -> int:
        return self.dims[key]

    def elements(self) -> int:
        """Product of the dims: how the work grows, used to carry a time-budget skip upward."""
        out = 1
        for v in self.dims.values():
            out *= v
        return out


@dataclass(frozen=True)
class Impl:
    """One implementation of a case in one mode.

    ``fn(inputs)`` runs the op once and returns its :data:`Outputs` (the floor returns ``{}``;
    it computes nothing to check). ``warmup`` is the number of untimed calls, at least 1 (the
    first is also the checked call); compiling implementations ask for more. ``skip`` is a
    reason when it cannot run here.
    """

    name: str
    fn: Callable[[Any], Outputs]
    role: str = PEER
    warmup: int = 1
    skip: str | None = None
    note: str = ""

    @classmethod
    def rlkern(cls, fn: Callable[[Any], Outputs], *, name: str = "rlkern", note: str = "",
               warmup: int = 1) -> Impl:
        """The implementation the others are compared with (listed first)."""
        return cls(name, fn, role=RLKERN, warmup=warmup, note=note)

    @classmethod
    def floor(cls, fn: Callable[[Any], Outputs], *, note: str = "") -> Impl:
        """The machine's floor, named ``floor`` (listed last); ``note`` says what it does."""
        return cls("floor", fn, role=FLOOR, note=note)


@dataclass(frozen=True)
class Tolerance:
    """Agreement between an implementation's output and rlkern's, at two levels.

    * Precision (a warning when exceeded): elementwise ``|a − b| <= atol + rtol·|b|``, or with
      ``scale_by_max`` ``max|a − b| <= rtol·max|b|`` (for gradients, whose entries are tiny
      except at the label).
    * Identity (a mismatch when exceeded, and the implementation is not timed):
      ``max|a − b| <= gate·max|b|``. Peers that compute in bf16 round intermediate results
      (e.g. a bf16 logsumexp) and miss the precision level while computing the same quantity;
      a wrong formula, label or sign misses this coarser level. ``gate_atol`` adds an absolute
      term, ``max|a − b| <= gate·max|b| + gate_atol``, for outputs that may be exactly 0 (an
      on-policy GRPO step's loss, whose mean advantage is 0).
    """

    atol: float = 0.0
    rtol: float = 0.0
    scale_by_max: bool = False
    gate: float = 0.1
    gate_atol: float = 0.0


@dataclass(frozen=True)
class CaseOptions:
    """Settings of a run that shape a case (not its sizes)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.bfloat16
    #: backend passed to the rlkern implementation ("auto" unless asked otherwise).
    rlkern_backend: str = "auto"


@dataclass(frozen=True)
class Case:
    """A benchmark: sizes, modes, inputs, implementations and the agreement rule.

    ``implementations(mode)`` lists the rlkern implementation first and the floor last.
    ``notes`` are printed with the results (e.g. which floor a mode uses); ``warnings`` also
    before the run starts (e.g. a backend standing in for one that is not built); ``summary``
    adds lines computed after the measurements.
    """

    name: str
    sizes: list[Size]
    quick_sizes: list[Size]
    modes: tuple[str, ...]
    make_inputs: Callable[[Size, torch.dtype, torch.device], Any]
    implementations: Callable[[str], list[Impl]]
    tolerances: Mapping[str, Tolerance]
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    environment: Mapping[str, str] = field(default_factory=dict)
    #: Optional figures that are not timings (e.g. a scheduler's peak KV tokens), computed once
    #: after the case's measurements: ``summary(measurements, plot_dir)`` returns lines printed
    #: and saved with the notes, and may write its own PNGs into ``plot_dir`` (``--plot``).
    summary: Callable[[list[Any], str | None], tuple[str, ...]] | None = None


CaseFactory = Callable[[CaseOptions], Case]
_REGISTRY: dict[str, CaseFactory] = {}


def register(name: str) -> Callable[[CaseFactory], CaseFactory]:
    """Decorator registering a case factory under the op stem ``name``."""

    def deco(factory: CaseFactory) -> CaseFactory:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"benchmark case {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return deco


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def case_names() -> list[str]:
    """Names of all registered cases, sorted."""
    _discover()
    return sorted(_REGISTRY)


def get_case(name: str, options: CaseOptions | None = None) -> Case:
    """Build the case ``name`` for ``options``; ``KeyError`` lists the known names."""
    _discover()
    if name not in _REGISTRY:
        raise KeyError(f"no benchmark case {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](options or CaseOptions())
