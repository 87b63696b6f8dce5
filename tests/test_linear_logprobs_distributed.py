"""Vocabulary-parallel linear_logprobs: 2 CPU processes (gloo) against the single-process op."""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import rlkern

WORLD = 2


def _data(dtype):
    gen = torch.Generator().manual_seed(1234)
    h = torch.randn(13, 32, generator=gen, dtype=torch.float64).to(dtype)
    w = (torch.randn(200, 32, generator=gen, dtype=torch.float64) * 0.5).to(dtype)
    b = torch.randn(200, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 200, (13,), generator=gen)
    y[4] = -100
    y[5] = 0  # first id of rank 0's shard
    y[6] = 199  # last id of rank 1's shard
    return h, w, b, y


# Rank 0's first id, each rank's shard: equal halves, and FSDP2's uneven dim-0 chunks of a
# vocabulary the world size does not divide (torch.chunk(w, 2) of 199 rows: 100 + 99).
_EQUAL = (slice(0, 100), slice(100, 200))
_UNEQUAL = (slice(0, 100), slice(100, 199))
_UNEQUAL_FIRST_SMALL = (slice(0, 37), slice(37, 200))


def _check_case(rank: int, dtype: torch.dtype, fused: bool, shards=_EQUAL,
                softcap: float | None = None) -> None:
    h, w, b, y = _data(dtype)
    vocab = shards[-1].stop
    w, b, y = w[:vocab], b[:vocab], y.clamp(max=vocab - 1)
    shard = shards[rank]
    group = dist.group.WORLD
    g_lp, g_ent = torch.randn(13, generator=torch.Generator().manual_seed(7)), torch.ones(13)
    if fused:
        res = rlkern.linear_logprobs_with_grad(
            h, w[shard], y, bias=b[shard], grad_logprobs=g_lp, grad_entropy=g_ent,
            return_entropy=True, process_group=group, softcap=softcap)
        out, gh, gw, gb = res.outputs, res.grad_hidden, res.grad_weight, res.grad_bias
    else:
        hh = h.clone().requires_grad_()
        ww = w[shard].clone().requires_grad_()
        bb = b[shard].clone().requires_grad_()
        out = rlkern.linear_logprobs(hh, ww, y, bias=bb, return_entropy=True,
                                     process_group=group, chunk_size=5, softcap=softcap)
        ((out.logprobs * g_lp).sum() + (out.entropy * g_ent).sum()).backward()
        gh, gw, gb = hh.grad, ww.grad, bb.grad

    hh, ww, bb = (t.clone().requires_grad_() for t in (h, w, b))
    ref = rlkern.linear_logprobs(hh, ww, y, bias=bb, return_entropy=True, softcap=softcap)
    ((ref.logprobs * g_lp).sum() + (ref.entropy * g_ent).sum()).backward()
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10,
                                                                     "atol": 1e-10}
    torch.testing.assert_close(out.logprobs.detach(), ref.logprobs.detach(), **tol)
    torch.testing.assert_close(out.entropy.detach(), ref.entropy.detach(), **tol)
    torch.testing.assert_close(out.lse.detach(), ref.lse.detach(), **tol)
    torch.testing.assert_close(gh, hh.grad, **tol)
    torch.testing.assert_close(gw, ww.grad[shard], **tol)
    torch.testing.assert_close(gb, bb.grad[shard], **tol)


def _check_ranks_disagree(rank: int) -> None:
    """Hidden states or labels that differ across ranks are refused with checks on (and the
    op runs without the check when checks are off)."""
    h, w, _, y = _data(torch.float32)
    local = w[_EQUAL[rank]]
    h_bad = h.clone()
    if rank == 1:
        h_bad[3, 5] = torch.nextafter(h_bad[3, 5], torch.tensor(math.inf))
    with pytest.raises(ValueError, match="hidden differ across ranks"):
        rlkern.linear_logprobs(h_bad, local, y, process_group=dist.group.WORLD)
    y_bad = y.clone()
    if rank == 0:
        y_bad[[0, 1]] = y_bad[[1, 0]]  # a permutation keeps the plain sum
    with pytest.raises(ValueError, match="labels differ across ranks"):
        rlkern.linear_logprobs(h, local, y_bad, process_group=dist.group.WORLD)
    mask = torch.ones(1, 13)
    with pytest.raises(ValueError, match="hidden differ across ranks"):
        rlkern.linear_grpo_loss(h_bad.view(1, 13, -1), local, y.view(1, 13), mask,
                                torch.ones(1, 13), process_group=dist.group.WORLD)
    rlkern.set_checks(False)
    try:
        out = rlkern.linear_logprobs(h_bad, local, y, process_group=dist.group.WORLD)
        assert out.logprobs.shape == (13,)
    finally:
        rlkern.set_checks(True)


def _worker(rank: int, init_file: str) -> None:
    # One process group for every case: starting processes dominates the test's time.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        torch.set_num_threads(1)
        for dtype in (torch.float32, torch.float64):
            for fused in (False, True):
                for shards in (_EQUAL, _UNEQUAL, _UNEQUAL_FIRST_SMALL):
                    _check_case(rank, dtype, fused, shards)
                # soft-capped logits (Gemma 2): the max / sums all-reduced are those of c·tanh(x/c)
                _check_case(rank, dtype, fused, _UNEQUAL, softcap=2.5)
        _check_ranks_disagree(rank)
    finally:
        dist.destroy_process_group()


def _spawn(fn) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(fn, args=(os.path.join(tmp, "init"),), nprocs=WORLD, join=True)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_vocab_parallel_matches_single_process():
    """float32 / float64 × autograd / with_grad × equal and unequal shards, and ranks whose
    rows disagree refused, on 2 ranks."""
    _spawn(_worker)
