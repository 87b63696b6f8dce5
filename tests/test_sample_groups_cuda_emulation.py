"""The CUDA sampler with num_samples = G (csrc/cuda/sample.cu, ``rlkern_sample_n_cuda``: one
filtering pass per row, G draws), executed on the CPU by the CUDA emulator of tests/cuda_emu.

Asserted: output rows i·G … i·G + G − 1 hold row i's draws; draw 0 is the num_samples = 1
token (``rlkern_sample_cuda``) bit for bit; the tokens equal the CPU kernel's and the float64
reference's for the same seeds (draw j: Philox index j); replay, batch invariance and shared
rows (indices); the filtered distribution (χ²); rows that cannot be sampled flag all G outputs;
the same bits under every legal thread schedule; the launcher's argument checks. Emulated sizes
are small (a filtered row costs ~100 block barriers of 256 fibers).
"""

from __future__ import annotations

import pytest
import torch

from cuda_emu import EmulatedLibrary
from cuda_emu.testing import ERR_INVALID_ARGUMENT as ERR_INVALID
from rlkern.reference.sample import filtered_probs
from test_sample_cuda_emulation import OUTPUTS as NAMES
from test_sample_cuda_emulation import (
    LauncherCall,
    _seeds,
    assert_draws_follow,
    check_against_cpu,
    emu_sample,
    same_under_every_schedule,
    sample_library,
)


@pytest.fixture(scope="module")
def emu() -> EmulatedLibrary:
    return sample_library()


OPTIONS = [dict(), dict(top_p=0.8, temperature=0.7), dict(top_k=5, min_p=0.05),
           dict(top_k=6, top_p=0.7, filter_order="joint"),
           dict(top_k=20, temperature=0.6, raw_temperature=False)]


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_cpu_kernel_reference_and_single_draw(emu, opts, dtype):
    gen = torch.Generator().manual_seed(len(str(opts)))
    n, V, G = 4, 301, 5
    x = (torch.randn(n, V, generator=gen) * 2.5).to(dtype)
    seeds, steps = _seeds(n, gen)
    got = emu_sample(emu, x, seeds=seeds, steps=steps, num_samples=G, **opts)
    one = emu_sample(emu, x, seeds=seeds, steps=steps, **opts)
    for name in NAMES:  # draw 0 is the num_samples = 1 result, bit for bit
        assert torch.equal(got[name].view(n, G)[:, 0], one[name]), name
    for name in ("entropy", "lse"):  # the row's, repeated for each draw
        assert torch.equal(got[name].view(n, G), one[name][:, None].expand(n, G)), name
    # tokens equal to the CPU kernel's and the reference's; values (lse too) within fp32
    check_against_cpu(got, x, seeds, steps, num_samples=G, **opts)
    assert len(set(got["tokens"].tolist())) > n  # the draws of a row differ


def test_replay_batch_invariance_and_shared_rows(emu):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(5, 257, generator=gen) * 3
    seeds, steps = _seeds(5, gen)
    kw = dict(num_samples=3, top_k=40, top_p=0.9, temperature=0.9)
    full = emu_sample(emu, x, seeds=seeds, steps=steps, **kw)
    again = emu_sample(emu, x, seeds=seeds, steps=steps, **kw)
    alone = emu_sample(emu, x[3:4].contiguous(), seeds=seeds[3:4], steps=steps[3:4], **kw)
    idx = torch.tensor([3, 1, 3])
    shared = emu_sample(emu, x, seeds=seeds[idx], steps=steps[idx], indices=idx, **kw)
    for name, out in full.items():
        assert torch.equal(out, again[name]), name
        assert torch.equal(out.view(5, 3)[3], alone[name]), name
        assert torch.equal(shared[name].view(3, 3), out.view(5, 3)[idx]), name
    same_under_every_schedule(emu, full, lambda: emu_sample(emu, x, seeds=seeds, steps=steps,
                                                            **kw))


def test_chi2_and_filtered_never_drawn(emu):
    # One row, G = 600 draws from one filtering pass.
    gen = torch.Generator().manual_seed(0)
    V, G = 13, 600
    row = torch.randn(1, V, generator=gen) * 1.5
    opts = dict(top_k=6, top_p=0.8)
    got = emu_sample(emu, row, seeds=torch.tensor([12345]), steps=torch.tensor([2]),
                     num_samples=G, **opts)
    assert_draws_follow(got["tokens"], filtered_probs(row[0].double(), **opts), G)


def test_rows_that_cannot_be_sampled_flag_every_draw(emu):
    x = torch.randn(3, 40)
    x[0, 5] = float("nan")
    x[1] = float("-inf")
    got = emu_sample(emu, x, seeds=torch.arange(3), steps=torch.zeros(3, dtype=torch.long),
                     num_samples=4, top_p=0.9)
    tok = got["tokens"].view(3, 4)
    assert (tok[:2] == -1).all() and ((tok[2] >= 0) & (tok[2] < 40)).all()
    lse = got["lse"].view(3, 4)
    assert torch.isnan(lse[0]).all() and torch.isneginf(lse[1]).all()
    assert torch.isnan(got["processed_logprobs"].view(3, 4)[:2]).all()


def test_launcher_rejects_bad_arguments(emu):
    f = emu.lib.rlkern_sample_n_cuda
    args = LauncherCall().args
    assert f(*args(G=3)) == 0
    assert f(*args(G=0)) == ERR_INVALID
    assert f(*args(G=-2)) == ERR_INVALID
    assert f(*args(G=2**62)) == ERR_INVALID  # n·G overflows
    assert f(*args(G=3, n=3)) == ERR_INVALID  # more source rows than logits rows, no indices
