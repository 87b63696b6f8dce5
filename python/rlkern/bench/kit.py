"""Building blocks the benchmark cases share (:mod:`rlkern.bench.cases`).

* :class:`RlkernBackend` — the backend the rlkern rows run, the note when it is a stand-in,
  and the ``environment`` entry that says what was measured.
* :class:`Peer` — a peer package imported on the first (untimed) call that needs it.
* :func:`compiled_on_first_call` — the ``torch.compile`` peer of a formula.
* :func:`read_once` / :func:`write_once` / :func:`copy_once` — the memory-traffic floors;
  :func:`as_integers` — the integer view they read through.
* :func:`fresh_leaf` and :func:`peaked_logits` — inputs.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from rlkern.bench.cases import CaseOptions, ImplUnavailableError, Outputs, Tolerance
from rlkern.ops.memory import advise_huge_pages

# ---------------------------------------------------------------------------------- backend


@dataclass(frozen=True)
class RlkernBackend:
    """What the rlkern implementation of a case runs.

    ``name`` is passed as ``backend=`` to rlkern; ``note`` says why it is not the backend the
    run asked for ("" when it is); ``concrete`` is the backend that ``name`` resolves to on the
    run's device ("cpu", "triton", ...), recorded so that a result says what was measured.
    """

    name: str
    concrete: str
    note: str = ""

    @classmethod
    def choose(cls, options: CaseOptions) -> RlkernBackend:
        """The run's backend, except that ``auto`` on a CPU without ``rlkern._C`` built falls
        back to ``torch`` (the pure-torch reference: slow, but the case still runs)."""
        from rlkern import backends

        name, note = options.rlkern_backend, ""
        if name == "auto" and options.device.type == "cpu" and not backends.has_cpp():
            name, note = "torch", ("rlkern._C is not built: the rlkern rows run backend='torch' "
                                   "(the pure-torch reference, slow), not the C++ kernels")
        try:
            concrete = backends.resolve_backend(name, options.device)
        except ValueError:  # e.g. 'cuda' asked on a CPU: the rlkern rows will report the error
            concrete = name
        return cls(name, concrete, note)

    @property
    def notes(self) -> tuple[str, ...]:
        """The note as a case's ``notes`` / ``warnings`` entries (none when there is none)."""
        return (self.note,) if self.note else ()

    @property
    def environment(self) -> dict[str, str]:
        """A case's ``environment``: the concrete backend."""
        return {"rlkern_backend": self.concrete}


# -------------------------------------------------------------------------------------- peers


@dataclass
class Peer:
    """A peer package (trl, verl, liger-kernel, transformers), imported by ``load()`` on the
    first call of :meth:`get`: importing one takes seconds (verl ~20 s), and listing or
    filtering cases should not. That first call is an implementation's untimed first call.

    ``hint`` follows "is not installed" in the skip reason (e.g. how to install it).
    """

    package: str
    load: Callable[[], Any]
    hint: str = ""
    _loaded: list[Any] = field(default_factory=list, repr=False)

    def missing(self) -> str | None:
        """Why the peer cannot run here when its package is not installed; ``None`` when it is
        (an :class:`~rlkern.bench.cases.Impl`'s ``skip``)."""
        if importlib.util.find_spec(self.package) is None:
            return f"{self.package} is not installed" + (f" ({self.hint})" if self.hint else "")
        return None

    def get(self) -> Any:
        """What ``load()`` returned; :class:`ImplUnavailableError` when it cannot be imported."""
        if not self._loaded:
            reason = self.missing()
            if reason is not None:
                raise ImplUnavailableError(reason)
            try:
                self._loaded.append(self.load())
            except Exception as exc:  # any import failure means: not available here
                raise ImplUnavailableError(
                    f"{self.package} is not importable ({type(exc).__name__}: {exc})") from exc
        return self._loaded[0]


