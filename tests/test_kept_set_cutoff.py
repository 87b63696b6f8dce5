"""The CPU kept-set search's candidate cutoff (csrc/cpu/kept_set.h) at vocabulary sizes where it
matters (V ≥ 4,096: the top-k estimate samples the row with a stride > 1).

The search only looks at the tokens with w ≥ c. Each cutoff rule and each fallback is driven
here on rows built to reach it, and the result is held against the float64 reference (the kept
set exactly, the log-probs to fp32 tolerance) and against the sampler (bitwise), so a cutoff
that dropped a token the filters keep would show as a wrong kept set:

* top-p: c = (1 − p)·S/(2V); p within 1e-6 of 1 takes every token;
* top-k: a strided-sample estimate; a row whose sampled positions hold the largest logits makes
  the estimate keep fewer than k tokens, so every token is taken instead;
* min-p alone: c = min_p; a flat row puts every token above any cutoff.

Top-p values keep the boundary off an exact multiple of a tied weight (p·k not an integer),
where float64 rounding alone decides between two kept-set sizes.
"""

from __future__ import annotations

import pytest
import torch

import rlkern
from rlkern.reference.sample import filtered_probs
from rlkern.reference.truncated_logprobs import truncated_logprobs_reference

V = 12_289  # prime: the sample stride (V // 2048 = 6) does not divide it


def _peaked(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, V, generator=g) * 4


def _stride_top() -> torch.Tensor:
    """Rows whose sampled positions (every 6th) hold the largest logits: the top-k estimate
    sees only them."""
    x = torch.zeros(2, V)
    x[:, ::6] = 8.0
    x[1, 1::6] = 7.5  # and a second tier just below, outside the sample
    return x


def _flat() -> torch.Tensor:
    return torch.zeros(2, V)


ROWS = {"peaked": lambda: _peaked(3, 0), "stride_top": _stride_top, "flat": _flat}
FILTERS = [dict(top_p=0.9), dict(top_p=0.5), dict(top_p=1 - 1e-7), dict(top_k=50),
           dict(top_k=2100), dict(top_k=3000), dict(min_p=0.05),
           dict(top_k=50, top_p=0.93), dict(top_k=2100, top_p=0.95),
           dict(top_k=50, top_p=0.93, filter_order="joint"), dict(top_p=0.9, min_p=0.02),
           dict(top_k=3000, min_p=0.5)]


