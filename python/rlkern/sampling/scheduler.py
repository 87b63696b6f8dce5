"""Micro-group schedulers (ALGORITHMS.md §5), shared by :func:`simulate` and
:func:`rlkern.generate_groups` so that the simulation replays exactly the decisions a real run
makes.

Model. Prompt ``p`` has ``G`` members ``(p, j)``. A member is admitted at the start of a decode
step, produces one token per step, and finishes after its length ``L`` (unknown to the
scheduler until then). Resident KV tokens at a step are

    Σ_{groups with a prefix in memory} prompt_len[p]  +  Σ_{active members} tokens generated,

with one copy of a prompt's prefix per group (prefill once, shared by the members), resident
from the admission of the group's first member to the end of its last one.

Budget: admission by predicted length, growth on demand, recompute preemption. With
``kv_budget_tokens`` a member is admitted against its *predicted* KV, not its worst case
(``max_new_tokens``), and its KV grows by one token per step as it decodes:

* Prediction (:meth:`Scheduler.remaining`). A member of prompt ``p`` with ``n`` tokens so far
  is expected to need ``E[L | L > n] − n`` more tokens, estimated by the mean of its finished
  siblings longer than ``n``; without one, :meth:`Scheduler.predict`: the mean length of its
  finished siblings, else the mean of all finished lengths scaled by ``prompt_len[p] /`` the
  mean prompt length of those, else ``length_prior`` (default ``max_new_tokens / 2``). Always
  ≥ 1 (a member that outlived every prediction is expected to need one more token at a time)
  and ≤ ``max_new_tokens − n``.
* Admission (at refill points only: the start, after a finish or a preemption, or when
  nothing runs). ``reserved()`` = resident KV + every active member's predicted remainder;
  candidates are admitted while ``reserved() +`` their predicted KV (a new prefix, their
  tokens so far — rebuilt on resumption — and their predicted remainder) fits the budget.
  Each remainder is ≥ 1, so whatever is admitted fits the next step.
* Preemption (before every step, :meth:`Scheduler.make_room`). If the next step (every
  active member + 1 token) would exceed the budget, the active member with the longest
  predicted remainder (ties: the later one in group-major order) is evicted, until it fits:
  its KV is freed (its prefix too when no sibling runs) and it is queued again with the
  tokens it has. Resuming, its KV is rebuilt (recompute, as vLLM's recompute preemption;
  :func:`rlkern.generate_groups` replays the tokens, never re-draws them), counted in
  ``recomputed_tokens``. ``length_aware`` resumes preempted members first, in eviction order,
  and a preempted member that does not fit yet holds back fresh admissions (it cannot starve);
  the static schedules put it back at its place in group-major order.
* Limits. The budget is never exceeded (:func:`drive` checks it after every step). A budget
  below the longest prompt + 1 token is refused up front; above it, every run progresses —
  when nothing runs, the first candidate is admitted alone whatever its prediction — and
  only a member that alone needs more than the budget (prompt + its length) stops the run
  with a ``ValueError``. Tokens are never lost or drawn twice, so the number of steps is at
  most ``Σ L`` and every run ends.

Without a budget nothing is preempted: ``full_group`` / ``micro_group`` run one unit at a time
and ``length_aware`` keeps ``micro_group_size`` members running. Every schedule runs under the
same budget rule.

Schedules:

* ``"full_group"``: the unit of admission is a whole group (G members); groups are admitted in
  order while their predicted KV fits (without a budget: one group at a time).
* ``"micro_group"`` (naive micro groups): units of ``micro_group_size`` members of one prompt in
  group-major order, admitted in *rounds*: a round starts when every member of the previous
  one has finished (without a budget: one micro group per round).
* ``"length_aware"``: continuous refill at member granularity. Whenever KV frees (a member
  finishes or is preempted), the pending members to admit are chosen by a knapsack (below),
  so a finished member's slot is refilled at once.

Length-aware admission (the Infinite Sampling paper's FPTAS grouping, adapted). At a refill
point the fresh pending members form one class per prompt ``p`` (``n_p`` members, all with the
same prediction ``L̂_p``). Admitting ``c`` members of ``p`` costs ``c · ⌈L̂_p⌉`` predicted KV
tokens plus ``prompt_len[p]`` once if its prefix is not resident (the shared prefix is a setup
cost), and is worth ``c / L̂_p`` — the rate at which those members are expected to finish and
free their KV, so that shortest-predicted-first (SJF) wins among equal costs. The admitted
set maximises the total value under the free budget (``kv_budget_tokens − reserved()``;
without a budget: the free slots of ``micro_group_size`` concurrent members, unit costs, no
setup): a knapsack with setup costs, NP-hard in general, solved by :func:`knapsack_fptas` to
within ``(1 − ε)`` of the optimum (dynamic programming over values scaled by
``K = ε · LB / n_max``, LB a feasible greedy value; ``ε = 0.1`` by default). The paper plans
rounds globally up front; here the plan is recomputed at every refill point over all pending
members, because the predictions improve as siblings finish. Among choices of equal value the
lighter one wins (a resident or shorter prefix), then the earlier prompt in SJF order, and
members are taken in index order within a prompt; so, before any prediction exists, groups
are filled one after another and the groups started first finish first (their advantages
stream out early).
"""

