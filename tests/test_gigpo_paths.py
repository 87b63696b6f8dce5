"""GiGPO's two CPU paths give one result.

float32 returns take csrc/cpu/token_advantages.cpp's chunked path (numbering, then float shifted
sums per L2-sized chunk of groups, then a vectorised row pass); float64 returns take the path
that accumulates double shifted sums while numbering. Both sum the same values in the same row
order and apply the same formulas in double, so the float32 call must equal the float64 call on
the same values rounded to float32, bit for bit, for all three outputs. Sizes straddle the
thread split (2^15 steps a thread) and the vector loop's tails; groups range from singletons
(no signal: 0) to zero-variance groups under ``eps=0`` (0 as well).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rlkern
from conftest import bits
from rlkern.reference.token_advantages import gigpo_advantages_reference

FIELDS = ("advantages", "episode_advantages", "step_advantages")


def _inputs(seed: int, steps: int, prompts: int, states: int, binary: bool):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(-(2**62), 2**62, (prompts,), generator=gen)
    group = ids[torch.randint(0, prompts, (steps,), generator=gen)]
    keys = torch.randint(0, states, (steps,), generator=gen) * 0x9E3779B97F4A7C15 % 2**62
    if binary:  # outcome rewards: many zero-variance groups
        episode = torch.randint(0, 2, (steps,), generator=gen).float()
        step = episode * 0.9 ** torch.randint(0, 4, (steps,), generator=gen).float()
    else:
        episode = torch.randn(steps, generator=gen) * 3
        step = torch.randn(steps, generator=gen)
    return episode, step, keys, group


def _assert_paths_agree(episode, step, keys, group, **kw):
    f32 = rlkern.gigpo_advantages(episode, step, keys, group_ids=group, backend="cpu", **kw)
    f64 = rlkern.gigpo_advantages(episode.double(), step.double(), keys, group_ids=group,
                                  backend="cpu", **kw)
    for field in FIELDS:
        a, b = getattr(f32, field), getattr(f64, field).float()
        assert a.dtype == torch.float32
        same = bits(a) == bits(b)  # bitwise: +0 and −0 differ
        assert bool(same.all()), (
            f"{field}: {int((~same).sum())} of {a.numel()} steps differ, first at "
            f"{int((~same).nonzero()[0])}: {float(a[~same][0])!r} vs {float(b[~same][0])!r}")
    return f32


@settings(max_examples=40, deadline=None)
@given(
    steps=st.sampled_from([1, 2, 7, 8, 9, 63, 1000, 32_767, 32_768, 65_535, 65_536, 65_545]),
    per_prompt=st.integers(1, 128),
    states=st.integers(1, 32),
    binary=st.booleans(),
    mode=st.sampled_from(["mean_norm", "std_norm"]),
    step_mode=st.sampled_from(["mean_norm", "std_norm"]),
    eps=st.sampled_from([0.0, 1e-6, 0.5]),
    omega=st.sampled_from([0.0, 0.7, 1.0, -2.5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_float32_path_equals_float64_path_rounded(steps, per_prompt, states, binary, mode,
                                                  step_mode, eps, omega, seed):
    episode, step, keys, group = _inputs(seed, steps, max(1, steps // per_prompt), states, binary)
    _assert_paths_agree(episode, step, keys, group, omega=omega, mode=mode,
                        step_mode=step_mode, eps=eps)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("steps", [40_001, 140_000])
def test_paths_agree_at_every_thread_count(threads, steps):
    """One thread (the two groupings side by side) and two (each split by key hash)."""
    episode, step, keys, group = _inputs(steps, steps, steps // 64, 16, binary=True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out = _assert_paths_agree(episode, step, keys, group, omega=1.0, mode="std_norm")
    finally:
        torch.set_num_threads(before)
    ref = gigpo_advantages_reference(episode.double(), step.double(), keys, group_ids=group,
                                     omega=1.0, mode="std_norm")
    for field in FIELDS:
        torch.testing.assert_close(getattr(out, field).double(), ref[field], rtol=1e-5,
                                   atol=1e-5)


def test_singletons_and_zero_variance_give_positive_zero():
    """Steps alone in their step group, and steps of a zero-variance group under eps=0, get
    +0.0 at that level (not −0.0 from a division by an infinite or a masked spread)."""
    steps = 4096
    group = torch.arange(steps) // 64  # prompt groups of 64 steps
    keys = torch.arange(steps)  # every step its own state: all step groups singletons
    episode = torch.ones(steps)  # every prompt group zero-variance
    step = torch.randn(steps, generator=torch.Generator().manual_seed(0))
    out = _assert_paths_agree(episode, step, keys, group, omega=1.0, mode="std_norm", eps=0.0)
    zero_bits = torch.zeros(steps, dtype=torch.int32)
    for field in FIELDS:
        assert torch.equal(bits(getattr(out, field)), zero_bits), field


@pytest.mark.parametrize("steps", [9_000, 70_000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_prompt_ids_equal_hashed_ones(steps, dtype):
    """On float32 returns, prompt ids that are nearly dense (indices, or uids already numbered)
    are read as id − min instead of hashed; relabelling the same groups with arbitrary 63-bit
    ids must not change a bit. Float64 returns hash both labellings: for them this checks that
    the relabelling alone changes nothing. Sizes on both sides of the thread split."""
    gen = torch.Generator().manual_seed(steps)
    prompts = steps // 48
    index = torch.randint(0, prompts, (steps,), generator=gen)
    dense = index * 3 // 2 - 7  # gaps and negative values: still nearly dense
    hashed = torch.randint(-(2**62), 2**62, (prompts,), generator=gen)[index]
    keys = torch.randint(0, 12, (steps,), generator=gen)
    episode = torch.randint(0, 2, (steps,), generator=gen).to(dtype)
    step = torch.randn(steps, generator=gen).to(dtype)
    call = lambda ids: rlkern.gigpo_advantages(episode, step, keys, group_ids=ids, omega=0.7,
                                               mode="std_norm", backend="cpu")
    a, b = call(dense), call(hashed)
    for field in FIELDS:
        x, y = getattr(a, field), getattr(b, field)
        assert torch.equal(bits(x), bits(y)), field
