"""Replay true response lengths through a micro-group scheduler (no model)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from rlkern.sampling.scheduler import Scheduler, SimResult, drive


def simulate(
    lengths: Tensor,
    prompt_lengths: Tensor | Sequence[int],
    *,
    schedule: str,
    group_size: int,
    kv_budget_tokens: int | None = None,
    micro_group_size: int | None = None,
    max_new_tokens: int | None = None,
    length_prior: float | None = None,
    fast_forward: bool = True,
    observe: Callable[[int, int], None] | None = None,
) -> SimResult:
    """Run the scheduler of :func:`rlkern.generate_groups` on known response lengths.

    Args:
        lengths: ``(P, G)`` int response lengths (tokens generated per member, ≥ 1), revealed
            to the scheduler only when a member finishes — as in a real run.
        prompt_lengths: ``(P,)`` prompt lengths.
        schedule: ``"full_group"``, ``"micro_group"`` or ``"length_aware"``.
        group_size: ``G`` (must equal ``lengths.shape[1]``).
        kv_budget_tokens: the KV budget in tokens (``None``: one unit at a time); admission
            by predicted length, preemption with recompute when the next step would exceed
            it (:mod:`rlkern.sampling.scheduler`).
        micro_group_size: ``m`` (default ``max(1, G // 8)``, see
            :func:`rlkern.sampling.scheduler.default_micro_group_size`).
        max_new_tokens: the cap on a member's length (default ``lengths.max()``); lengths
            above it are cut to it.
        length_prior: predicted length before any member has finished (default
            ``max_new_tokens / 2``).
        fast_forward: take the steps between events (a finish, the budget reached) at once —
            the same decisions and metrics as step by step, much faster; ``False`` runs one
            decode step at a time, as :func:`rlkern.generate_groups` does.
        observe: called as ``observe(decode steps so far, resident KV tokens)`` after every
            decode step (after every fast-forwarded stretch: resident KV only grows within
            one, so its end is the stretch's maximum).

    Returns:
        :class:`SimResult`: peak KV tokens, decode steps, utilisation, preemptions, recomputed
        tokens, mean KV tokens and KV utilisation — what :func:`rlkern.generate_groups`
        reports for a run whose members have these lengths.
    """
    lengths = torch.as_tensor(lengths)
    if lengths.dim() != 2 or lengths.shape[1] != group_size:
        raise ValueError(f"lengths must have shape (P, group_size={group_size}), got "
                         f"{tuple(lengths.shape)}")
    if lengths.is_floating_point():
        raise TypeError(f"lengths must be an integer tensor, got {lengths.dtype}")
    pl = [int(x) for x in torch.as_tensor(prompt_lengths).reshape(-1).tolist()]
    if len(pl) != lengths.shape[0]:
        raise ValueError(f"prompt_lengths must have {lengths.shape[0]} entries, got {len(pl)}")
    if lengths.numel() and int(lengths.min()) < 1:
        raise ValueError("lengths must be >= 1")
    L = lengths.tolist()
    max_new = int(max_new_tokens) if max_new_tokens is not None else max(
        (max(r) for r in L), default=1)
    sched = Scheduler(pl, group_size=group_size, schedule=schedule, max_new_tokens=max_new,
                      kv_budget_tokens=kv_budget_tokens, micro_group_size=micro_group_size,
                      length_prior=length_prior)
    made: dict[tuple[int, int], int] = {}

    def on_admit(new):
        for mem in new:
            made.setdefault(mem, 0)  # a resumed (preempted) member keeps its tokens

    target = lambda mem: min(L[mem[0]][mem[1]], max_new)

    def on_step(active, k=1):
        done = []
        for mem in active:
            made[mem] += k
            if made[mem] >= target(mem):
                done.append(mem)
        return done

    def horizon(active):
        return min(target(mem) - made[mem] for mem in active)

    return drive(sched, on_admit=on_admit, on_step=on_step, observe=observe,
                 horizon=horizon if fast_forward else None)
