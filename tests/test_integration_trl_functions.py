"""rlkern.integrations.trl_functions against TRL 1.16's own ``trl.trainer.utils`` functions.

Each drop-in is called on the same inputs as TRL's function (imported from TRL, not re-typed):
values, result dtypes and shapes, gradients, masks, temperatures, K ids per row. For float32
and float64 logits the values agree to accumulation-order rounding; for 16-bit logits at
T = 1 the log-probabilities and the entropy are TRL's bit for bit (the drop-ins repeat the
roundings of torch's 16-bit ops, rlkern.ops.eager16, tested on its own in test_eager16.py),
and at other temperatures the correctly rounded values (checked against float64).
"""

from __future__ import annotations

import importlib
import sys
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rlkern.integrations._fold as _fold_module
import rlkern.integrations.trl_functions as rf
from rlkern.bench import harness

trl_utils = pytest.importorskip("trl.trainer.utils", reason="trl is not installed "
                                "(pip install -e '.[test]' installs it)")

pytestmark = pytest.mark.parity

FLOAT_TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-6, atol=2e-6)}
HALF = (torch.bfloat16, torch.float16)
SHAPES = [(32, 768), (8, 16, 768), (2, 4, 8, 768)]


def _logits(shape, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _ids(shape, vocab, seed=1, dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=g).to(dtype)


def _exact(logits, temperature=1.0):
    """float64 log_softmax of logits / T (no rounding of the scaled logits)."""
    return (logits.double() / temperature).log_softmax(-1)


def _mantissa_bits(dtype):
    return {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23, torch.float64: 52}[dtype]


def _assert_correctly_rounded(ours, exact, dtype, what):
    """Within half a unit in the last place of ``dtype`` (plus the fp32 accumulation's error)."""
    ulp = torch.pow(2.0, torch.floor(torch.log2(exact.abs().clamp_min(1e-30)))
                    - _mantissa_bits(dtype))
    err = (ours.double() - exact).abs()
    bound = 0.5 * ulp + 1e-6 * exact.abs() + 1e-7
    assert bool((err <= bound).all()), (what, (err - bound).max().item())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_log_softmax_matches_trl(shape, dtype, temperature):
    logits = _logits(shape, dtype)
    ids = _ids(shape[:-1], shape[-1])
    ours = rf.selective_log_softmax(logits, ids, temperature)
    theirs = trl_utils.selective_log_softmax(logits, ids, temperature)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, **FLOAT_TOL[dtype])


