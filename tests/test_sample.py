"""rlkern.sample: exactness (χ² against the filtered distribution), filtered tokens never drawn,
bitwise batch invariance and replay, logprob values, every option, bad inputs.

Backends under test: the C++ CPU kernel and the torch reference (``SAMPLE_BACKENDS``); the
Triton kernel has its own file (interpreter, small shapes)."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

import rlkern
from rlkern.ops.sample import sample
from rlkern.reference.sample import filtered_probs, philox4x32_10, philox_uniform
from sample_cases import OPTIONS, option_id

SAMPLE_BACKENDS = ["cpu"]


def _seeds(n, base=0):
    return torch.arange(base, base + n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64)


def test_philox_known_answer():
    # Random123's published known-answer vectors for philox4x32_10.
    assert philox4x32_10((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    ones = 0xFFFFFFFF
    assert philox4x32_10((ones,) * 4, (ones, ones)) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6,
                                                        0x6D5451FD)
    u = philox_uniform(3, 5)
    assert 0.0 <= u < 1.0 and u != philox_uniform(3, 6) and u != philox_uniform(4, 5)


@pytest.mark.parametrize("backend", SAMPLE_BACKENDS)
@pytest.mark.parametrize("opts", OPTIONS, ids=option_id)
def test_chi2_goodness_of_fit(backend, opts):
    torch.manual_seed(0)
    V, n = 13, 20000
    row = torch.randn(1, V) * 1.5
    seeds, steps = _seeds(n, base=1000)
    out = sample(row, seeds=seeds, steps=steps, indices=torch.zeros(n, dtype=torch.int64),
                 backend=backend, **opts)
    p = filtered_probs(row[0].double(), **{k: v for k, v in opts.items()})
    counts = torch.bincount(out.tokens, minlength=V).double()
    kept = p > 0
    assert counts[~kept].sum() == 0, "a filtered-out token was drawn"
    res = stats.chisquare(counts[kept].numpy(), (p[kept] * n).numpy())
    assert res.pvalue > 1e-3, (res, counts, p * n)
    # The processed logprob of each drawn token is log of its filtered probability.
    torch.testing.assert_close(out.processed_logprobs.double(), p.log()[out.tokens],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("opts", [{}, {"temperature": 0.7}, {"top_p": 0.9},
                                  {"top_k": 5, "min_p": 0.01}], ids=str)
def test_entropy_is_free_to_leave_out(dtype, opts):
    """Without return_entropy an unfiltered row's fold leaves out Σ w·z: the tokens and both
    log-probs are bitwise those of the call that returns the entropy. Rows of several
    4,096-logit blocks, −inf logits, several draws a row."""
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(6, 10_007, generator=gen) * 4).to(dtype)
    logits[1, ::7] = -torch.inf
    seeds, steps = _seeds(6, base=50)
    for num_samples in (1, 3):
        plain = sample(logits, seeds=seeds, steps=steps, num_samples=num_samples, **opts)
        with_h = sample(logits, seeds=seeds, steps=steps, num_samples=num_samples,
                        return_entropy=True, **opts)
        assert plain.entropy is None or plain.entropy.numel() == 0
        assert bool(torch.isfinite(with_h.entropy).all())
        for name in ("tokens", "raw_logprobs", "processed_logprobs"):
            a, b = getattr(plain, name), getattr(with_h, name)
            assert torch.equal(a, b), (name, num_samples)


@pytest.mark.parametrize("backend", SAMPLE_BACKENDS)
@pytest.mark.parametrize("opts", OPTIONS[:6], ids=str)
@pytest.mark.parametrize("V", [1, 3, 99, 4099])
def test_matches_reference(backend, opts, V):
    torch.manual_seed(V)
    logits = torch.randn(17, V) * 3
    seeds, steps = torch.randint(0, 2**40, (17,)), torch.randint(0, 1000, (17,))
    got = sample(logits, seeds=seeds, steps=steps, backend=backend, return_entropy=True, **opts)
    ref = sample(logits, seeds=seeds, steps=steps, backend="torch", return_entropy=True, **opts)
    assert torch.equal(got.tokens, ref.tokens)
    for name in ("raw_logprobs", "processed_logprobs", "entropy"):
        torch.testing.assert_close(getattr(got, name).double(), getattr(ref, name).double(),
                                   rtol=1e-5, atol=2e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(dtype):
    torch.manual_seed(1)
    logits = (torch.randn(9, 300) * 2).to(dtype)
    seeds, steps = _seeds(9)
    got = sample(logits, top_p=0.9, seeds=seeds, steps=steps, return_entropy=True)
    ref = sample(logits, top_p=0.9, seeds=seeds, steps=steps, backend="torch",
                 return_entropy=True)
    assert torch.equal(got.tokens, ref.tokens)
    torch.testing.assert_close(got.raw_logprobs.double(), ref.raw_logprobs.double(),
                               rtol=1e-5, atol=2e-5)


def test_large_vocab_top_k_top_p():
    torch.manual_seed(2)
    logits = torch.randn(3, 151936, dtype=torch.bfloat16) * 4
    seeds, steps = _seeds(3, 7)
    for opts in (dict(), dict(top_k=50, top_p=0.9), dict(top_p=0.95), dict(min_p=0.05)):
        got = sample(logits, seeds=seeds, steps=steps, **opts)
        ref = sample(logits, seeds=seeds, steps=steps, backend="torch", **opts)
        assert torch.equal(got.tokens, ref.tokens), opts
        torch.testing.assert_close(got.processed_logprobs.double(),
                                   ref.processed_logprobs.double(), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("backend", SAMPLE_BACKENDS)
def test_batch_invariance_and_replay(backend):
    torch.manual_seed(3)
    logits = torch.randn(32, 1000) * 2
    seeds, steps = torch.randint(0, 2**62, (32,)), torch.randint(0, 2**20, (32,))
    temp = torch.rand(32) + 0.5
    opts = dict(top_k=torch.randint(1, 1000, (32,)), top_p=torch.rand(32) * 0.9 + 0.1,
                return_entropy=True, backend=backend)
    full = sample(logits, temperature=temp, seeds=seeds, steps=steps, **opts)
    again = sample(logits, temperature=temp, seeds=seeds, steps=steps, **opts)
    perm = torch.randperm(32)
    permuted = sample(logits[perm], temperature=temp[perm], seeds=seeds[perm], steps=steps[perm],
                      **{**opts, "top_k": opts["top_k"][perm], "top_p": opts["top_p"][perm]})
    for f in ("tokens", "raw_logprobs", "processed_logprobs", "entropy"):
        assert torch.equal(getattr(full, f), getattr(again, f)), f
        assert torch.equal(getattr(full, f)[perm], getattr(permuted, f)), f
    for i in (0, 5, 31):
        alone = sample(logits[i:i + 1], temperature=temp[i:i + 1], seeds=seeds[i:i + 1],
                       steps=steps[i:i + 1], **{**opts, "top_k": opts["top_k"][i:i + 1],
                                                "top_p": opts["top_p"][i:i + 1]})
        for f in ("tokens", "raw_logprobs", "processed_logprobs", "entropy"):
            assert torch.equal(getattr(full, f)[i:i + 1], getattr(alone, f)), (i, f)
    # indices: drawing via a shared row equals drawing from a materialised copy of it.
    idx = torch.tensor([4, 4, 4, 9])
    via_idx = sample(logits, indices=idx, seeds=seeds[:4], steps=steps[:4], backend=backend)
    copied = sample(logits[idx].contiguous(), seeds=seeds[:4], steps=steps[:4], backend=backend)
    assert torch.equal(via_idx.tokens, copied.tokens)
    assert torch.equal(via_idx.raw_logprobs, copied.raw_logprobs)


def test_strided_rows():
    logits = torch.randn(6, 2, 50)
    view = logits[:, 0, :]
    seeds, steps = _seeds(6)
    a = sample(view, seeds=seeds, steps=steps, top_k=10)
    b = sample(view.contiguous(), seeds=seeds, steps=steps, top_k=10)
    assert torch.equal(a.tokens, b.tokens)


@pytest.mark.parametrize("backend", [*SAMPLE_BACKENDS, "torch"])
def test_ties_keep_lower_indices(backend):
    x = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0, 3.0]])
    n = 400
    seeds, steps = _seeds(n)
    idx = torch.zeros(n, dtype=torch.int64)
    out = sample(x, top_k=2, seeds=seeds, steps=steps, indices=idx, backend=backend)
    assert set(out.tokens.tolist()) == {1, 2}
    # top-p = 0.5 over four equal tokens holding ~all the mass: the mass before the 3rd is
    # ~0.49 < 0.5, so three of them (the three lowest indices) are kept.
    out = sample(x, top_p=0.5, seeds=seeds, steps=steps, indices=idx, backend=backend)
    assert set(out.tokens.tolist()) == {1, 2, 3}


def test_raw_temperature_and_degenerate():
    torch.manual_seed(4)
    x = torch.randn(5, 40)
    seeds, steps = _seeds(5)
    out = sample(x, temperature=0.5, raw_temperature=False, seeds=seeds, steps=steps)
    expect = torch.log_softmax(x.double(), -1).gather(1, out.tokens[:, None])[:, 0]
    torch.testing.assert_close(out.raw_logprobs.double(), expect, rtol=1e-5, atol=1e-5)
    # top_k = 1 is greedy; processed logprob 0.
    out = sample(x, top_k=1, seeds=seeds, steps=steps)
    assert torch.equal(out.tokens, x.argmax(-1))
    assert torch.all(out.processed_logprobs == 0)
    # masked vocabulary (−inf) is never drawn
    x[:, :30] = float("-inf")
    out = sample(x, seeds=_seeds(5)[0], steps=steps)
    assert bool((out.tokens >= 30).all())
    # empty batch
    e = sample(torch.randn(0, 10), seeds=torch.zeros(0, dtype=torch.long),
               steps=torch.zeros(0, dtype=torch.long))
    assert e.tokens.shape == (0,)


def test_bad_inputs():
    x = torch.randn(3, 10)
    seeds, steps = _seeds(3)
    kw = dict(seeds=seeds, steps=steps)
    for bad, err in [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=torch.tensor([1.0, 0.0, 1.0])), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(min_p=-0.1), "min_p"),
        (dict(top_k=torch.tensor([1, 2])), "top_k"),
        (dict(temperature=torch.ones(4)), "temperature"),
        (dict(filter_order="sorted"), "filter_order"),
    ]:
        with pytest.raises(ValueError, match=err):
            sample(x, **kw, **bad)
    with pytest.raises(ValueError, match="seeds"):
        sample(x, seeds=seeds[:2], steps=steps)
    with pytest.raises(TypeError, match="steps"):
        sample(x, seeds=seeds, steps=steps.float())
    with pytest.raises(ValueError, match="indices"):
        sample(x, indices=torch.tensor([0, 1, 3]), **kw)
    y = x.clone()
    y[1, 4] = float("nan")
    with pytest.raises(ValueError, match="row 1 contains NaN"):
        sample(y, **kw)
    y = x.clone()
    y[2] = float("-inf")
    with pytest.raises(ValueError, match="row 2 is all -inf"):
        sample(y, **kw)


def test_public_api_and_opcheck():
    assert rlkern.sample is sample
    x = torch.randn(4, 33)
    seeds, steps = _seeds(4)
    args = (x, None, torch.full((4,), 0.8, dtype=torch.float64), torch.full((4,), 5),
            torch.full((4,), 0.9, dtype=torch.float64), None, seeds, steps, False, True, True,
            "cpu")
    torch.library.opcheck(torch.ops.rlkern.sample.default, args)

    @torch.compile(fullgraph=True, backend="eager")
    def f(x, seeds, steps):
        return sample(x, temperature=0.8, top_k=5, seeds=seeds, steps=steps)

    assert torch.equal(f(x, seeds, steps).tokens,
                       sample(x, temperature=0.8, top_k=5, seeds=seeds, steps=steps).tokens)
