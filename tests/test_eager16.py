"""rlkern.ops.eager16: torch's eager 16-bit CPU ops, bit for bit, against torch itself.

``log_softmax_stats_16bit`` must give ``(shift, log_s)`` with which ``round((x − shift) −
log_s)`` is ``x.log_softmax(-1)``'s bits, exactly (the C++ kernel that repeats torch's
summation order) and from rlkern's log-sum-exp (its fast path, which hands the rows it cannot
decide to the kernel). ``eager_entropy_16bit`` must be ``-(exp(lp) * lp).sum(-1)``'s bits for
any chunking. The oracle is torch's own ops on the same tensors.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rlkern
from rlkern.ops import eager16

HALF = (torch.bfloat16, torch.float16)


def _logits(shape, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _lse(x):
    """rlkern's float32 log-sum-exp of each row of ``x (rows, V)``."""
    labels = torch.zeros(x.shape[0], dtype=torch.int64)
    return rlkern.token_logprobs(x.unsqueeze(0), labels.unsqueeze(0)).lse[0]


def _log_softmax_bits(x, stats):
    shift, log_s = stats
    return ((x.float() - shift[..., None]) - log_s[..., None]).to(x.dtype)


def _assert_same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.view(torch.int16), b.view(torch.int16)), \
        f"{int((a.view(torch.int16) != b.view(torch.int16)).sum())} values differ"


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("vocab", [1, 2, 15, 16, 17, 31, 32, 33, 47, 64, 95, 97, 768, 1000,
                                   32000, 151936])
@pytest.mark.parametrize("scale", [0.5, 3.0, 30.0])
def test_stats_reproduce_torch_log_softmax(dtype, vocab, scale):
    """Every vocab length around torch's vector blocks (16 and 32 lanes, the tail blends, the
    lane-by-lane sum of short rows), both paths: exact and from rlkern's log-sum-exp."""
    rows = 64 if vocab <= 1000 else 4
    x = _logits((rows, vocab), dtype, seed=vocab, scale=scale)
    want = x.log_softmax(-1)
    _assert_same_bits(_log_softmax_bits(x, eager16.log_softmax_stats_16bit(x)), want)
    _assert_same_bits(_log_softmax_bits(x, eager16.log_softmax_stats_16bit(x, _lse(x))), want)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), vocab=st.integers(1, 2100), dtype=st.sampled_from(HALF),
       scale=st.sampled_from([0.1, 1.0, 8.0, 60.0]), seed=st.integers(0, 2**16))
def test_property_stats(rows, vocab, dtype, scale, seed):
    x = _logits((rows, vocab), dtype, seed=seed, scale=scale)
    want = x.log_softmax(-1)
    _assert_same_bits(_log_softmax_bits(x, eager16.log_softmax_stats_16bit(x)), want)
    _assert_same_bits(_log_softmax_bits(x, eager16.log_softmax_stats_16bit(x, _lse(x))), want)


def test_rows_the_log_sum_exp_cannot_decide_take_the_kernel(monkeypatch):
    """fp16 rows whose Σ exp lies within the float32 log-sum-exp's error of a rounding midpoint
    (about one in 10^4 at V = 768): found by rounding the estimate without a margin, and the
    fast path must still give torch's bits for each of them."""
    x = _logits((20000, 768), torch.float16, seed=11, scale=1.0)
    lse = _lse(x)
    monkeypatch.setattr(eager16, "_S_REL_ERR", 0.0)
    monkeypatch.setattr(eager16, "_LSE_ULPS", 0.0)
    monkeypatch.setattr(eager16, "_LOG_ULPS", 0.0)
    naive = _log_softmax_bits(x, eager16.log_softmax_stats_16bit(x, lse))
    want = x.log_softmax(-1)
    wrong = (naive.view(torch.int16) != want.view(torch.int16)).any(-1).nonzero().squeeze(1)
    assert wrong.numel() > 0, "no undecidable row in the sample: enlarge it"
    monkeypatch.undo()
    hard = x[wrong]
    _assert_same_bits(_log_softmax_bits(hard, eager16.log_softmax_stats_16bit(hard, lse[wrong])),
                      want[wrong])


