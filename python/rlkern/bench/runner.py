"""Run one case: every size × mode × implementation, in one process.

Per size the inputs are made once and shared by all implementations. Per (size, mode):

1. rlkern runs first; its outputs are the reference for the agreement check.
2. Each implementation's first call is checked against that reference. One that disagrees is
   reported as a mismatch with no time or memory: a number for a different computation would
   be misleading. Its remaining warm-up calls follow (the checked call was the first), and an
   implementation whose timed calls would exceed the time budget is skipped here.
3. The timed calls run in rounds: each round calls every remaining implementation once, each
   round starting one implementation later. On a shared machine the load drifts; interleaving
   spreads that drift over all implementations instead of charging it to whichever happened
   to run during a busy minute, so the ratios stay meaningful.
4. After the first ``repeats`` rounds, further rounds (same rotation, all implementations) run
   while some implementation's IQR is at least ``max_iqr`` × its median, up to ``max_repeats``
   rounds in all and while every implementation's timed calls stay within the time budget.
   An implementation still that spread at the end is marked ``noisy``.
5. One more call per implementation measures its peak extra memory, after the timed calls so
   that switching the allocator to its memory-measuring mode cannot disturb them.
6. Ratios to rlkern and to the floor are filled in once the whole (size, mode) is done. A ratio
   is withheld (``None``) when either of its two medians is noisy: a quotient of a median
   that moves by more than ``max_iqr`` between runs would claim a precision it does not have.
"""

from __future__ import annotations

import gc
import time
import traceback
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import torch

from rlkern.bench import allocator
from rlkern.bench.cases import (
    FLOOR,
    RLKERN,
    Case,
    Impl,
    ImplUnavailableError,
    Outputs,
    Size,
)
from rlkern.bench.check import CheckResult, compare
from rlkern.bench.harness import (
    Timing,
    peak_extra_memory,
    summarize,
    synchronize,
    timed_once,
)

OK, SKIPPED, MISMATCH, ERROR = "ok", "skipped", "mismatch", "error"

#: Default noise rule: rounds repeat until every IQR is below this fraction of its median ...
DEFAULT_MAX_IQR = 0.10
#: ... or this many rounds have run in all.
DEFAULT_MAX_REPEATS = 30

#: Why the timed rounds of a group stopped (``Measurement.extra["stopped"]``): no noise rule
#: (``repeats`` rounds), every IQR below the bound, the round cap, the time budget.
FIXED, STABLE, CAP, BUDGET = "fixed", "stable", "max_repeats", "budget"


@dataclass
class Measurement:
    """Everything measured for one implementation at one size and mode.

    ``first_call_s`` is the checked first call (it includes compilation where there is any);
    ``timing.warmup`` the further untimed calls; ``timing.times`` the timed ones (one per
    round). ``noisy`` is True when the IQR of the timed calls stayed at or above the run's
    ``max_iqr`` × median: no ratio that involves this measurement is given (``ratio_*`` None).
    """

    case: str
    mode: str
    size: dict[str, int]
    dtype: str
    device: str
    impl: str
    role: str
    status: str
    reason: str = ""
    first_call_s: float | None = None
    timing: Timing | None = None
    peak_bytes: int | None = None
    check: CheckResult | None = None
    ratio_rlkern: float | None = None
    ratio_floor: float | None = None
    noisy: bool = False
    extra: dict[str, object] = field(default_factory=dict)


class Listener:
    """Progress hooks of :func:`run_case`; the default does nothing (see ``report.Progress``)."""

    def start(self, total: int) -> None:
        """``total`` measurements are about to run."""

    def step(self, description: str) -> None:
        """Work on a measurement starts."""

    def done(self, measurement: Measurement) -> None:
        """One measurement finished (or was skipped)."""

    def note(self, text: str) -> None:
        """Something the user should read (a skip, a fallback)."""


@dataclass
class _Pending:
    """An implementation that passed its check and warm-up and awaits its timed calls."""

    m: Measurement
    call: Callable[[], object]
    warmup: tuple[float, ...]
    times: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class _Rule:
    """The noise rule of a run (see :func:`run_case`) and the timer of one call."""

    max_iqr: float | None = None
    max_repeats: int | None = None
    timer: Callable[..., float] = timed_once