@pytest.mark.parametrize("shape", [(768,), *SHAPES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_entropy_from_logits_matches_trl(shape, dtype):
    logits = _logits(shape, dtype, scale=1.0)
    ours = rf.entropy_from_logits(logits, chunk_size=16)
    theirs = trl_utils.entropy_from_logits(logits, chunk_size=16)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, **FLOAT_TOL[dtype])


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", [*SHAPES, (4, 32, 1024), (3, 32000), (2, 151936)])
def test_half_precision_values_are_trls_bits(dtype, shape):
    """TRL's CPU path computes in the 16-bit dtype, every op rounding; the drop-ins return the
    same bits (as TRL's own tests ask of its functions, against ``logits.log_softmax(-1)`` and
    ``-(exp(lp) * lp).sum(-1)``), log-probabilities and entropy, one chunk size or another."""
    logits = _logits(shape, dtype)
    ids = _ids(shape[:-1], shape[-1])
    ours = rf.selective_log_softmax(logits, ids)
    theirs = trl_utils.selective_log_softmax(logits, ids)
    assert ours.dtype == theirs.dtype == dtype and ours.shape == theirs.shape
    assert torch.equal(ours, theirs)
    lp = logits.log_softmax(-1)
    assert torch.equal(ours, lp.gather(-1, ids.unsqueeze(-1)).squeeze(-1))

    for chunk_size in (1, 16, 128):
        h_ours = rf.entropy_from_logits(logits, chunk_size=chunk_size)
        h_theirs = trl_utils.entropy_from_logits(logits, chunk_size=chunk_size)
        assert h_ours.dtype == h_theirs.dtype == dtype
        assert torch.equal(h_ours, h_theirs)
    assert torch.equal(h_ours, -(torch.exp(lp) * lp).sum(-1))
    lp2, h2 = rf.selective_log_softmax_and_entropy(logits, ids)
    assert torch.equal(lp2, ours) and torch.equal(h2, h_theirs)


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_reads_trls_view_in_place(dtype):
    """TRL passes ``logits[:, :-1, :]``, a view whose leading dims cannot merge: the 16-bit
    path gives TRL's bits on it and reads it where it lies, its peak extra memory well under
    one copy of the view (a ``reshape(-1, V)`` of it would be a whole copy)."""
    logits = _logits((2, 257, 32000), dtype)[:, :-1, :]
    ids = _ids((2, 256), 32000)
    view_bytes = logits.numel() * logits.element_size()
    calls = {
        "selective_log_softmax": (lambda: rf.selective_log_softmax(logits, ids),
                                  lambda: trl_utils.selective_log_softmax(logits, ids)),
        "entropy_from_logits": (lambda: rf.entropy_from_logits(logits),
                                lambda: trl_utils.entropy_from_logits(logits)),
        "selective_log_softmax_and_entropy": (
            lambda: rf.selective_log_softmax_and_entropy(logits, ids),
            lambda: (trl_utils.selective_log_softmax(logits, ids),
                     trl_utils.entropy_from_logits(logits))),
    }
    for name, (ours, theirs) in calls.items():
        got, want = ours(), theirs()
        for a, b in zip(got if isinstance(got, tuple) else (got,),
                        want if isinstance(want, tuple) else (want,), strict=True):
            assert torch.equal(a, b), name
        if harness.cpu_peak_supported():
            peak = harness.peak_extra_memory(ours)
            assert peak < view_bytes // 3, (name, peak, view_bytes)
        else:
            print(f"{name}: peak memory not checked (no /proc/self/clear_refs)")


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_entropy_gradient_is_exact(dtype):
    """The 16-bit value is TRL's; the gradient is rlkern's exact one (float64 reference)."""
    logits = _logits((6, 500), dtype).requires_grad_()
    weights = torch.randn(6, dtype=torch.float64)
    (rf.entropy_from_logits(logits).double() * weights).sum().backward()
    ref = logits.detach().double().requires_grad_()
    p = ref.log_softmax(-1)
    (-(p.exp() * p).sum(-1) * weights).sum().backward()
    torch.testing.assert_close(logits.grad.double(), ref.grad.to(dtype).double(),
                               rtol=0, atol=2 * float(ref.grad.abs().max()) * 2.0**-7)


@settings(max_examples=30, deadline=None)
@given(lead=st.lists(st.integers(1, 6), min_size=1, max_size=3), vocab=st.integers(1, 3000),
       dtype=st.sampled_from(HALF), k=st.sampled_from([None, 3]), masked=st.booleans(),
       scale=st.sampled_from([0.5, 3.0, 20.0]), seed=st.integers(0, 2**16))
def test_property_half_precision_bits(lead, vocab, dtype, k, masked, scale, seed):
    logits = _logits((*lead, vocab), dtype, seed=seed, scale=scale)
    id_shape = tuple(lead) if k is None else (*lead, k)
    ids = _ids(id_shape, vocab, seed=seed + 1)
    mask = (_ids(id_shape, 2, seed=seed + 2) > 0) if masked else None
    ours = rf.selective_log_softmax(logits, ids, row_mask=mask)
    assert torch.equal(ours, trl_utils.selective_log_softmax(logits, ids, row_mask=mask))
    chunk = 1 + seed % 7
    assert torch.equal(rf.entropy_from_logits(logits, chunk),
                       trl_utils.entropy_from_logits(logits, chunk))
    if k is None:
        lp, h = rf.selective_log_softmax_and_entropy(logits, ids, row_mask=mask)
        lp_trl, h_trl = trl_utils.selective_log_softmax_and_entropy(logits, ids, row_mask=mask)
        assert torch.equal(lp, ours) and torch.equal(lp, lp_trl) and torch.equal(h, h_trl)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, *HALF])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_k_ids_per_row_with_a_mask_match_trl(dtype, mask_dtype, temperature):
    logits = _logits((3, 5, 300), dtype)
    ids = _ids((3, 5, 4), 300)
    mask = (_ids((3, 5, 4), 3, seed=7) > 0).to(mask_dtype)
    mask[1, 2] = 0  # a row whose every entry is masked
    ours = rf.selective_log_softmax(logits, ids, temperature, mask)
    theirs = trl_utils.selective_log_softmax(logits, ids, temperature, mask)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape == ids.shape
    assert bool((ours[mask == 0] == 0).all())
    if dtype in HALF and temperature == 1.0:
        assert torch.equal(ours, theirs)
    elif dtype in HALF:
        # TRL rounds logits / T to the 16-bit dtype first, the drop-in does not: compare both
        # with the exact value
        exact = _exact(logits, temperature).gather(-1, ids).masked_fill(mask == 0, 0.0)
        _assert_correctly_rounded(ours, exact, dtype, "logprobs")
        assert (ours.double() - exact).abs().max() <= (theirs.double() - exact).abs().max()
    else:
        torch.testing.assert_close(ours, theirs, **FLOAT_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("entropy_requires_grad", [True, False])
def test_selective_log_softmax_and_entropy_matches_trl(dtype, entropy_requires_grad):
    ids = _ids((4, 6), 500)
    mask = _ids((4, 6), 2, seed=3).bool()
    results = []
    for fn in (rf.selective_log_softmax_and_entropy, trl_utils.selective_log_softmax_and_entropy):
        logits = _logits((4, 6, 500), dtype).requires_grad_()
        lp, h = fn(logits, ids, entropy_requires_grad, 1.3, mask)
        assert h.requires_grad == entropy_requires_grad
        weights = _logits((2, 4, 6), dtype, seed=5)
        loss = (weights[0] * lp).sum() + ((weights[1] * h).sum() if entropy_requires_grad else 0)
        loss.backward()
        results.append((lp.detach(), h.detach(), logits.grad))
    for ours, theirs in zip(*results, strict=True):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, **FLOAT_TOL[dtype])
    assert bool((results[0][2][~mask] == 0).all())  # masked rows: no gradient