def _check(x: torch.Tensor, opts: dict, T: float = 0.7) -> None:
    for r in range(x.shape[0]):
        kept = filtered_probs(x[r].double(), temperature=T, **opts) > 0
        # Log-probs of every kept token and of a few dropped ones, in one call per row.
        idx = torch.cat([kept.nonzero().flatten()[:2000], (~kept).nonzero().flatten()[:64]])
        rows = x[r].expand(idx.numel(), V)
        lp = rlkern.token_logprobs(rows, idx, temperature=T, **opts).logprobs
        differ = torch.isfinite(lp) != kept[idx]
        if opts.get("top_p", 0) > 1 - 1e-6:
            # p this close to 1 puts the boundary at probabilities fp32 sums cannot resolve:
            # the kernel and the float64 reference may disagree there, and only there.
            p_full = torch.softmax(x[r].double() / T, -1)[idx]
            assert (p_full[differ] < 1e-6).all(), (opts, r)
            continue
        assert not differ.any(), (opts, r)
        ref = truncated_logprobs_reference(rows[:64], idx[:64], temperature=T, **opts)
        torch.testing.assert_close(lp[:64].double(), ref["logprobs"], rtol=1e-5, atol=2e-5)
        # The mass of the kept set, renormalised, is 1.
        if kept.sum() <= 2000:
            total = lp[torch.isfinite(lp)].double().exp().sum()
            torch.testing.assert_close(total, torch.tensor(1.0, dtype=torch.float64),
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("opts", FILTERS, ids=str)
@pytest.mark.parametrize("kind", list(ROWS))
def test_kept_set_equals_reference(kind, opts):
    _check(ROWS[kind](), opts)


@pytest.mark.parametrize("opts", [dict(top_p=0.9), dict(top_k=2100), dict(top_k=50, top_p=0.9),
                                  dict(min_p=0.05)], ids=str)
@pytest.mark.parametrize("kind", list(ROWS))
def test_bitwise_equal_to_sampler(kind, opts):
    """The processed log-prob of each drawn token equals token_logprobs of it, bit for bit, on
    every cutoff path (both run the same search)."""
    x = ROWS[kind]()
    n, G = x.shape[0], 8
    out = rlkern.sample(x, temperature=0.7, seeds=torch.arange(n) * 31 + 1,
                        steps=torch.zeros(n, dtype=torch.long), num_samples=G, **opts)
    tok = out.tokens.reshape(n, G)
    lp = rlkern.token_logprobs(x.repeat_interleave(G, 0), tok.reshape(-1), temperature=0.7,
                               **opts).logprobs
    assert torch.equal(lp, out.processed_logprobs.reshape(-1))
    assert torch.isfinite(lp).all()


@pytest.mark.parametrize("opts", [dict(top_p=0.9), dict(top_p=0.6, min_p=0.01), dict(top_k=50),
                                  dict(top_k=50, top_p=0.93)], ids=str)
def test_same_kept_set_whatever_the_row_history(opts):
    """Top-p's and top-k's candidate lists depend on a guess carried over from the previous row
    a thread handled (after a flat row top-k's guess collects too little from a peaked one, and
    falls back; after a spike, far more than it needs); the kept set must not. Rows of very
    different shapes (peaked, flat, one spike) are presented to the sampler and to
    token_logprobs in different orders and batch sizes, one thread: every row's processed
    log-prob equals its token_logprobs bit for bit, and the kept set equals the float64
    reference's."""
    g = torch.Generator().manual_seed(5)
    peaked = torch.randn(6, V, generator=g) * 4
    spike = torch.zeros(2, V)
    spike[:, 17] = 30.0
    rows = torch.cat([peaked[:2], _flat(), peaked[2:4], spike, peaked[4:]])
    n = rows.shape[0]
    seeds, steps = torch.arange(n) * 13 + 7, torch.zeros(n, dtype=torch.long)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = rlkern.sample(rows, temperature=0.7, seeds=seeds, steps=steps, **opts)
        for order in (torch.arange(n), torch.arange(n).flip(0), torch.randperm(n, generator=g)):
            lp = rlkern.token_logprobs(rows[order], out.tokens[order], temperature=0.7,
                                       **opts).logprobs
            assert torch.equal(lp, out.processed_logprobs[order])
        for r in range(n):  # one row at a time: no history at all
            lp = rlkern.token_logprobs(rows[r:r + 1], out.tokens[r:r + 1], temperature=0.7,
                                       **opts).logprobs
            assert torch.equal(lp, out.processed_logprobs[r:r + 1])
    finally:
        torch.set_num_threads(threads)
    for r in range(n):
        kept = filtered_probs(rows[r].double(), temperature=0.7, **opts) > 0
        idx = torch.cat([kept.nonzero().flatten()[:500], (~kept).nonzero().flatten()[:32]])
        lp = rlkern.token_logprobs(rows[r].expand(idx.numel(), V), idx, temperature=0.7,
                                   **opts).logprobs
        assert torch.equal(torch.isfinite(lp), kept[idx])


def test_unfiltered_draw_walks_the_folds_blocks():
    """With no filter the sampler folds the row once and draws from its per-block sums (blocks
    of 4,096 logits), re-forming one block's weights. At V = 12,289 (four blocks, a short last
    one), eight heavy tokens sit at block edges and in the short block: the draws follow the
    softmax (χ² over the heavy tokens and the rest), and the processed and raw log-probs equal
    token_logprobs bit for bit."""
    from scipy import stats

    x = torch.zeros(V)
    heavy = torch.tensor([0, 4095, 4096, 8191, 8192, 12287, 12288, 6000])
    x[heavy] = torch.tensor([6.0, 5.5, 5.0, 6.5, 4.5, 5.8, 6.2, 3.0])
    n = 4000
    rows = x.expand(n, V)
    out = rlkern.sample(rows, temperature=1.0, seeds=torch.arange(n) + 11,
                        steps=torch.zeros(n, dtype=torch.long))
    p = torch.softmax(x.double(), -1)
    counts = torch.stack([(out.tokens == h).sum() for h in heavy] +
                         [(~torch.isin(out.tokens, heavy)).sum()]).double()
    probs = torch.cat([p[heavy], (1 - p[heavy].sum()).reshape(1)])
    assert stats.chisquare(counts.numpy(), (probs * n).numpy()).pvalue > 1e-4
    lp = rlkern.token_logprobs(rows, out.tokens).logprobs
    assert torch.equal(lp, out.processed_logprobs)
    assert torch.equal(lp, out.raw_logprobs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_row_histories_keep_the_reference_sets(dtype):
    """Rows of random scale (σ 0.5–32), offset and ties, one thread, so that each row's
    candidate guess comes from a different kind of row: every drawn token lies in the float64
    reference's kept set, and so does every label with a finite truncated log-prob (and no
    other), for top-k from 1 to 500 alone and with top-p, at three temperatures. This drew
    out the signed-zero ties and the underflowing kept weights (test_sample_edges.py)."""
    g = torch.Generator().manual_seed(11)
    n, v = 16, 20_011
    sigma = torch.tensor([0.5, 2.0, 4.0, 16.0, 32.0])[torch.randint(0, 5, (n,), generator=g)]
    sigma[1::4] = 32.0  # at T = 0.3 even the 50th largest weight underflows fp32
    rows = torch.randn(n, v, generator=g) * sigma[:, None] + torch.randn(n, 1, generator=g) * 50
    # ties at the max: shifted so that it is +0 and rounded, which turns the logits within
    # half a unit below it into −0
    rows[::5] = (rows[::5] - rows[::5].amax(1, keepdim=True)).round()
    rows = rows.to(dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for opts in (dict(top_k=1), dict(top_k=50), dict(top_k=500),
                     dict(top_k=50, top_p=0.93)):
            for t in (0.3, 1.3):
                out = rlkern.sample(rows, temperature=t, seeds=torch.arange(n),
                                    steps=torch.zeros(n, dtype=torch.long), **opts)
                for r in range(n):
                    kept = filtered_probs(rows[r].double(), temperature=t, **opts) > 0
                    assert kept[out.tokens[r]], (opts, t, r)
                    if r % 4:
                        continue
                    idx = torch.cat([kept.nonzero().flatten(), (~kept).nonzero().flatten()[:64]])
                    lp = rlkern.token_logprobs(rows[r].expand(idx.numel(), v), idx,
                                               temperature=t, **opts).logprobs
                    assert torch.equal(torch.isfinite(lp), kept[idx]), (opts, t, r)
    finally:
        torch.set_num_threads(threads)