def _budget_skip(
    impl: Impl, mode: str, size: Size, over_budget: dict[tuple[str, str], Size]
) -> str | None:
    """Reason to skip ``impl`` because it was already over budget at a size no larger."""
    prior = over_budget.get((impl.name, mode))
    if prior is not None and prior.elements() <= size.elements():
        return f"over the time budget already at {prior.label()}"
    return None


def _over_budget(m: Measurement, repeats: int, budget_s: float | None) -> Measurement:
    m.status = SKIPPED
    m.reason = f"{repeats} calls would exceed the {budget_s:g} s time budget"
    m.extra["over_budget"] = True
    return m


def _fail(m: Measurement, exc: Exception) -> None:
    m.status = ERROR
    m.reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
    m.extra["traceback"] = traceback.format_exc()


def _prepare(
    case: Case,
    impl: Impl,
    inputs: object,
    ref: Outputs | None,
    device: torch.device,
    repeats: int,
    budget_s: float | None,
    m: Measurement,
) -> tuple[_Pending | None, Outputs | None]:
    """Check and warm up one implementation; returns it ready for timing (or ``None`` when it
    is not to be timed: skipped, mismatch, error) and, for rlkern, its outputs."""
    if impl.skip:
        m.status, m.reason = SKIPPED, impl.skip
        return None, None
    call = lambda: impl.fn(inputs)
    try:
        synchronize(device)
        start = time.perf_counter()
        out = call()
        synchronize(device)
        m.first_call_s = time.perf_counter() - start
        if impl.role == FLOOR:
            out = None
        elif ref is not None:
            m.check = compare(out, ref, case.tolerances)
            if not m.check.ok:
                m.status, m.reason = MISMATCH, m.check.message
                return None, None
        elif impl.role != RLKERN:
            m.reason = "unchecked: no rlkern reference"
        kept = out if impl.role == RLKERN else None
        del out
        warm = [timed_once(call, device=device) for _ in range(impl.warmup - 1)]
        # The last untimed call predicts a timed one (the first call may have compiled).
        predictor = warm[-1] if warm else m.first_call_s
        if budget_s is not None and predictor * repeats > budget_s:
            # One slow call on a busy machine must not drop an implementation: confirm it.
            warm.append(timed_once(call, device=device))
            predictor = min(predictor, warm[-1])
        if budget_s is not None and predictor * repeats > budget_s:
            _over_budget(m, repeats, budget_s)
            return None, kept
        return _Pending(m, call, tuple(warm)), kept
    except ImplUnavailableError as exc:
        m.status, m.reason = SKIPPED, str(exc)
    except Exception as exc:  # one broken implementation must not end the run
        _fail(m, exc)
    return None, None


def is_noisy(timing: Timing, max_iqr: float | None) -> bool:
    """True when ``timing``'s IQR is at least ``max_iqr`` × its median (never with ``None``).

    A median of 0 (a clock too coarse for the call) with any spread counts as noisy.
    """
    if max_iqr is None:
        return False
    return timing.iqr >= max_iqr * timing.median and not (timing.iqr == 0 == timing.median)


def iqr_text(timing: Timing) -> str:
    """``"IQR 13% of the median"`` (``"IQR > 0 at a median of 0"`` for a clock too coarse)."""
    if timing.median > 0:
        return f"IQR {timing.iqr / timing.median:.0%} of the median"
    return "IQR > 0 at a median of 0"


def _stop_reason(pending: list[_Pending], rounds: int, max_iqr: float | None,
                 max_repeats: int, budget_s: float | None) -> str | None:
    """Why no further round runs after ``rounds`` rounds, or ``None`` to run one more."""
    if max_iqr is None:
        return FIXED
    live = [p for p in pending if p.m.status == OK and p.times]
    if not live or all(not is_noisy(summarize(p.times), max_iqr) for p in live):
        return STABLE
    if rounds >= max_repeats:
        return CAP
    # One more call each, predicted by the median so far, must keep every implementation's
    # timed calls within the budget (the budget bounds one implementation at one size).
    if budget_s is not None and any(
            sum(p.times) + summarize(p.times).median > budget_s for p in live):
        return BUDGET
    return None


