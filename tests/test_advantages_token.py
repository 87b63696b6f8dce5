"""The §2.1 helpers (discounted returns, IGPO position baseline, GTPO weights, GiGPO, EMPG) on
the compiled CPU backend and the torch reference, against float64 truth; bad input."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import rlkern
from advantages_cases import OUT_TOL, make_layout
from rlkern.reference.token_advantages import (
    discounted_returns_reference,
    empg_modulate_reference,
    gigpo_advantages_reference,
    gtpo_weights_reference,
    position_baseline_reference,
)

BACKENDS = ["cpu", "torch"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _close(actual, expected, dtype, what=""):
    rtol, atol = OUT_TOL[torch.float64 if dtype == torch.float64 else torch.float32]
    assert actual.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (16, 300)])
@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
def test_discounted_returns(backend, dtype, shape, gamma):
    gen = torch.Generator().manual_seed(shape[1])
    rewards = torch.randn(shape, generator=gen).to(dtype)
    reset = torch.rand(shape, generator=gen) < 0.1
    for r in (None, reset):
        out = rlkern.discounted_returns(rewards, gamma=gamma, reset=r, backend=backend)
        ref = discounted_returns_reference(rewards.double(), gamma=gamma, reset=r)
        _close(out, ref, dtype, "returns")


def test_discounted_returns_reset_semantics():
    r = torch.tensor([[0.0, 0.0, 1.0, 0.0, 2.0]])
    out = rlkern.discounted_returns(r, gamma=0.5, reset=torch.tensor([[0, 0, 1, 0, 0]]))
    torch.testing.assert_close(out, torch.tensor([[0.25, 0.5, 1.0, 1.0, 2.0]]))


def _token_layouts(gen, t):
    for kind in ("contiguous", "uneven"):
        layout = make_layout(kind, gen, n_groups=6)
        n = layout.pop("n")
        yield kind, layout, n


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [1, 7, 130])
def test_position_baseline(backend, dtype, t):
    gen = torch.Generator().manual_seed(t)
    for kind, layout, n in _token_layouts(gen, t):
        returns = (torch.randn(n, t, generator=gen) * 2).to(dtype)
        mask = torch.rand(n, t, generator=gen) > 0.25
        out = rlkern.position_baseline(returns, mask, backend=backend, **layout)
        ref = position_baseline_reference(returns.double(), mask, **layout)
        _close(out, ref, dtype, kind)
        assert torch.all(out[~mask] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [1, 9, 64])
def test_gtpo_weights(backend, dtype, t):
    gen = torch.Generator().manual_seed(t + 1)
    for kind, layout, n in _token_layouts(gen, t):
        entropy = (torch.rand(n, t, generator=gen) * 3).to(dtype)
        entropy[0, 0] = 0.0  # a zero entropy: the inverse weight uses max(H, eps)
        mask = torch.rand(n, t, generator=gen) > 0.25
        out = rlkern.gtpo_weights(entropy, mask, backend=backend, **layout)
        ref_w, ref_inv = gtpo_weights_reference(entropy.double(), mask, **layout)
        _close(out.weight, ref_w, dtype, f"{kind} weight")
        # 1/max(H, eps) is 1e6 at H = 0: relative accuracy is what counts there.
        torch.testing.assert_close(out.inverse_weight.double(), ref_inv, rtol=2e-5, atol=1e-6)


def test_gtpo_weights_sum_to_one_per_position():
    entropy = torch.rand(8, 5) + 0.1
    out = rlkern.gtpo_weights(entropy, torch.ones(8, 5, dtype=torch.bool), group_size=4)
    sums = out.weight.view(2, 4, 5).sum(1)
    torch.testing.assert_close(sums, torch.ones(2, 5))
    torch.testing.assert_close(out.inverse_weight.view(2, 4, 5).sum(1), torch.ones(2, 5))


def _gigpo_inputs(gen, n_prompts=5, steps=40, dtype=torch.float32):
    group = torch.randint(0, n_prompts, (steps,), generator=gen) * 10007 - 5
    episode = torch.randint(0, 2, (steps,), generator=gen).to(dtype)
    step = torch.randn(steps, generator=gen).to(dtype)
    keys = torch.randint(0, 4, (steps,), generator=gen) * (2**40) + 1
    return episode, step, keys, group


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["mean_norm", "std_norm"])
@pytest.mark.parametrize("step_mode", ["mean_norm", "std_norm"])
def test_gigpo(backend, dtype, mode, step_mode):
    gen = torch.Generator().manual_seed(11)
    episode, step, keys, group = _gigpo_inputs(gen, dtype=dtype)
    out = rlkern.gigpo_advantages(episode, step, keys, group_ids=group, omega=0.7, mode=mode,
                                  step_mode=step_mode, backend=backend)
    ref = gigpo_advantages_reference(episode.double(), step.double(), keys, group_ids=group,
                                     omega=0.7, mode=mode, step_mode=step_mode)
    for field in ("advantages", "episode_advantages", "step_advantages"):
        _close(getattr(out, field), ref[field], dtype, field)


def test_gigpo_tables_reused_across_calls():
    """GiGPO's two numberings (prompt ids, and (prompt id, state key) pairs) keep their tables
    across calls and empty them lazily: calls whose step and group counts rise and fall (the
    tables grow past their first estimate, then shrink), drawing prompt ids and state keys from
    the same small ranges (each call meets ids and pairs earlier calls numbered, in another
    order), each match the float64 reference."""
    gen = torch.Generator().manual_seed(3)
    for n_prompts, steps in [(50, 400), (50, 400), (3000, 20_000), (2, 9), (3000, 20_000),
                             (40_000, 50_000), (7, 300), (3000, 70_000), (50, 400),
                             (5000, 70_000)]:
        episode, step, keys, group = _gigpo_inputs(gen, n_prompts=n_prompts, steps=steps)
        keys = keys + torch.randint(0, 64, (steps,), generator=gen)  # recurring state keys
        out = rlkern.gigpo_advantages(episode, step, keys, group_ids=group, omega=0.7,
                                      mode="std_norm", backend="cpu")
        ref = gigpo_advantages_reference(episode.double(), step.double(), keys, group_ids=group,
                                         omega=0.7, mode="std_norm")
        for field in ("advantages", "episode_advantages", "step_advantages"):
            _close(getattr(out, field), ref[field], torch.float32, f"{steps} steps: {field}")


def test_gigpo_split_groupings_match_one_thread():
    """From 2^16 steps (two threads' shares) each grouping is split over the threads by key
    hash, one grouping after the other; with one thread the two run side by side. Same bits."""
    gen = torch.Generator().manual_seed(5)
    threads = torch.get_num_threads()
    for n_prompts, steps in [(1024, 65_536), (9000, 140_000)]:
        episode, step, keys, group = _gigpo_inputs(gen, n_prompts=n_prompts, steps=steps)
        keys = keys + torch.randint(0, 16, (steps,), generator=gen)
        call = functools.partial(rlkern.gigpo_advantages, episode, step, keys, group_ids=group,
                                 omega=0.7, mode="std_norm", backend="cpu")
        try:
            torch.set_num_threads(2)
            split = call()
            torch.set_num_threads(1)
            one = call()
        finally:
            torch.set_num_threads(threads)
        ref = gigpo_advantages_reference(episode.double(), step.double(), keys, group_ids=group,
                                         omega=0.7, mode="std_norm")
        for field in ("advantages", "episode_advantages", "step_advantages"):
            assert torch.equal(getattr(split, field), getattr(one, field)), field
            _close(getattr(split, field), ref[field], torch.float32, f"{steps}: {field}")


def test_gigpo_step_groups_are_per_prompt():
    # The same state key in two different prompt groups forms two step groups.
    episode = torch.tensor([1.0, 0.0, 1.0, 0.0])
    step = torch.tensor([1.0, 0.0, 5.0, 3.0])
    keys = torch.tensor([7, 7, 7, 7])
    group = torch.tensor([0, 0, 1, 1])
    out = rlkern.gigpo_advantages(episode, step, keys, group_ids=group, omega=1.0,
                                  mode="mean_norm", step_mode="mean_norm")
    torch.testing.assert_close(out.step_advantages, torch.tensor([0.5, -0.5, 1.0, -1.0]))
    single = rlkern.gigpo_advantages(episode[:3], step[:3], torch.tensor([1, 2, 3]),
                                     group_ids=group[:3], omega=1.0, mode="std_norm")
    assert torch.all(single.step_advantages == 0)  # singleton step groups: no signal


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 37, 5000])
def test_empg(backend, dtype, n):
    gen = torch.Generator().manual_seed(n)
    adv = torch.randn(n, generator=gen).to(dtype)
    h = (torch.rand(n, generator=gen) * 4).to(dtype)
    hn = torch.roll(h, -1).clone()
    hn[::5] = math.nan  # last steps of trajectories
    for k, k_f, zeta in ((1.0, 1.0, 0.1), (2.0, 0.5, 0.3)):
        out = rlkern.empg_modulate(adv, h, hn, k=k, k_f=k_f, zeta=zeta, backend=backend)
        ref = empg_modulate_reference(adv.double(), h.double(), hn.double(), k=k, k_f=k_f,
                                      zeta=zeta)
        _close(out, ref, dtype, "empg")


def test_empg_constant_entropy():
    out = rlkern.empg_modulate(torch.tensor([1.0, -2.0]), torch.ones(2), torch.ones(2), zeta=0.0)
    torch.testing.assert_close(out, torch.tensor([1.0, -2.0]))  # Ĥ = 0: g = 1


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: rlkern.discounted_returns(torch.rand(3), gamma=0.9), ValueError, "shape"),
        (lambda: rlkern.discounted_returns(torch.rand(2, 3), gamma=math.nan), ValueError, "gamma"),
        (lambda: rlkern.discounted_returns(torch.rand(2, 3), gamma=0.9,
                                           reset=torch.ones(3, 2)), ValueError, "reset"),
        (lambda: rlkern.discounted_returns(torch.ones(2, 3, dtype=torch.long), gamma=0.9),
         TypeError, "rewards"),
        (lambda: rlkern.position_baseline(torch.rand(4, 3), torch.ones(4, 3)), ValueError,
         "group"),
        (lambda: rlkern.position_baseline(torch.rand(4, 3), torch.ones(4, 2), group_size=2),
         ValueError, "mask"),
        (lambda: rlkern.position_baseline(torch.rand(4, 3), torch.ones(4, 3), group_size=3),
         ValueError, "divisor"),
        (lambda: rlkern.gtpo_weights(torch.rand(4, 3), torch.ones(4, 3), group_size=2, eps=0.0),
         ValueError, "eps"),
        (lambda: rlkern.gigpo_advantages(torch.rand(4), torch.rand(4), torch.arange(4),
                                         group_ids=torch.zeros(4), omega=1.0, mode="std_norm"),
         TypeError, "int64"),
        (lambda: rlkern.gigpo_advantages(torch.rand(4), torch.rand(3), torch.arange(4),
                                         group_ids=torch.zeros(4, dtype=torch.long), omega=1.0,
                                         mode="std_norm"), ValueError, "step_returns"),
        (lambda: rlkern.gigpo_advantages(torch.rand(4), torch.rand(4), torch.arange(4),
                                         group_ids=torch.zeros(4, dtype=torch.long), omega=1.0,
                                         mode="zscore"), ValueError, "mode"),
        (lambda: rlkern.gigpo_advantages(torch.tensor([1.0, math.nan]), torch.rand(2),
                                         torch.arange(2),
                                         group_ids=torch.zeros(2, dtype=torch.long), omega=1.0,
                                         mode="std_norm"), ValueError, "step 1"),
        (lambda: rlkern.empg_modulate(torch.rand(3), torch.tensor([0.0, math.nan, 1.0]),
                                      torch.rand(3)), ValueError, "step_entropy"),
        (lambda: rlkern.empg_modulate(torch.rand(3), torch.rand(2), torch.rand(3)), ValueError,
         "step_entropy"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("which", ["episode", "step"])
@pytest.mark.parametrize("bad", [[0], [17, 400], [999], [35, 3]])
def test_gigpo_names_first_non_finite_step(dtype, which, bad):
    """The error names the first non-finite step of either return, wherever it sits: in a
    16-float vector of the AVX-512 scan, in the scalar tail, or on the float64 path."""
    n = 1000
    episode, step = torch.rand(n, dtype=dtype), torch.rand(n, dtype=dtype)
    target = episode if which == "episode" else step
    for i, v in zip(bad, [math.nan, math.inf, -math.inf], strict=False):
        target[i] = v
    with pytest.raises(ValueError, match=rf"step {min(bad)} is NaN or infinite"):
        rlkern.gigpo_advantages(episode, step, torch.arange(n), omega=1.0, mode="std_norm",
                                group_ids=torch.zeros(n, dtype=torch.long), backend="cpu")