from __future__ import annotations

import bisect
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


def _bounds(classes: Sequence[KnapsackClass], fits: Sequence[int],
            capacity: int) -> tuple[float, float]:
    """``(LB, UB)`` with ``LB ≤ OPT ≤ UB``. LB: the better of a feasible greedy choice (classes
    by value per amortised weight ``weight + setup / count``, as many items as fit) and the
    best single class alone. UB: the fractional relaxation with amortised weights — any
    integral choice costs at least its amortised weight, so it is feasible there."""
    dens = sorted(fits, key=lambda i: -classes[i].value
                  / (classes[i].weight + classes[i].setup / classes[i].count))
    used, greedy = 0, 0.0
    for i in dens:
        c = classes[i]
        k = min(c.count, (capacity - used - c.setup) // c.weight)
        if k >= 1:
            used += c.setup + k * c.weight
            greedy += k * c.value
    single = max(min(classes[i].count, (capacity - classes[i].setup) // classes[i].weight)
                 * classes[i].value for i in fits)
    left, ub = float(capacity), 0.0
    for i in dens:
        c = classes[i]
        amortised = c.weight + c.setup / c.count
        k = min(float(c.count), left / amortised)
        ub += k * c.value
        left -= k * amortised
        if left <= 0:
            break
    return max(greedy, single), ub


def knapsack_fptas(classes: Sequence[KnapsackClass], capacity: int,
                   eps: float = FPTAS_EPS) -> list[int]:
    """How many items of each class to take: total weight ≤ ``capacity`` and total value at
    least ``(1 − ε) · OPT`` (a fully polynomial-time approximation scheme).

    With ``n_max`` the most items any feasible choice holds (``capacity // min weight``, at most
    ``Σ count``) and ``LB ≤ OPT ≤ UB`` from :func:`_bounds` (a feasible greedy choice; the
    fractional relaxation with setups amortised over a class), every value is scaled to
    ``s = ⌊value / K⌋``, ``K = ε · LB / n_max`` (Ibarra–Kim: a lower bound on OPT instead of
    the largest item value keeps the range of scaled totals at ``UB / K = (UB / LB) · n_max /
    ε`` rather than ``n_max² / ε``). A dynamic programme over classes computes, for every total
    scaled value ``u ≤ UB / K``, the least weight reaching it (taking ``k`` items of a class
    adds ``k · s`` and ``setup + k · weight``); the answer is the largest ``u`` whose weight
    fits. Rounding loses less than ``K`` per taken item, so less than ``n_max · K = ε · LB ≤
    ε · OPT`` in all. Cost: ``O(#classes · n_max · n_max · (UB / LB) / ε)``; UB / LB is
    about 2 in practice. Capacity left over (items whose scaled value is 0) is then filled
    greedily by value, which only adds value. Ties prefer earlier classes.

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
    for c in classes:
        if c.weight < 1 or c.setup < 0:
            raise ValueError(f"item weights must be >= 1 and setups >= 0, got {c}")
    fits = [i for i, c in enumerate(classes)
            if c.count > 0 and c.setup + c.weight <= capacity and c.value >= 0]
    if not fits:
        return counts
    n_max = min(capacity // min(classes[i].weight for i in fits),
                sum(classes[i].count for i in fits))
    lb, ub = _bounds(classes, fits, capacity)
    if lb > 0:
        K = eps * lb / n_max
        scaled = {i: math.floor(classes[i].value / K) for i in fits}
        # Per class at most min(count, capacity // weight) items: u ≤ Σ of those · s, and
        # no feasible choice is worth more than UB.
        cap = {i: min(classes[i].count, (capacity - classes[i].setup) // classes[i].weight)
               for i in fits}
        U = min(sum(cap[i] * scaled[i] for i in fits), math.floor(ub / K * (1 + 1e-9)) + 1)
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
                    if val > U:
                        break
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
    """Scheduler metrics of one run (simulated or real), all in KV *tokens* and decode steps.

    * ``peak_tokens``: the most resident KV tokens after any decode step;
    * ``decode_steps``: steps with at least one active member;
    * ``utilisation``: slot utilisation, generated tokens / (``decode_steps`` · the most
      members active at once);
    * ``preemptions``: members evicted to keep the next step within ``kv_budget_tokens``;
    * ``recomputed_tokens``: generated tokens whose KV was rebuilt when a preempted member
      resumed (Σ over resumptions of the tokens it had generated);
    * ``mean_tokens``: resident KV tokens averaged over the decode steps;
    * ``kv_utilisation``: ``mean_tokens / kv_budget_tokens`` (without a budget:
      ``mean_tokens / peak_tokens``).
    """

    peak_tokens: int
    decode_steps: int
    utilisation: float
    preemptions: int = 0
    recomputed_tokens: int = 0
    mean_tokens: float = 0.0
    kv_utilisation: float = 0.0


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
    simulated at ``G = 16`` (``rlkern.sampling.simulate``; docs/sampling.md), ``m = 4``
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
        max_new_tokens: the cap on a member's length (its worst case).
        kv_budget_tokens: optional budget on resident KV tokens, never exceeded; ``None`` means
            one unit (group / micro group) at a time. Must be at least the longest prompt + 1.
        micro_group_size: ``m`` for ``micro_group`` and ``length_aware`` (default
            :func:`default_micro_group_size`).
        fptas_eps: ``ε`` of the length-aware admission knapsack (:func:`knapsack_fptas`).
        length_prior: predicted response length before any member has finished (default
            ``max_new_tokens / 2``), in tokens.
    """

    def __init__(self, prompt_lengths: Sequence[int], *, group_size: int, schedule: str,
                 max_new_tokens: int, kv_budget_tokens: int | None = None,
                 micro_group_size: int | None = None, fptas_eps: float = FPTAS_EPS,
                 length_prior: float | None = None):
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
        if not 0.0 < fptas_eps < 1.0:
            raise ValueError(f"fptas_eps must lie in (0, 1), got {fptas_eps}")
        if length_prior is not None and not (math.isfinite(length_prior) and length_prior >= 1):
            raise ValueError(f"length_prior must be a finite number >= 1, got {length_prior}")
        self.prompt_lengths = [int(x) for x in prompt_lengths]
        self.G, self.schedule, self.m = group_size, schedule, m
        self.max_new = int(max_new_tokens)
        self.eps = fptas_eps
        self.prior = float(length_prior) if length_prior is not None else self.max_new / 2
        self.budget = None if kv_budget_tokens is None else int(kv_budget_tokens)
        longest = max(self.prompt_lengths, default=0)
        if self.budget is not None and self.budget < longest + 1:
            raise ValueError(
                f"kv_budget ({self.budget} tokens) is too small for one member: the longest "
                f"prompt ({longest}) + 1 token = {longest + 1} tokens")
        # Concurrent members without a budget (with one, the budget bounds it instead).
        self.slots = group_size if schedule == "full_group" else m
        # Pending members in group-major order (fresh ones and preempted ones alike).
        self.pending = [(p, j) for p in range(len(self.prompt_lengths)) for j in range(self.G)]
        self.state = _State()
        self.progress: dict[tuple[int, int], int] = {}  # preempted member → tokens it had
        self.resume_queue: list[tuple[int, int]] = []  # length_aware: preempted, FIFO
        self.finished: dict[int, list[int]] = {}
        self.group_left = {p: self.G for p in range(len(self.prompt_lengths))}
        self.preemptions = 0
        self.recomputed_tokens = 0
        self._refill = True  # admission is decided only at refill points (see admit)
        self._n_done = 0
        self._sum_len = 0
        self._sum_pl = 0

    # -- accounting ----------------------------------------------------------------------------

    def resident_tokens(self) -> int:
        """KV tokens in memory: resident prefixes + active members' tokens + held tokens."""
        s = self.state
        return (sum(self.prompt_lengths[p] for p in s.resident) + sum(s.active.values())
                + sum(s.held.values()))

    def reserved(self) -> int:
        """The predicted peak: resident tokens + every active member's predicted remainder."""
        return self.resident_tokens() + sum(self.remaining(mem, n)
                                            for mem, n in self.state.active.items())

    def predict(self, p: int) -> float:
        """Predicted response length of a fresh member of prompt ``p``: the mean length of its
        finished siblings; else the mean finished length scaled by ``prompt_len[p] /`` the
        mean prompt length of the finished members; else ``length_prior``."""
        sib = self.finished.get(p)
        if sib:
            return sum(sib) / len(sib)
        if self._n_done:
            mean_len = self._sum_len / self._n_done
            mean_pl = self._sum_pl / self._n_done
            return mean_len * (self.prompt_lengths[p] / mean_pl if mean_pl > 0 else 1.0)
        return self.prior

    def remaining(self, mem: tuple[int, int], n: int) -> int:
        """Predicted tokens still to come for member ``mem`` after its ``n`` tokens (≥ 1):
        ``E[L | L > n] − n`` estimated by the mean of the finished siblings longer than ``n``;
        without one, ``predict(p) − n``; at least 1 (a member that outlived every prediction
        is expected to need one more token at a time) and at most ``max_new_tokens − n``."""
        longer = [x for x in self.finished.get(mem[0], ()) if x > n]
        total = sum(longer) / len(longer) if longer else self.predict(mem[0])
        return max(1, min(math.ceil(total - n), self.max_new - n))

    def steps_until_full(self) -> int:
        """Decode steps the active members can all take before the budget is reached."""
        a = len(self.state.active)
        if self.budget is None or a == 0:
            return 1 << 62
        return max(0, (self.budget - self.resident_tokens()) // a)

    # -- decisions ---------------------------------------------------------------------------

    def _take(self, members: list[tuple[int, int]]) -> None:
        taken = set(members)
        self.pending = [mem for mem in self.pending if mem not in taken]
        self.resume_queue = [mem for mem in self.resume_queue if mem not in taken]
        for mem in members:
            n = self.progress.pop(mem, 0)
            self.recomputed_tokens += n  # a resumed member's KV is rebuilt (recompute)
            self.state.active[mem] = n
            p = mem[0]
            self.state.resident[p] = self.state.resident.get(p, 0) + 1

    def _cost(self, members: list[tuple[int, int]]) -> int:
        """Predicted KV of admitting ``members``: new prefixes + per member its tokens so far
        (recomputed) and its predicted remainder."""
        new_prompts = {p for p, _ in members if p not in self.state.resident}
        return (sum(self.prompt_lengths[p] for p in new_prompts)
                + sum(self.progress.get(mem, 0) + self.remaining(mem, self.progress.get(mem, 0))
                      for mem in members))

    def _fits(self, members: list[tuple[int, int]]) -> bool:
        if self.budget is None:
            return len(self.state.active) + len(members) <= self.slots
        return self.reserved() + self._cost(members) <= self.budget

    def _alone(self) -> list[tuple[int, int]]:
        """Nothing runs and the predictions admitted nobody: the first candidate runs alone if
        its next step fits the budget (so any budget ≥ the longest prompt + 1 makes progress);
        otherwise the budget cannot hold it and the run stops with an error."""
        mem = self.resume_queue[0] if self.resume_queue else self.pending[0]
        n = self.progress.get(mem, 0)
        need = self.prompt_lengths[mem[0]] + n + 1 + sum(self.state.held.values())
        if self.budget is not None and need > self.budget:
            raise ValueError(
                f"kv_budget ({self.budget} tokens) is too small for member {mem} alone: its "
                f"prompt ({self.prompt_lengths[mem[0]]}) + {n} generated tokens + the next one "
                f"= {need} tokens; the longest prompt + max_new_tokens "
                f"({max(self.prompt_lengths) + self.max_new}) always suffices")
        return [mem]

    def admit(self) -> list[tuple[int, int]]:
        """Members to start (or resume) at this step; their next token is produced this step.

        Admission is decided at refill points only — the start, after a member finished or was
        preempted, or when nothing runs — so that it changes only at events (the simulation
        skips the steps between them). Under a budget every candidate is charged its
        predicted KV (:meth:`_cost`) against ``kv_budget_tokens − reserved()``.
        """
        if not self.pending and not self.resume_queue:
            return []
        if self.state.active and not self._refill:
            return []
        self._refill = False
        if self.schedule == "micro_group" and self.state.active:
            return []  # a round ends only when all its members have finished
        if self.schedule == "length_aware":
            out = self._admit_knapsack()
        else:
            out = self._admit_units()
        if not out and not self.state.active:
            out = self._alone()
        if out:
            self._take(out)
        return out

    def _admit_units(self) -> list[tuple[int, int]]:
        """Static schedules: whole units (the pending members of the first pending prompt, up
        to G or m of them) in group-major order while their predicted KV fits."""
        out: list[tuple[int, int]] = []
        unit = self.G if self.schedule == "full_group" else self.m
        pending = list(self.pending)
        while pending:
            p0 = pending[0][0]
            batch = [mem for mem in pending if mem[0] == p0][:unit]
            if self.budget is None:
                if self.state.active or out:
                    break  # one unit at a time
            elif not self._fits(out + batch):
                if not out and not self.state.active:
                    # Nothing runs: as many of the unit as fit (at least one, see _alone).
                    while len(batch) > 1 and not self._fits(batch):
                        batch = batch[:-1]
                    if self._fits(batch):
                        out.extend(batch)
                break
            out.extend(batch)
            taken = set(batch)
            pending = [mem for mem in pending if mem not in taken]
        return out

    def _admit_knapsack(self) -> list[tuple[int, int]]:
        """Length-aware admission: preempted members first (FIFO, each while its predicted KV
        fits; the first that does not fit blocks fresh admissions, so it cannot starve), then
        the (1 − ε)-optimal set of fresh pending members under the free budget (module
        docstring), taken in group-major order within each prompt."""
        out: list[tuple[int, int]] = []
        for mem in self.resume_queue:
            if not self._fits([*out, mem]):
                return out
            out.append(mem)
        if self.budget is None:
            capacity = self.slots - len(self.state.active) - len(out)
        else:
            capacity = self.budget - self.reserved() - (self._cost(out) if out else 0)
        if capacity < 1 or not self.pending:
            return out
        by_prompt: dict[int, list[tuple[int, int]]] = {}
        for mem in self.pending:
            by_prompt.setdefault(mem[0], []).append(mem)
        pred = {p: self.predict(p) for p in by_prompt}
        resident = set(self.state.resident) | {p for p, _ in out}
        # SJF order of the classes: the DP's ties then favour shorter, then earlier prompts.
        prompts = sorted(by_prompt, key=lambda p: (pred[p], p))
        classes = [KnapsackClass(
            count=len(by_prompt[p]),
            weight=1 if self.budget is None else self.remaining(by_prompt[p][0], 0),
            value=1.0 / max(pred[p], 1.0),
            setup=(self.prompt_lengths[p]
                   if self.budget is not None and p not in resident else 0))
            for p in prompts]
        counts = knapsack_fptas(classes, capacity, self.eps)
        fresh = [mem for p, k in zip(prompts, counts, strict=True) for mem in by_prompt[p][:k]]
        return out + sorted(fresh)

    def make_room(self) -> list[tuple[int, int]]:
        """Preempt until the next decode step fits the budget (every active member grows by one
        token): evict the active member with the longest predicted remainder (ties: the later
        one in group-major order), free its KV and queue it again with the tokens it has; it
        resumes by recomputing its KV. Returns the preempted members."""
        out: list[tuple[int, int]] = []
        s = self.state
        if self.budget is None:
            return out
        while s.active and self.resident_tokens() + len(s.active) > self.budget:
            mem = max(s.active, key=lambda q: (self.remaining(q, s.active[q]), q))
            self.progress[mem] = s.active[mem]
            self._release(mem)
            self.preemptions += 1
            if self.schedule == "length_aware":
                self.resume_queue.append(mem)
            else:
                bisect.insort(self.pending, mem)  # back to its place in group-major order
            out.append(mem)
        if out:
            self._refill = True
        return out

    def step(self, k: int = 1) -> None:
        """``k`` tokens for every active member."""
        for mem in self.state.active:
            self.state.active[mem] += k

    def _release(self, mem: tuple[int, int]) -> int:
        """Remove ``mem`` from the active set; drop its prefix (and, for ``full_group``, the
        group's held KV) when no member of its group runs; end a ``micro_group`` round."""
        s = self.state
        length = s.active.pop(mem)
        p = mem[0]
        s.resident[p] -= 1
        if s.resident[p] == 0:
            # Prefix dropped when no member of the group runs; a later unit re-prefills it.
            del s.resident[p]
            if self.schedule == "full_group":
                for q in [q for q in s.held if q[0] == p]:
                    del s.held[q]
        if self.schedule == "micro_group" and not s.active:
            s.held.clear()
        return length

    def finish(self, mem: tuple[int, int]) -> bool:
        """Member ``mem`` produced its last token; returns True when its group is complete.

        ``length_aware`` (continuous batching) frees the member's KV at once. The static
        schedules hold it, as a padded static batch does, until their unit ends: the group
        (``full_group``) or the round (``micro_group``).
        """
        s = self.state
        p = mem[0]
        if self.schedule != "length_aware":
            s.held[mem] = s.active[mem]  # _release drops it when the unit ends
        length = self._release(mem)
        self.finished.setdefault(p, []).append(length)
        self._n_done += 1
        self._sum_len += length
        self._sum_pl += self.prompt_lengths[p]
        self.group_left[p] -= 1
        self._refill = True
        return self.group_left[p] == 0

    @property
    def active(self) -> list[tuple[int, int]]:
        return list(self.state.active)

    def done(self) -> bool:
        return not self.pending and not self.resume_queue and not self.state.active


def drive(sched: Scheduler, *, on_admit: Callable[[list[tuple[int, int]]], None],
          on_step: Callable[..., list[tuple[int, int]]],
          on_group_done: Callable[[int], None] | None = None,
          horizon: Callable[[list[tuple[int, int]]], int] | None = None,
          on_preempt: Callable[[list[tuple[int, int]]], None] | None = None,
          observe: Callable[[int, int], None] | None = None) -> SimResult:
    """The decode loop shared by simulation and generation.

    Each step: ``sched.make_room()`` → ``on_preempt(evicted)`` (free their KV);
    ``sched.admit()`` → ``on_admit(new)`` (prefill, or rebuild a resumed member's KV); every
    active member produces one token (``on_step(active)`` returns those that finished with it);
    finished members leave and their groups may complete (``on_group_done(p)``);
    ``observe(steps so far, resident KV tokens)``. ``horizon(active)`` (simulation only) may
    return k > 1 steps during which no member finishes; they are taken at once
    (``on_step(active, k)``), capped where the budget would be reached, so every decision is
    the same as step by step. The budget is checked after every step (its resident KV only
    grows between events, so the end of k steps is their maximum).
    """
    peak = steps = generated = conc = 0
    kv_sum = 0  # Σ over decode steps of the resident KV tokens
    while not sched.done():
        evicted = sched.make_room()
        if evicted and on_preempt is not None:
            on_preempt(evicted)
        new = sched.admit()
        if new:
            on_admit(new)
        active = sched.active
        if not active:
            raise RuntimeError("scheduler admitted nothing although members are pending")
        k = 1
        if horizon is not None:
            k = max(1, min(horizon(active), sched.steps_until_full()))
        before = sched.resident_tokens()
        sched.step(k)
        a = len(active)
        steps += k
        generated += k * a
        conc = max(conc, a)
        kv_sum += k * before + a * k * (k + 1) // 2  # before + a·i for i = 1 … k
        kv = sched.resident_tokens()
        if sched.budget is not None and kv > sched.budget:
            raise RuntimeError(f"scheduler exceeded its KV budget: {kv} > {sched.budget}")
        peak = max(peak, kv)
        if observe is not None:
            observe(steps, kv)
        for mem in (on_step(active, k) if horizon is not None else on_step(active)):
            if sched.finish(mem) and on_group_done is not None:
                on_group_done(mem[0])
    mean = kv_sum / steps if steps else 0.0
    denom = sched.budget if sched.budget is not None else peak
    return SimResult(peak_tokens=peak, decode_steps=steps,
                     utilisation=generated / (steps * conc) if steps else 0.0,
                     preemptions=sched.preemptions, recomputed_tokens=sched.recomputed_tokens,
                     mean_tokens=mean, kv_utilisation=mean / denom if denom else 0.0)