def _time_rounds(pending: list[_Pending], repeats: int, device: torch.device, *,
                 max_iqr: float | None = None, max_repeats: int | None = None,
                 budget_s: float | None = None,
                 timer: Callable[..., float] = timed_once) -> None:
    """At least ``repeats`` rounds of one timed call per implementation, rotating the order;
    more while some implementation is noisy (see the module doc); then one call each for peak
    memory. ``timer(call, device=...)`` times one call (injectable for tests)."""
    cap = max(repeats, max_repeats if max_repeats is not None else repeats)
    gc.collect()  # collect now, not inside some implementation's timed call
    r = 0
    while True:
        live = [p for p in pending if p.m.status == OK]
        for j in range(len(live)):
            p = live[(r + j) % len(live)]
            try:
                p.times.append(timer(p.call, device=device))
            except Exception as exc:  # failing only now (e.g. out of memory): no numbers
                _fail(p.m, exc)
        r += 1
        if r < repeats:
            continue
        stopped = _stop_reason(pending, r, max_iqr, cap, budget_s)
        if stopped is not None:
            break
    for p in pending:
        if p.m.status != OK:
            continue
        p.m.timing = summarize(p.times, p.warmup)
        p.m.noisy = is_noisy(p.m.timing, max_iqr)
        p.m.extra["rounds"] = r
        p.m.extra["stopped"] = stopped
        gc.collect()  # so garbage freed during the call cannot hide part of its peak
        try:
            p.m.peak_bytes = peak_extra_memory(p.call, device=device)
        except Exception as exc:
            _fail(p.m, exc)


def _fill_ratios(group: list[Measurement]) -> None:
    """``ratio_rlkern`` and ``ratio_floor`` of every timed measurement; ``None`` where either
    median is noisy (or missing)."""
    def median_of(role: str) -> float | None:
        for m in group:
            if m.role == role and m.status == OK and m.timing is not None:
                return None if m.noisy else m.timing.median
        return None

    def noisy(role: str) -> bool:
        return any(m.role == role and m.status == OK and m.noisy for m in group)

    base, floor = median_of(RLKERN), median_of(FLOOR)
    for m in group:
        if m.status != OK or m.timing is None:
            continue
        # Ratios not given because a median in them is noisy, so tables can say so.
        withheld = [name for name, role in (("ratio_rlkern", RLKERN), ("ratio_floor", FLOOR))
                    if m.noisy or noisy(role)]
        if withheld:
            m.extra["ratio_withheld"] = withheld
        if m.noisy:
            continue
        if base:
            m.ratio_rlkern = m.timing.median / base
        if floor:
            m.ratio_floor = m.timing.median / floor


