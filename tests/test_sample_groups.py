"""sample(num_samples=G): G draws per row from one filtering pass — draw j keyed by (seed,
step, j) (Philox counter word 0), draw 0 the num_samples=1 token; equal to the reference on
every backend that has it, exact (χ²), replayable and batch invariant."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

import rlkern
from rlkern.reference.sample import filtered_probs


def _seeds(n):
    return torch.arange(n) * 101 + 7, torch.arange(n) % 3


@pytest.mark.parametrize("opts", [dict(), dict(top_p=0.8), dict(top_k=5, min_p=0.05),
                                  dict(top_k=6, top_p=0.7, filter_order="joint")], ids=str)
def test_matches_reference_and_single_draw(opts):
    torch.manual_seed(0)
    x = torch.randn(5, 50) * 2
    seeds, steps = _seeds(5)
    G = 4
    got = rlkern.sample(x, temperature=0.8, seeds=seeds, steps=steps, num_samples=G,
                        return_entropy=True, backend="cpu", **opts)
    ref = rlkern.sample(x, temperature=0.8, seeds=seeds, steps=steps, num_samples=G,
                        return_entropy=True, backend="torch", **opts)
    one = rlkern.sample(x, temperature=0.8, seeds=seeds, steps=steps, return_entropy=True,
                        backend="cpu", **opts)
    assert got.tokens.shape == (5 * G,)
    assert torch.equal(got.tokens, ref.tokens)
    assert torch.equal(got.tokens.view(5, G)[:, 0], one.tokens)
    assert torch.equal(got.processed_logprobs.view(5, G)[:, 0], one.processed_logprobs)
    assert torch.equal(got.entropy.view(5, G), one.entropy[:, None].expand(5, G))
    for f in ("raw_logprobs", "processed_logprobs", "entropy"):
        torch.testing.assert_close(getattr(got, f).double(), getattr(ref, f).double(), rtol=1e-5,
                                   atol=2e-5, msg=f)
    # Each draw's log-probs are token_logprobs' (bitwise, the same filters).
    t = rlkern.token_logprobs(x.repeat_interleave(G, 0), got.tokens, temperature=0.8, **opts) \
        if opts else None
    if t is not None:
        assert torch.equal(t.logprobs, got.processed_logprobs)


def test_batch_invariance_replay_and_indices():
    torch.manual_seed(1)
    x = torch.randn(6, 70)
    seeds, steps = _seeds(6)
    kw = dict(top_p=0.9, num_samples=3)
    a = rlkern.sample(x, seeds=seeds, steps=steps, **kw)
    assert torch.equal(a.tokens, rlkern.sample(x, seeds=seeds, steps=steps, **kw).tokens)
    b = rlkern.sample(x[[4]], seeds=seeds[[4]], steps=steps[[4]], **kw)
    assert torch.equal(b.tokens, a.tokens.view(6, 3)[4])
    c = rlkern.sample(x, seeds=seeds[[4, 1]], steps=steps[[4, 1]], indices=torch.tensor([4, 1]),
                      **kw)
    assert torch.equal(c.tokens.view(2, 3), a.tokens.view(6, 3)[[4, 1]])


def test_chi2_and_filtered_never_drawn():
    torch.manual_seed(2)
    x = torch.randn(1, 6) * 1.5
    G = 4000
    out = rlkern.sample(x, top_p=0.85, seeds=torch.tensor([12345]),
                        steps=torch.tensor([0]), num_samples=G)
    q = filtered_probs(x[0], top_p=0.85)
    counts = torch.bincount(out.tokens, minlength=6).double()
    assert (counts[q == 0] == 0).all()
    kept = q > 0
    _, pvalue = stats.chisquare(counts[kept].numpy(), (q[kept] * G).numpy())
    assert pvalue > 1e-3


def test_triton_interpreter():
    pytest.importorskip("triton")
    torch.manual_seed(3)
    x = torch.randn(2, 31) * 2
    seeds, steps = _seeds(2)
    kw = dict(top_k=6, top_p=0.8, seeds=seeds, steps=steps, num_samples=3, return_entropy=True)
    tri = rlkern.sample(x, backend="triton", **kw)
    ref = rlkern.sample(x, backend="torch", **kw)
    assert torch.equal(tri.tokens, ref.tokens)
    torch.testing.assert_close(tri.processed_logprobs.double(), ref.processed_logprobs.double(),
                               rtol=1e-5, atol=2e-5)


def test_bad_num_samples():
    x = torch.randn(2, 5)
    kw = dict(seeds=torch.arange(2), steps=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        rlkern.sample(x, num_samples=0, **kw)
    with pytest.raises(TypeError, match="num_samples: expected an int"):
        rlkern.sample(x, num_samples=2.0, **kw)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="row 1 contains NaN"):
        rlkern.sample(x, num_samples=3, **kw)
    x = torch.randn(3, 5)
    x[2] = float("-inf")
    kw = dict(seeds=torch.arange(3), steps=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="row 2 is all -inf"):
        rlkern.sample(x, num_samples=3, **kw)


def test_opcheck_and_compile():
    x = torch.randn(3, 20)
    seeds, steps = _seeds(3)
    args = (x, None, torch.full((3,), 0.8, dtype=torch.float64), None,
            torch.full((3,), 0.9, dtype=torch.float64), None, seeds, steps, False, True, True,
            "cpu", 2)
    torch.library.opcheck(torch.ops.rlkern.sample_n.default, args)

    @torch.compile(fullgraph=True, backend="eager")
    def f(x, seeds, steps):
        return rlkern.sample(x, top_p=0.9, seeds=seeds, steps=steps, num_samples=2).tokens

    assert torch.equal(f(x, seeds, steps),
                       rlkern.sample(x, top_p=0.9, seeds=seeds, steps=steps, num_samples=2).tokens)
