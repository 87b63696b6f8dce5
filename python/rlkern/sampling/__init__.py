"""Micro-group generation (ALGORITHMS.md §5): schedulers, simulation and generation."""

from rlkern.sampling.generate import GroupRollouts, generate_groups, kv_bytes_per_token
from rlkern.sampling.scheduler import SCHEDULES, Scheduler, SimResult
from rlkern.sampling.simulate import simulate

__all__ = [
    "SCHEDULES",
    "GroupRollouts",
    "Scheduler",
    "SimResult",
    "generate_groups",
    "kv_bytes_per_token",
    "simulate",
]