@pytest.mark.parametrize("dtype", HALF)
def test_row_max_by_integer_compares(dtype):
    """``row_max_16bit`` is ``amax``: rows with positive values, only negative ones, ±0, ±inf,
    a single finite value among −inf, strided rows."""
    x = _logits((40, 77), torch.float32, seed=5).to(dtype)
    x[3] = -x[3].abs() - 0.1
    x[4] = -0.0
    x[5, 2] = float("inf")
    x[6] = float("-inf")
    x[6, 5] = -3.0
    x[7] = -x[7].abs()
    x[8] = 0.0
    x[9] = float("-inf")
    assert torch.equal(eager16.row_max_16bit(x), x.float().amax(-1))
    assert torch.equal(eager16.row_max_16bit(x[:, ::2]), x[:, ::2].float().amax(-1))


def _torch_entropy(x, chunk_size):
    """The trainer's computation: ``-(exp(lp) * lp).sum(-1)`` in the 16-bit dtype, by chunks."""
    out = []
    for chunk in x.split(chunk_size):
        lp = chunk.log_softmax(-1)
        out.append(-(torch.exp(lp) * lp).sum(-1))
    return torch.cat(out)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize(("rows", "vocab"), [(1, 768), (37, 768), (5, 1000), (3, 40000),
                                             (9, 151936), (70, 33)])
@pytest.mark.parametrize("chunk_size", [1, 2, 16, 128])
def test_entropy_is_torchs_bits(dtype, rows, vocab, chunk_size):
    """Chunks of one row of ≥ 32,768 logits are the case where torch splits a row's sum
    between threads: the chunking must be the trainer's for the same bits."""
    x = _logits((rows, vocab), dtype, seed=rows + vocab, scale=2.0)
    stats = eager16.log_softmax_stats_16bit(x, _lse(x))
    got = eager16.eager_entropy_16bit(x, *stats, chunk_size=chunk_size)
    _assert_same_bits(got, _torch_entropy(x, chunk_size))


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 30), vocab=st.integers(1, 1500), dtype=st.sampled_from(HALF),
       chunk_size=st.integers(1, 9), scale=st.sampled_from([0.3, 3.0, 25.0]),
       seed=st.integers(0, 2**16))
def test_property_entropy(rows, vocab, dtype, chunk_size, scale, seed):
    x = _logits((rows, vocab), dtype, seed=seed, scale=scale)
    got = eager16.eager_entropy_16bit(x, *eager16.log_softmax_stats_16bit(x), chunk_size)
    _assert_same_bits(got, _torch_entropy(x, chunk_size))


@pytest.mark.parametrize("dtype", HALF)
def test_terms_of_non_finite_logits(dtype):
    """A logit at −inf adds 0 (torch's ops: 0 · (−inf) = NaN); a NaN row stays NaN; the other
    terms are torch's."""
    x = _logits((3, 300), dtype, seed=3)
    x[0, 7] = float("-inf")
    x[1, 4] = float("nan")
    got = eager16.eager_entropy_16bit(x, *eager16.log_softmax_stats_16bit(x))
    lp = x[0:1].log_softmax(-1)
    terms = (torch.exp(lp) * lp).masked_fill(x[0:1] == float("-inf"), 0.0)
    assert torch.isnan(terms).sum() == 0 and torch.isinf(lp).sum() == 1
    _assert_same_bits(got[0:1], -terms.sum(-1))
    assert torch.isnan(got[1])
    _assert_same_bits(got[2:], _torch_entropy(x[2:], 128))


def test_strided_rows_and_empty():
    x = _logits((6, 2 * 500), torch.bfloat16, seed=4)[:, ::2]
    assert x.stride(1) == 2
    want = _torch_entropy(x.contiguous(), 4)
    _assert_same_bits(eager16.eager_entropy_16bit(x, *eager16.log_softmax_stats_16bit(x), 4),
                      want)
    rows = _logits((8, 3, 500), torch.float16)[:, 1]  # rows 1 500 apart: a row stride of 1500
    _assert_same_bits(_log_softmax_bits(rows, eager16.log_softmax_stats_16bit(rows)),
                      rows.log_softmax(-1))
    empty = torch.zeros(0, 10, dtype=torch.bfloat16)
    shift, log_s = eager16.log_softmax_stats_16bit(empty)
    assert shift.shape == log_s.shape == (0,)
    assert eager16.eager_entropy_16bit(empty, shift, log_s).shape == (0,)