def run_case(
    case: Case,
    *,
    sizes: Sequence[Size] | None = None,
    modes: Sequence[str] | None = None,
    repeats: int = 5,
    budget_s: float | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    only: Collection[str] | None = None,
    listener: Listener | None = None,
    max_iqr: float | None = None,
    max_repeats: int | None = None,
    timer: Callable[..., float] = timed_once,
) -> list[Measurement]:
    """Measure ``case`` at ``sizes`` (default: the full sizes) in ``modes`` (default: all).

    ``only`` restricts the peers to these names; rlkern and the floor always run, since every
    ratio is taken to them. ``budget_s`` bounds the timed calls of one implementation at one
    size; one over budget is skipped with a note, and so are its larger sizes in that mode.

    ``repeats`` rounds of timed calls always run; then more, up to ``max_repeats`` rounds in
    all, until every implementation's IQR is below ``max_iqr`` × its median. ``max_iqr=None``
    (the default here): exactly ``repeats`` rounds and nothing is marked noisy.
    ``max_repeats=None``: no extra rounds, but the noise rule still marks. ``rlkern bench``
    passes :data:`DEFAULT_MAX_IQR` and :data:`DEFAULT_MAX_REPEATS` unless told otherwise.
    ``timer(call, device=...)`` returns the seconds of one timed call (default
    :func:`~rlkern.bench.harness.timed_once`; tests inject a scripted one).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if max_iqr is not None and not max_iqr > 0:
        raise ValueError(f"max_iqr must be > 0 (or None: no noise rule), got {max_iqr}")
    if max_repeats is not None and max_repeats < repeats:
        raise ValueError(f"max_repeats ({max_repeats}) must be >= repeats ({repeats})")
    dev = torch.device(device)
    listener = listener or Listener()
    sizes = sorted(sizes if sizes is not None else case.sizes, key=Size.elements)
    modes = list(modes) if modes is not None else list(case.modes)
    unknown = [m for m in modes if m not in case.modes]
    if unknown:
        raise ValueError(f"case {case.name!r} has modes {case.modes}, not {unknown}")
    plan = {
        mode: [i for i in case.implementations(mode)
               if only is None or i.role in (RLKERN, FLOOR) or i.name in only]
        for mode in modes
    }
    listener.start(sum(len(impls) for impls in plan.values()) * len(sizes))
    allocator.for_timing()
    # Objects alive now (modules, the case) are frozen out of the collector, so the
    # gc.collect() before each round of timed calls scans only what the run allocates.
    gc.collect()
    gc.freeze()
    try:
        results: list[Measurement] = []
        over_budget: dict[tuple[str, str], Size] = {}
        for size in sizes:
            inputs = case.make_inputs(size, dtype, dev)
            for mode in modes:
                results += _run_group(case, size, mode, plan[mode], inputs, repeats, budget_s,
                                      dev, dtype, over_budget, listener,
                                      _Rule(max_iqr, max_repeats, timer))
            del inputs
            gc.collect()
        return results
    finally:
        gc.unfreeze()


def _run_group(
    case: Case,
    size: Size,
    mode: str,
    impls: list[Impl],
    inputs: object,
    repeats: int,
    budget_s: float | None,
    dev: torch.device,
    dtype: torch.dtype,
    over_budget: dict[tuple[str, str], Size],
    listener: Listener,
    rule: _Rule | None = None,
) -> list[Measurement]:
    """All implementations at one (size, mode)."""
    rule = rule or _Rule()
    where = f"{case.name} {mode} {size.label()}"
    group: list[Measurement] = []
    pending: list[_Pending] = []
    ref: Outputs | None = None
    for impl in impls:
        listener.step(f"{where}: {impl.name} (check, warm-up)")
        m = Measurement(case=case.name, mode=mode, size=dict(size.dims),
                        dtype=str(dtype).removeprefix("torch."), device=str(dev),
                        impl=impl.name, role=impl.role, status=OK)
        group.append(m)
        reason = _budget_skip(impl, mode, size, over_budget)
        if reason:
            m.status, m.reason = SKIPPED, reason
            continue
        ready, kept = _prepare(case, impl, inputs, ref, dev, repeats, budget_s, m)
        if impl.role == RLKERN:
            ref = kept
        del kept
        if ready is not None:
            pending.append(ready)
        if m.extra.get("over_budget"):
            over_budget[(impl.name, mode)] = size
    del ref  # rlkern's outputs: not needed while timing
    listener.step(f"{where}: timing {len(pending)} implementations × {repeats}, interleaved")
    _time_rounds(pending, repeats, dev, max_iqr=rule.max_iqr, max_repeats=rule.max_repeats,
                 budget_s=budget_s, timer=rule.timer)
    _fill_ratios(group)
    for m in group:
        if m.status != OK:
            listener.note(f"{where} {m.impl}: {m.status}: {m.reason}")
        elif m.noisy and m.timing is not None:
            listener.note(f"{where} {m.impl}: noisy: {iqr_text(m.timing)} "
                          f"after {m.extra.get('rounds')} rounds "
                          f"(stopped: {m.extra.get('stopped')}); no ratio given")
        listener.done(m)
    return group