def compiled_on_first_call(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile(fn, dynamic=False)``, made on the first call (importing Dynamo takes
    seconds): one graph per shape, the best torch.compile does for a fixed shape.

    Every (shape, grad mode) is a recompile of the same frame, so the recompile limit is raised
    while calling; otherwise Dynamo would fall back to eager after a few sizes. Give the
    implementation two warm-up calls: the first compiles, the second runs the compiled code
    once so that its one-off costs (loading the kernel library, first touch) stay untimed.
    """
    compiled: list[Callable[..., Any]] = []

    def call(*args: Any) -> Any:
        if not compiled:
            compiled.append(torch.compile(fn, dynamic=False))
        with torch._dynamo.config.patch(recompile_limit=256):
            return compiled[0](*args)

    return call


# ------------------------------------------------------------------------------------- floors

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_integers(t: Tensor) -> Tensor:
    """``t``'s elements seen as integers of their size (a view, no copy): a floor reads them
    without float semantics, and a test compares bit patterns (signed zeros, NaN payloads)."""
    return t.view(_INT_OF_SIZE[t.element_size()])


def read_once(*tensors: Tensor) -> Outputs:
    """Read every byte of each (contiguous) tensor once and write nothing: an integer max over
    the elements seen as integers of their size (vectorised, no NaN handling). Returns ``{}``:
    a floor computes nothing to check."""
    for t in tensors:
        as_integers(t).amax()
    return {}


def _fresh(like: Tensor, dtype: torch.dtype | None) -> Tensor:
    """A fresh buffer of ``like``'s shape (and ``dtype``, default ``like``'s). A CPU buffer is
    advised as huge pages, as rlkern's CPU backward advises its fresh gradients
    (csrc/cpu/huge_pages.h): an implementation can fault a fresh buffer in 2 MiB pieces, so the
    floor does too."""
    return advise_huge_pages(torch.empty(like.shape, dtype=dtype or like.dtype,
                                         device=like.device))


def write_once(like: Tensor, dtype: torch.dtype | None = None) -> None:
    """Write a fresh buffer shaped like ``like`` and read nothing (a fill): the traffic of
    producing an output of that size."""
    _fresh(like, dtype).fill_(1)


def copy_once(src: Tensor, dtype: torch.dtype | None = None) -> None:
    """Copy ``src`` into a fresh buffer of its shape: one read of ``src`` and one write, in one
    streaming pass (the floor of an op whose output is as large as the input it reads, e.g. a
    gradient of the logits)."""
    _fresh(src, dtype).copy_(src)


def traffic_floor(reads: tuple[str, ...], writes: tuple[str, ...],
                  copies: tuple[str, ...] = ()) -> Callable[[Any], Outputs]:
    """The floor of an op whose inputs are the fields of a NamedTuple: one read of each field in
    ``reads`` (:func:`read_once`), one fresh write shaped like each field in ``writes``
    (:func:`write_once`; a name may repeat: one write per output of that shape), and for each
    field in ``copies`` a read of it and a write of its size in one pass (:func:`copy_once`;
    a field read there is not named in ``reads`` too)."""

    def floor(inp: Any) -> Outputs:
        read_once(*(getattr(inp, name) for name in reads))
        for name in writes:
            write_once(getattr(inp, name))
        for name in copies:
            copy_once(getattr(inp, name))
        return {}

    return floor


# ------------------------------------------------------------------------------------- inputs


def fresh_leaf(t: Tensor) -> Tensor:
    """A new autograd leaf on ``t``'s data, one per call: gradients are returned by the call,
    never accumulated across calls."""
    return t.detach().requires_grad_()


def multi_turn_mask(b: int, t: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(mask, lengths)`` of ``b`` multi-turn responses of up to ``t`` tokens, drawn from
    ``gen``: lengths in [t/4, t], and one observation span of t/16 tokens per response masked
    out (tool output inside a response). ``mask`` is bool ``(b, t)``, ``lengths`` int64
    ``(b,)``; the generator is advanced by the two draws, lengths first."""
    lengths = torch.randint(t // 4, t + 1, (b,), generator=gen)
    pos = torch.arange(t)[None, :]
    start = torch.randint(0, t, (b,), generator=gen)
    span = (pos >= start[:, None]) & (pos < start[:, None] + t // 16)
    return (pos < lengths[:, None]) & ~span, lengths


def peaked_logits(n: int, v: int, dtype: torch.dtype, device: torch.device,
                  seed: int) -> tuple[Tensor, torch.Generator]:
    """Random ``(n, v)`` logits with σ = 4 (so the softmax is peaked as in a trained model),
    drawn on the CPU from a generator seeded with ``seed``; the generator is returned to draw
    the rest of the inputs from."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    logits = (torch.randn(n, v, generator=gen) * 4).to(dtype=dtype, device=device)
    return logits, gen


#: verl's ``core_algos``: the peer of the cases that time an ``rlkern_<name>`` function against
#: verl's own (gae, gdpo, token_baseline, verl_losses).
VERL_CORE = Peer("verl", lambda: importlib.import_module("verl.trainer.ppo.core_algos"),
                 hint="optional: pip install -e '.[parity]' && pip install --no-deps verl")


#: rlkern's advantages and returns against a verl estimator's: verl accumulates in float32
#: where rlkern accumulates in float64, so they agree to 1e-4 (each case says why).
ADVANTAGES_AND_RETURNS = {"advantages": Tolerance(atol=1e-4, rtol=1e-4),
                          "returns": Tolerance(atol=1e-4, rtol=1e-4)}


def verl_peer_case(*, name: str, backend: RlkernBackend,
                   rlkern: Callable[[str], Callable[[Any], Outputs]],
                   verl: Callable[[str], Callable[[Any], Outputs]],
                   floor: Callable[[Any], Outputs], floor_note: str, notes: tuple[str, ...],
                   warnings: tuple[str, ...] | None = None,
                   environment: dict[str, Any] | None = None, **case: Any) -> Any:
    """A :class:`~rlkern.bench.cases.Case` of three rows per mode: ``rlkern`` (``rlkern(mode)``,
    on ``backend``), ``verl <mode>`` (``verl(mode)``, skipped without verl) and the floor.
    ``notes`` are printed as they are (add ``backend.notes``); ``warnings`` default to the
    backend's notes. ``case``: the rest of the Case's fields (sizes, modes, make_inputs,
    tolerances, ...)."""
    from rlkern.bench.cases import Case, Impl

    def implementations(mode: str) -> list[Impl]:
        return [
            Impl.rlkern(rlkern(mode), note=backend.note),
            Impl(f"verl {mode}", verl(mode), skip=VERL_CORE.missing()),
            Impl.floor(floor, note=floor_note),
        ]

    return Case(name=name, implementations=implementations, notes=notes,
                warnings=backend.notes if warnings is None else warnings,
                environment=backend.environment if environment is None else environment,
                **case)
