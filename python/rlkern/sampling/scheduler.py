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
* ``"length_aware"``: continuous refill at member granularity. Whenever KV frees (a member
  finishes), the pending members to admit are chosen by a knapsack (below), so a finished
  member's slot is refilled at once. The prediction for a member of prompt ``p`` is the mean
  length of its finished siblings; before any sibling finishes, the mean of all finished
  lengths scaled by ``prompt_len[p] / mean prompt_len of those``; before anything finishes,
  ``max_new_tokens / 2``.

Length-aware admission (the Infinite Sampling paper's FPTAS grouping, adapted). At a refill
point the pending members form one class per prompt ``p`` (``n_p`` members, all with the same
prediction ``L̂_p``). Admitting ``c`` members of ``p`` costs ``c · max_new_tokens`` reserved
tokens plus ``prompt_len[p]`` once if its prefix is not resident (the shared prefix is a setup
cost), and is worth ``c / L̂_p`` — the rate at which those members are expected to finish and
free their KV, so that shortest-predicted-first (SJF) is the special case of equal costs. The
admitted set maximises the total value under the free budget (``kv_budget_tokens − reserved``;
without a budget: the free slots of ``micro_group_size`` concurrent members, unit costs, no
setup): a knapsack with setup costs, NP-hard in general, solved by :func:`knapsack_fptas` to
within ``(1 − ε)`` of the optimum (dynamic programming over values scaled by
``K = ε · v_max / n_max``; ``ε = 0.1`` by default). The paper plans rounds globally up front;
here the plan is recomputed at every refill point over all pending members, because the
predictions improve as siblings finish. Among choices of equal value the lighter one wins (a
resident or shorter prefix), then the earlier prompt in SJF order, and members are taken in
index order within a prompt; so, before any prediction exists, groups are filled one after
another and the groups started first finish first (their advantages stream out early).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

SCHEDULES = ("full_group", "micro_group", "length_aware")
#: Default approximation parameter of the length-aware admission knapsack.
FPTAS_EPS = 0.1


@dataclass(frozen=True)
class KnapsackClass:
    """``count`` identical items (pending members of one prompt): each weighs ``weight`` and is
    worth ``value``; taking at least one also costs ``setup`` once (the prompt's prefix KV)."""

    count: int
    weight: int
    value: float
    setup: int = 0


def _total(classes: Sequence[KnapsackClass], counts: Sequence[int]) -> tuple[int, float]:
    w = sum(c.setup + k * c.weight for c, k in zip(classes, counts, strict=True) if k > 0)
    v = sum(k * c.value for c, k in zip(classes, counts, strict=True))
    return w, v


def knapsack_fptas(classes: Sequence[KnapsackClass], capacity: int,
                   eps: float = FPTAS_EPS) -> list[int]:
    """How many items of each class to take: total weight ≤ ``capacity`` and total value at
    least ``(1 − ε) · OPT`` (a fully polynomial-time approximation scheme).

    With ``n_max`` the most items any feasible choice holds (``capacity // min weight``, at most
    ``Σ count``) and ``v_max`` the largest value of one item that fits alone (``setup + weight ≤
    capacity``), every value is scaled to ``s = ⌊value / K⌋``, ``K = ε · v_max / n_max``. A
    dynamic programme over classes computes, for every total scaled value ``u``, the least
    weight reaching it (taking ``k`` items of a class adds ``k · s`` and ``setup + k ·
    weight``); the answer is the largest ``u`` whose weight fits. Rounding loses less than
    ``K`` per taken item, so less than ``n_max · K = ε · v_max ≤ ε · OPT`` in all. Cost:
    ``O(#classes · n_max · n_max² / ε)``. Capacity left over (items whose scaled value is 0) is
    then filled greedily by value, which only adds value. Ties prefer earlier classes.

    Args:
        classes: the item classes (weights ≥ 1, values ≥ 0).
        capacity: the knapsack capacity (≥ 0).
        eps: the approximation parameter, in (0, 1).

    Returns:
        ``counts[i]`` in ``[0, classes[i].count]``.
    """
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must lie in (0, 1), got {eps}")
    counts = [0] * len(classes)
    fits = [i for i, c in enumerate(classes)
            if c.count > 0 and c.setup + c.weight <= capacity and c.value >= 0]
    if not fits:
        return counts
    for c in classes:
        if c.weight < 1 or c.setup < 0:
            raise ValueError(f"item weights must be >= 1 and setups >= 0, got {c}")
    n_max = min(capacity // min(classes[i].weight for i in fits),
                sum(classes[i].count for i in fits))
    v_max = max(classes[i].value for i in fits)
    if v_max > 0:
        K = eps * v_max / n_max
        scaled = {i: math.floor(classes[i].value / K) for i in fits}
        # Per class at most min(count, capacity // weight) items: u ≤ Σ of those · s.
        cap = {i: min(classes[i].count, (capacity - classes[i].setup) // classes[i].weight)
               for i in fits}
        U = sum(cap[i] * scaled[i] for i in fits)
        inf = np.iinfo(np.int64).max // 4
        best = np.full(U + 1, inf, dtype=np.int64)  # least weight reaching scaled value u
        best[0] = 0
        takes: list[tuple[int, np.ndarray]] = []
        for i in fits:
            c, s = classes[i], scaled[i]
            take = np.zeros(U + 1, dtype=np.int32)
            if s > 0:
                new = best.copy()
                for k in range(1, cap[i] + 1):
                    w, val = c.setup + k * c.weight, k * s
                    cand = best[:U + 1 - val] + w
                    better = cand < new[val:]  # strict: ties keep the earlier classes' choice
                    new[val:][better] = cand[better]
                    take[val:][better] = k
                best = new
            takes.append((i, take))
        feasible = np.nonzero(best <= capacity)[0]
        u = int(feasible.max())
        for i, take in reversed(takes):
            k = int(take[u])
            counts[i] = k
            u -= k * scaled[i]
    # Greedy fill of the capacity left (items rounded to 0, or all values 0).
    used, _ = _total(classes, counts)
    for i in sorted(fits, key=lambda i: (-classes[i].value, i)):
        c = classes[i]
        while counts[i] < c.count:
            extra = c.weight + (c.setup if counts[i] == 0 else 0)
            if used + extra > capacity:
                break
            counts[i] += 1
            used += extra
    return counts


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


def default_micro_group_size(group_size: int) -> int:
    """``m = max(1, G // 8)`` members per micro group (2 at ``G = 16``).

    Why 1/8 of the group: a static round's KV peak is set by the round that holds the longest
    response — ``prompt + L_max + (m − 1)`` siblings' lengths — against ``prompt + L_max +
    (G − 1)`` siblings for the full group. On long-tailed (lognormal) lengths ``L_max`` is
    several times the mean, so the peak only halves once ``m`` is a small fraction of ``G``:
    measured at ``G = 16`` (``rlkern bench --op micro_groups``; docs/sampling.md), ``m = 4``
    keeps 54 % of the full group's peak, ``m = 2`` 48 %. A budget (``kv_budget_tokens``)
    raises the concurrency of every schedule to what it affords, whatever ``m`` is.
    """
    return max(1, group_size // 8)


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
            :func:`default_micro_group_size`).
        fptas_eps: ``ε`` of the length-aware admission knapsack (:func:`knapsack_fptas`).
    """

    def __init__(self, prompt_lengths: Sequence[int], *, group_size: int, schedule: str,
                 max_new_tokens: int, kv_budget_tokens: int | None = None,
                 micro_group_size: int | None = None, fptas_eps: float = FPTAS_EPS):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        m = (micro_group_size if micro_group_size is not None
             else default_micro_group_size(group_size))
        if not 1 <= m <= group_size:
            raise ValueError(f"micro_group_size must lie in [1, group_size={group_size}], got {m}")
        self.prompt_lengths = [int(x) for x in prompt_lengths]
        self.G, self.schedule, self.m = group_size, schedule, m
        self.max_new = int(max_new_tokens)
        self.budget = kv_budget_tokens
        if not 0.0 < fptas_eps < 1.0:
            raise ValueError(f"fptas_eps must lie in (0, 1), got {fptas_eps}")
        self.eps = fptas_eps
        unit = group_size if schedule == "full_group" else m
        need = max(self.prompt_lengths, default=0) + unit * self.max_new
        if self.budget is not None and self.budget < need:
            raise ValueError(
                f"kv_budget ({self.budget} tokens) is too small for one {schedule} unit: "
                f"{unit} member(s) x max_new_tokens={self.max_new} + the longest prompt "
                f"({max(self.prompt_lengths, default=0)}) = {need} tokens")
        # Concurrent members without a budget (with one, the reservations bound it instead).
        self.slots = unit
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
            return self._admit_knapsack()
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

    def _admit_knapsack(self) -> list[tuple[int, int]]:
        """Length-aware admission: the (1 − ε)-optimal set of pending members under the free
        budget (module docstring), taken in group-major order within each prompt."""
        if self.budget is None:
            capacity = self.slots - len(self.state.active)
            per_member = 1
        else:
            capacity = self.budget - self.reserved()
            per_member = self.max_new
        if capacity < per_member:
            return []  # cheap exit: the common case between finishes
        by_prompt: dict[int, list[tuple[int, int]]] = {}
        for mem in self.pending:
            by_prompt.setdefault(mem[0], []).append(mem)
        pred = {p: self.predict(p) for p in by_prompt}
        # SJF order of the classes: the DP's ties then favour shorter, then earlier prompts.
        prompts = sorted(by_prompt, key=lambda p: (pred[p], p))
        classes = [KnapsackClass(
            count=len(by_prompt[p]), weight=per_member, value=1.0 / max(pred[p], 1.0),
            setup=(self.prompt_lengths[p]
                   if self.budget is not None and p not in self.state.resident else 0))
            for p in prompts]
        counts = knapsack_fptas(classes, capacity, self.eps)
        out = [mem for p, k in zip(prompts, counts, strict=True) for mem in by_prompt[p][:k]]
        out.sort()
        if out:
            self._take(out)
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