@pytest.mark.parametrize("dtype", HALF)
def test_trainer_views_are_read_in_place(dtype):
    """TRL's ``logits[:, :-1, :]``, whose leading dims cannot merge: the kernels read the view
    where it lies (no copy of the logits) and give the bits of torch's ops on it."""
    x = _logits((3, 41, 2000), dtype, seed=5)[:, :-1, :]
    with pytest.raises(RuntimeError):
        x.view(-1, 2000)  # the case: no flat view exists
    assert eager16._check_rows(x).data_ptr() == x.data_ptr()
    lse = rlkern.token_logprobs(x, torch.zeros(3, 40, dtype=torch.int64)).lse
    want = x.log_softmax(-1)
    for stats in (eager16.log_softmax_stats_16bit(x), eager16.log_softmax_stats_16bit(x, lse)):
        assert stats[0].shape == stats[1].shape == (3, 40)
        _assert_same_bits(_log_softmax_bits(x, stats), want)
    flat = x.reshape(-1, 2000)
    for chunk_size in (1, 7, 128):
        got = eager16.eager_entropy_16bit(x, *stats, chunk_size)
        _assert_same_bits(got, _torch_entropy(flat, chunk_size).view(3, 40))
    one = x[1, 2]  # a single (V,) row: 0-dim results
    shift, log_s = eager16.log_softmax_stats_16bit(one, lse[1, 2])
    assert shift.shape == ()
    _assert_same_bits(eager16.eager_entropy_16bit(one, shift, log_s),
                      _torch_entropy(one[None], 1)[0])


def test_errors():
    x = _logits((4, 10), torch.bfloat16)
    stats = eager16.log_softmax_stats_16bit(x)
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        eager16.log_softmax_stats_16bit(x.float())
    with pytest.raises(ValueError, match=r"\(\.\.\., V\) CPU tensor"):
        eager16.log_softmax_stats_16bit(x[0, 0])
    with pytest.raises(ValueError, match="cannot be merged without a copy"):
        eager16.log_softmax_stats_16bit(_logits((2, 3, 4, 10), torch.float16)[:, :-1])
    with pytest.raises(ValueError, match="empty vocab"):
        eager16.log_softmax_stats_16bit(torch.zeros(3, 0, dtype=torch.float16))
    with pytest.raises(ValueError, match="chunk_size"):
        eager16.eager_entropy_16bit(x, *stats, chunk_size=0)
    with pytest.raises(ValueError, match="shift must be float32 of shape"):
        eager16.eager_entropy_16bit(x, stats[0][:3], stats[1])
    with pytest.raises(ValueError, match="lse must be float32 of shape"):
        eager16.log_softmax_stats_16bit(x, stats[1].double())
    # the registered ops' own checks, for callers of torch.ops.rlkern
    ops = rlkern.backends.cpp_ops()
    with pytest.raises(RuntimeError, match="shift: expected a contiguous tensor of 4"):
        ops.eager16_log_softmax_stats_out(x, torch.empty(3), torch.empty(4))
    with pytest.raises(RuntimeError, match=r"terms: expected shape \(count, 10\)"):
        ops.eager16_entropy_terms_out(x, *stats, 0, torch.empty(4, 9, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="terms: rows 2 to 5 of 4"):
        ops.eager16_entropy_terms_out(x, *stats, 2, torch.empty(3, 10, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="terms: expected a contiguous tensor of 40"):
        ops.eager16_entropy_terms_out(x, *stats, 0,
                                      torch.empty(10, 4, dtype=torch.bfloat16).t())
    with pytest.raises(TypeError, match="terms: expected BFloat16"):
        ops.eager16_entropy_terms_out(x, *stats, 0, torch.empty(4, 10))
    with pytest.raises(TypeError, match="logits: expected bfloat16 or float16"):
        ops.eager16_log_softmax_stats_out(x.float(), *stats)


def test_compiles_without_graph_breaks():
    x = _logits((5, 300), torch.bfloat16, seed=9)

    def entropy(t):
        return eager16.eager_entropy_16bit(t, *eager16.log_softmax_stats_16bit(t), 2)

    compiled = torch.compile(entropy, backend="aot_eager", fullgraph=True)
    # aot_eager runs torch's own ops for the sums: the eager bits
    _assert_same_bits(compiled(x), entropy(x))