@pytest.mark.parametrize("k", [None, 3])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_gradients_match_trl(k, temperature):
    ids = _ids((2, 7) if k is None else (2, 7, k), 400)
    mask = _ids(ids.shape, 3, seed=11) > 0
    grads = []
    for fn in (rf.selective_log_softmax, trl_utils.selective_log_softmax):
        logits = _logits((2, 8, 400), torch.float32)[:, :-1, :].detach().requires_grad_()
        out = fn(logits, ids, temperature, mask)
        (_logits(ids.shape, torch.float32, seed=4) * out).sum().backward()
        grads.append(logits.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_entropy_gradient_matches_trl():
    grads = []
    for fn in (rf.entropy_from_logits, trl_utils.entropy_from_logits):
        logits = _logits((5, 3, 257), torch.float64).requires_grad_()
        (_logits((5, 3), torch.float64, seed=9) * fn(logits)).sum().backward()
        grads.append(logits.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(lead=st.lists(st.integers(1, 5), min_size=1, max_size=3), vocab=st.integers(1, 700),
       dtype=st.sampled_from([torch.float32, torch.float64]), k=st.sampled_from([None, 1, 4]),
       temperature=st.sampled_from([1.0, 0.5, 2.0]), sliced=st.booleans(),
       masked=st.booleans(), int32=st.booleans(), seed=st.integers(0, 2**16))
def test_property_matches_trl(lead, vocab, dtype, k, temperature, sliced, masked, int32, seed):
    """Any leading shape, vocab size (1 included), K, strided logits (TRL's ``[:, :-1]``-like
    slice of the first dim), int32 ids, masks."""
    shape = (*lead, vocab)
    logits = _logits((lead[0] + 1, *shape[1:]), dtype, seed=seed)[:-1] if sliced else \
        _logits(shape, dtype, seed=seed)
    id_shape = tuple(lead) if k is None else (*lead, k)
    ids = _ids(id_shape, vocab, seed=seed + 1, dtype=torch.int32 if int32 else torch.int64)
    mask = (_ids(id_shape, 2, seed=seed + 2) > 0) if masked else None
    ours = rf.selective_log_softmax(logits, ids, temperature, mask)
    theirs = trl_utils.selective_log_softmax(logits, ids.long(), temperature, mask)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, **FLOAT_TOL[dtype])
    if k is None:
        h = rf.entropy_from_logits(logits / temperature)
        torch.testing.assert_close(h, trl_utils.entropy_from_logits(logits / temperature),
                                   **FLOAT_TOL[dtype])


def test_result_dtype_follows_trls_kernel_rule():
    """``_trl_dtype`` against TRL's own ``_supports_trl_loss_kernel`` on stand-ins for CUDA, XPU
    and CPU tensors (no GPU here): float32 exactly where TRL's fused kernel would serve."""
    def fake(device, dtype, shape, stride_last=1):
        return SimpleNamespace(device=torch.device(device), dtype=dtype, shape=torch.Size(shape),
                               ndim=len(shape), stride=lambda dim: stride_last)

    checked = 0
    for device in ("cuda", "xpu", "cpu"):
        for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
            for shape in ((7,), (2, 7), (2, 3, 7), (2, 2, 3, 7), (2, 0)):
                for stride_last in (1, 2):
                    logits = fake(device, dtype, shape, stride_last)
                    index_cases = [None, fake(device, torch.int64, shape[:-1]),
                                   fake(device, torch.int32, shape[:-1]),
                                   fake(device, torch.int64, (*shape[:-1], 3)),
                                   fake("cpu", torch.int64, shape[:-1]),
                                   fake(device, torch.int16, shape[:-1])]
                    for index in index_cases:
                        masks = [None] if index is None else [
                            None, fake(device, torch.bool, index.shape),
                            fake(device, torch.float32, index.shape),
                            fake(device, torch.bool, (1,) * len(index.shape))]
                        for mask in masks:
                            served = trl_utils._supports_trl_loss_kernel(logits, index, mask)
                            want = torch.float32 if served else dtype
                            assert rf._trl_dtype(logits, index, mask) == want
                            checked += 1
    assert checked > 1000


def test_errors():
    logits = _logits((2, 3, 10), torch.float32)
    ids = _ids((2, 3), 10)
    for fn in (rf.selective_log_softmax, trl_utils.selective_log_softmax):
        with pytest.raises(ValueError, match="temperature must be positive"):
            fn(logits, ids, 0.0)
    with pytest.raises(ValueError, match="temperature must be positive"):
        rf.selective_log_softmax_and_entropy(logits, ids, temperature=-1.0)
    with pytest.raises(ValueError, match="index must have shape"):
        rf.selective_log_softmax(logits, ids[:, :2])
    with pytest.raises(ValueError, match="index must have shape"):
        rf.selective_log_softmax_and_entropy(logits, ids.unsqueeze(-1))
    with pytest.raises(ValueError, match="empty vocab dim"):
        rf.entropy_from_logits(torch.zeros(2, 0))
    assert rf.entropy_from_logits(torch.zeros(0, 0)).shape == (0,)
    with pytest.raises(ValueError, match="does not broadcast"):
        rf.selective_log_softmax(logits, ids, row_mask=torch.ones(3, 2))
    # TRL's gather refuses -100 (rlkern's default ignore_index): so does the drop-in, instead
    # of returning 0
    bad = ids.clone()
    bad[0, 0] = -100
    with pytest.raises(RuntimeError):
        trl_utils.selective_log_softmax(logits, bad)
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        rf.selective_log_softmax(logits, bad)
    bad[0, 0] = 10
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        rf.selective_log_softmax(logits, bad)
    # ...unless the row is masked: then it is not read, as in TRL's fused kernel
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[0, 0] = False
    out = rf.selective_log_softmax(logits, bad, row_mask=mask)
    assert out[0, 0] == 0 and torch.isfinite(out).all()


def test_computed_by_rlkern_not_by_trl(monkeypatch):
    """The drop-ins run rlkern's fold; they never call TRL's formula."""
    calls = []
    real = _fold_module.token_logprobs
    monkeypatch.setattr(_fold_module, "token_logprobs",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    logits = _logits((2, 3, 50), torch.bfloat16)
    ids = _ids((2, 3), 50)
    rf.selective_log_softmax(logits, ids)
    rf.selective_log_softmax(logits, _ids((2, 3, 2), 50))
    rf.entropy_from_logits(logits)
    rf.selective_log_softmax_and_entropy(logits, ids)
    assert len(calls) == 4


def test_patch_and_unpatch_trainer_utils(monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    loss_utils = importlib.import_module("trl.experimental.sdpo.loss_utils")
    originals = {n: getattr(trl_utils, n) for n in
                 ("selective_log_softmax", "entropy_from_logits",
                  "selective_log_softmax_and_entropy")}
    assert loss_utils.selective_log_softmax is originals["selective_log_softmax"]
    patched = rf.patch_trainer_utils()
    try:
        for name in originals:
            assert getattr(trl_utils, name) is getattr(rf, name)
            assert f"trl.trainer.utils.{name}" in patched
        assert loss_utils.selective_log_softmax is rf.selective_log_softmax
        assert "trl.experimental.sdpo.loss_utils.selective_log_softmax" in patched
        assert rf.patch_trainer_utils() == patched  # idempotent
        # TRL code calling the patched name: SDPO's sampled-token distillation loss
        student = _logits((2, 5, 64), torch.float32, seed=1)
        teacher = _logits((2, 5, 64), torch.float32, seed=2)
        ids = _ids((2, 5), 64)
        ours = loss_utils.compute_sampled_token_self_distillation_loss(
            student, teacher, ids, distillation_alpha=1.0)
    finally:
        rf.unpatch_trainer_utils()
    for name, fn in originals.items():
        assert getattr(trl_utils, name) is fn
    assert loss_utils.selective_log_softmax is originals["selective_log_softmax"]
    theirs = loss_utils.compute_sampled_token_self_distillation_loss(
        student, teacher, ids, distillation_alpha=1.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=2e-6)
    assert "trl.experimental.sdpo.loss_utils" in sys.modules



@pytest.mark.parametrize("trl_view", [False, True])
@pytest.mark.parametrize("negative_rows", [False, True])
def test_compiles_without_graph_breaks(negative_rows, trl_view):
    """``torch.compile(fullgraph=True)`` of the drop-ins, 16-bit roundings included (their row
    max takes no data-dependent branch in a graph): TRL's bits, on contiguous logits and on
    TRL's ``logits[:, :-1, :]`` view (read in place, so the compiled graph sees its strides)."""
    logits = _logits((2, 4 if trl_view else 3, 50), torch.bfloat16, seed=2)
    if trl_view:
        logits = logits[:, :-1, :]
        assert not logits.is_contiguous()
    if negative_rows:
        logits = -logits.abs() - 0.25
    ids = _ids((2, 3), 50)
    compiled = torch.compile(rf.selective_log_softmax_and_entropy, backend="aot_eager",
                             fullgraph=True)
    lp, h = compiled(logits, ids)
    assert torch.equal(lp, trl_utils.selective_log_softmax(logits, ids))
    assert torch.equal(h, rf.entropy_from_logits(logits))


@pytest.mark.parametrize("dtype", HALF)
def test_compiled_gradient_through_trls_view_is_the_eager_one(dtype):
    """The backward of the compiled drop-in, taken through TRL's ``logits[:, :-1, :]`` view of a
    leaf: the eager call's gradient bit for bit, and zero in the sliced-off last position."""
    base = _logits((2, 5, 40), dtype, seed=3)
    ids = _ids((2, 4), 40, seed=5)
    weights = torch.randn(2, 4)

    def loss(fn, leaf):
        lp, h = fn(leaf[:, :-1, :], ids)
        return ((lp.float() + 0.5 * h.float()) * weights).sum()

    compiled = torch.compile(rf.selective_log_softmax_and_entropy, backend="aot_eager",
                             fullgraph=True)
    grads = []
    for fn in (compiled, rf.selective_log_softmax_and_entropy):
        leaf = base.clone().requires_grad_()
        loss(fn, leaf).backward()
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])
    assert torch.count_nonzero(grads[0][:, -1, :]) == 0
    assert torch.count_nonzero(grads[0][:, :-1, :]) > 0


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_non_finite_logits_as_trl(dtype):
    """A label whose logit is −inf: −inf, as TRL (16-bit roundings included), with a finite
    gradient; a row holding NaN: NaN. The entropy of a row with −inf logits is finite (TRL's
    formula gives NaN there: 0·(−inf))."""
    logits = _logits((2, 3, 10), dtype, seed=4)
    logits[0, 1, :5] = float("-inf")
    logits[1, 2, 4] = float("nan")
    ids = _ids((2, 3), 10, seed=6)
    ids[0, 1] = 2  # a label at −inf
    ids[0, 2] = 7
    ours = rf.selective_log_softmax(logits, ids)
    theirs = trl_utils.selective_log_softmax(logits, ids)
    assert ours[0, 1] == float("-inf") and theirs[0, 1] == float("-inf")
    assert torch.isnan(ours[1, 2]) and torch.isnan(theirs[1, 2])
    finite = torch.isfinite(theirs)
    torch.testing.assert_close(ours[finite].double(), theirs[finite].double(), rtol=2e-6,
                               atol=2e-6 if dtype == torch.float32 else 0.0)
    leaf = logits.clone().requires_grad_()
    rf.selective_log_softmax(leaf, ids)[0].sum().backward()
    assert torch.isfinite(leaf.grad[0]).all()
    entropy = rf.entropy_from_logits(logits)
    assert torch.isfinite(entropy[0]).all() and torch.isnan(entropy[1, 2])
    kept = logits[0, 1, 5:].double().log_softmax(-1)
    torch.testing.assert_close(entropy[0, 1].double(), -(kept.exp() * kept).sum(),
                               rtol=1e-2 if dtype in HALF else 1e-6, atol=0.0)
