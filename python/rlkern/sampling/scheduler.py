"""Micro-group schedulers (ALGORITHMS.md §5), shared by :func:`simulate` and
:func:`rlkern.generate_groups` so that the simulation replays exactly the decisions a real run
makes.

Model. Prompt ``p`` has ``G`` members ``(p, j)``. A member is admitted at the start of a decode
step, produces one token per step, and finishes after its length ``L`` (unknown to the
scheduler until then). Resident KV tokens at a step are

    Σ_{groups with a prefix in memory} prompt_len[p]  +  Σ_{active members} tokens generated,

with one copy of a prompt's prefix per group (prefill once, shared by the members), resident
from the admission of the group's first member to the end of its last one.

Budget. Lengths are unknown at admission, so each admission *reserves* the worst case:
``max_new_tokens`` per active member plus ``prompt_len`` for a prefix not yet resident; a unit is
admitted only if the reservations fit ``kv_budget_tokens``. The budget is therefore never
exceeded whatever the lengths turn out to be, and every schedule runs under the same rule.

Schedules:

* ``"full_group"``: the unit of admission is a whole group (G members); groups are admitted in
  order while their reservation fits (without a budget: one group at a time).
* ``"micro_group"`` (naive micro groups): units of ``micro_group_size`` members of one prompt in
  group-major order, admitted in *rounds*: a round starts when every member of the previous
  one has finished (without a budget: one micro group per round).
* ``"length_aware"``: continuous refill at member granularity with the same concurrency as
  ``micro_group`` (``micro_group_size`` slots per admitted micro group). Whenever a slot frees,
  pending members are admitted shortest-predicted-first (SJF). The prediction for a member of
  prompt ``p`` is the mean length of its finished siblings; before any sibling finishes, the
  mean of all finished lengths scaled by ``prompt_len[p] / mean prompt_len of those``; before
  anything finishes, ``max_new_tokens / 2``. Ties keep group-major order, so groups started
  first finish first (their advantages stream out early). The paper's FPTAS round planning is
  replaced by this SJF refill; see docs/sampling.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

SCHEDULES = ("full_group", "micro_group", "length_aware")


@dataclass(frozen=True)
class SimResult:
    """Outcome of a schedule: ``peak_tokens`` (max resident KV tokens), ``decode_steps`` (steps
    with at least one active member) and ``utilisation`` (generated tokens / (decode_steps ·
    peak number of concurrent members))."""

    peak_tokens: int
    decode_steps: int
    utilisation: float


@dataclass
class _State:
    active: dict[tuple[int, int], int] = field(default_factory=dict)  # member → tokens so far
    held: dict[tuple[int, int], int] = field(default_factory=dict)  # finished, KV still held
    resident: dict[int, int] = field(default_factory=dict)  # prompt → active members


class Scheduler:
    """Decides which members run at each decode step (see the module docstring).

    Args:
        prompt_lengths: ``P`` prompt lengths in tokens.
        group_size: ``G``.
        schedule: one of :data:`SCHEDULES`.
        max_new_tokens: the per-member reservation.
        kv_budget_tokens: optional budget; ``None`` means one unit (group / micro group) at a
            time.
        micro_group_size: ``m`` for ``micro_group`` and ``length_aware`` (default
            ``max(1, G // 4)``).
    """

    def __init__(self, prompt_lengths: Sequence[int], *, group_size: int, schedule: str,
                 max_new_tokens: int, kv_budget_tokens: int | None = None,
                 micro_group_size: int | None = None):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        m = micro_group_size if micro_group_size is not None else max(1, group_size // 4)
        if not 1 <= m <= group_size:
            raise ValueError(f"micro_group_size must lie in [1, group_size={group_size}], got {m}")
        self.prompt_lengths = [int(x) for x in prompt_lengths]
        self.G, self.schedule, self.m = group_size, schedule, m
        self.max_new = int(max_new_tokens)
        self.budget = kv_budget_tokens
        unit = group_size if schedule == "full_group" else m
        need = max(self.prompt_lengths, default=0) + unit * self.max_new
        if self.budget is not None and self.budget < need:
            raise ValueError(
                f"kv_budget ({self.budget} tokens) is too small for one {schedule} unit: "
                f"{unit} member(s) x max_new_tokens={self.max_new} + the longest prompt "
                f"({max(self.prompt_lengths, default=0)}) = {need} tokens")
        if self.budget is None:
            self.slots = unit
        else:  # the member concurrency the budget affords with prefixes of an average prompt
            mean_p = sum(self.prompt_lengths) / max(1, len(self.prompt_lengths))
            units = max(1, int(self.budget // (mean_p + unit * self.max_new)))
            self.slots = units * unit
        # Pending members in group-major order.
        self.pending = [(p, j) for p in range(len(self.prompt_lengths)) for j in range(self.G)]
        self.state = _State()
        self.finished: dict[int, list[int]] = {}
        self.group_left = {p: self.G for p in range(len(self.prompt_lengths))}
        self._n_done = 0
        self._sum_len = 0
        self._sum_pl = 0

    # -- accounting ----------------------------------------------------------------------------

    def reserved(self) -> int:
        s = self.state
        return (sum(self.prompt_lengths[p] for p in s.resident) + len(s.active) * self.max_new)

    def resident_tokens(self) -> int:
        s = self.state
        return (sum(self.prompt_lengths[p] for p in s.resident) + sum(s.active.values())
                + sum(s.held.values()))

    def _fits(self, members: list[tuple[int, int]]) -> bool:
        if self.budget is None:
            return len(self.state.active) + len(members) <= self.slots
        new_prompts = {p for p, _ in members if p not in self.state.resident}
        extra = sum(self.prompt_lengths[p] for p in new_prompts) + len(members) * self.max_new
        return self.reserved() + extra <= self.budget

    def predict(self, p: int) -> float:
        """Predicted response length of a pending member of prompt ``p``."""
        sib = self.finished.get(p)
        if sib:
            return sum(sib) / len(sib)
        if self._n_done:
            mean_len = self._sum_len / self._n_done
            mean_pl = self._sum_pl / self._n_done
            return mean_len * (self.prompt_lengths[p] / mean_pl if mean_pl > 0 else 1.0)
        return self.max_new / 2

    # -- decisions ---------------------------------------------------------------------------

    def _take(self, members: list[tuple[int, int]]) -> None:
        taken = set(members)
        self.pending = [mem for mem in self.pending if mem not in taken]
        for mem in members:
            self.state.active[mem] = 0
            p = mem[0]
            self.state.resident[p] = self.state.resident.get(p, 0) + 1

    def admit(self) -> list[tuple[int, int]]:
        """Members to start at this step (their first token is produced this step)."""
        out: list[tuple[int, int]] = []
        if not self.pending:
            return out
        if self.schedule == "length_aware":
            if len(self.state.active) >= self.slots:
                return out
            pred = {p: self.predict(p) for p in {mem[0] for mem in self.pending}}
            order = sorted(self.pending, key=lambda mem: (pred[mem[0]], mem))
            for mem in order:
                if len(self.state.active) >= self.slots:
                    break
                if not self._fits([mem]):
                    continue
                self._take([mem])
                out.append(mem)
            return out
        if self.schedule == "micro_group" and self.state.active:
            return out  # a round ends only when all its members have finished
        unit = self.G if self.schedule == "full_group" else self.m
        while self.pending:
            p0 = self.pending[0][0]
            batch = [mem for mem in self.pending if mem[0] == p0][:unit]
            if not self._fits(batch):
                break
            if self.budget is None and self.state.active and self.schedule == "full_group":
                break
            self._take(batch)
            out.extend(batch)
            if self.budget is None:
                break
        return out

    def step(self, k: int = 1) -> None:
        """``k`` tokens for every active member."""
        for mem in self.state.active:
            self.state.active[mem] += k

    def finish(self, mem: tuple[int, int]) -> bool:
        """Member ``mem`` produced its last token; returns True when its group is complete.

        ``length_aware`` (continuous batching) frees the member's KV at once. The static
        schedules hold it, as a padded static batch does, until their unit ends: the group
        (``full_group``) or the round (``micro_group``).
        """
        s = self.state
        length = s.active.pop(mem)
        p = mem[0]
        self.finished.setdefault(p, []).append(length)
        self._n_done += 1
        self._sum_len += length
        self._sum_pl += self.prompt_lengths[p]
        s.resident[p] -= 1
        self.group_left[p] -= 1
        if self.schedule != "length_aware":
            s.held[mem] = length
        if s.resident[p] == 0:
            # Prefix dropped when no member of the group runs; a later unit re-prefills it.
            del s.resident[p]
            if self.schedule == "full_group":
                for q in [q for q in s.held if q[0] == p]:
                    del s.held[q]
        if self.schedule == "micro_group" and not s.active:
            s.held.clear()
        return self.group_left[p] == 0

    @property
    def active(self) -> list[tuple[int, int]]:
        return list(self.state.active)

    def done(self) -> bool:
        return not self.pending and not self.state.active


def drive(sched: Scheduler, *, on_admit: Callable[[list[tuple[int, int]]], None],
          on_step: Callable[[list[tuple[int, int]]], list[tuple[int, int]]],
          on_group_done: Callable[[int], None] | None = None,
          horizon: Callable[[list[tuple[int, int]]], int] | None = None) -> SimResult:
    """The decode loop shared by simulation and generation.

    Each step: ``sched.admit()`` → ``on_admit(new)`` (prefill / set up caches); every active
    member produces one token (``on_step(active)`` returns those that finished with it);
    finished members leave and their groups may complete (``on_group_done(p)``).
    ``horizon(active)`` (simulation only) may return k > 1 steps during which no member
    finishes; they are taken at once (``on_step(active, k)``), with the same results.
    """
    peak = steps = generated = 0
    conc = 0
    while not sched.done():
        new = sched.admit()
        if new:
            on_admit(new)
        active = sched.active
        if not active:
            raise RuntimeError("scheduler admitted nothing although members are pending")
        k = max(1, horizon(active)) if horizon is not None else 1
        sched.step(k)
        steps += k
        generated += k * len(active)
        conc = max(conc, len(active))
        # Resident tokens only grow between finishes, so the end of the k steps is the max.
        peak = max(peak, sched.resident_tokens())
        for mem in (on_step(active, k) if horizon is not None else on_step(active)):
            if sched.finish(mem) and on_group_done is not None:
                on_group_done(mem[0])
    util = generated / (steps * conc) if steps else 0.0
    return SimResult(peak_tokens=peak, decode_steps=steps, utilisation=util)
