"""token_logprobs on the compiled CPU backend (and the torch reference) against float64 truth.

The Triton kernels are tested in test_logprobs_triton.py (interpreter) and test_aot.py (compiled
for sm_80/sm_90), the CUDA sources in test_cuda_compile.py (nvcc) and test_cuda_emulation.py
(executed on CPU in an emulation of the CUDA execution model).
"""

from __future__ import annotations

import pytest
import torch

import rlkern
from conftest import assert_close_grad, assert_close_rows
from rlkern.reference import token_logprobs_reference

CPU_BACKENDS = ["cpu", "torch"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
FIELDS = ("logprobs", "entropy", "lse", "self_certainty", "sum_p_sq")


def make_inputs(shape, dtype, *, scale=3.0, ignore_frac=0.2, ignore_index=-100):
    vocab = shape[-1]
    logits = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, vocab, shape[:-1])
    labels[torch.rand(shape[:-1]) < ignore_frac] = ignore_index
    return logits, labels


def reference(logits, labels, **kw):
    """Float64 truth on the same rounded inputs."""
    return token_logprobs_reference(logits.double(), labels, **kw)


def check_forward(out, ref, dtype, *, entropy=True, stats=True):
    assert_close_rows(out.logprobs, ref["logprobs"], dtype, "logprobs")
    assert_close_rows(out.lse, ref["lse"], dtype, "lse")
    if entropy:
        assert_close_rows(out.entropy, ref["entropy"], dtype, "entropy")
    if stats:
        assert_close_rows(out.self_certainty, ref["self_certainty"], dtype, "self_certainty")
        assert_close_rows(out.sum_p_sq, ref["sum_p_sq"], dtype, "sum_p_sq")


# ------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 3, 99, 4097, 32000])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.5])
def test_forward_matches_reference(backend, dtype, vocab, temperature):
    logits, labels = make_inputs((7, vocab), dtype)
    out = rlkern.token_logprobs(logits, labels, temperature=temperature, return_entropy=True,
                                return_stats=True, backend=backend)
    assert out.logprobs.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.logprobs.shape == labels.shape
    check_forward(out, reference(logits, labels, temperature=temperature), dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_vocab_151936_bf16(backend):
    logits, labels = make_inputs((3, 151936), torch.bfloat16, scale=4.0, ignore_frac=0.0)
    out = rlkern.token_logprobs(logits, labels, return_entropy=True, return_stats=True,
                                backend=backend)
    check_forward(out, reference(logits, labels), torch.bfloat16)


def test_optional_fields_are_none_unless_asked():
    logits, labels = make_inputs((4, 50), torch.float32)
    out = rlkern.token_logprobs(logits, labels)
    assert out.entropy is None and out.self_certainty is None and out.sum_p_sq is None
    assert out.lse is not None
    out = rlkern.token_logprobs(logits, labels, return_stats=True)
    assert out.entropy is None and out.self_certainty is not None and out.sum_p_sq is not None
    # Each flag on its own gives the same values as all flags together.
    full = rlkern.token_logprobs(logits, labels, return_entropy=True, return_stats=True)
    assert torch.equal(out.logprobs, full.logprobs)
    assert torch.equal(out.sum_p_sq, full.sum_p_sq)
    ent = rlkern.token_logprobs(logits, labels, return_entropy=True)
    assert torch.equal(ent.entropy, full.entropy)


def test_confident_rows_have_small_errors():
    """A near-one-hot row (logprob ~ -1e-8, lse = 25): the error stays at the fp32 resolution
    of 1 (1e-7), not of lse (2e-6), because z_y − lse is formed without rounding lse first."""
    logits = torch.zeros(2, 1000)
    logits[:, 5] = 25.0
    labels = torch.tensor([5, 6])
    out = rlkern.token_logprobs(logits, labels, return_entropy=True)
    ref = reference(logits, labels)
    torch.testing.assert_close(out.logprobs.double(), ref["logprobs"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.entropy.double(), ref["entropy"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layouts_without_copy(backend, dtype):
    """(B, L, V), TRL's logits[:, :-1, :], a transposed batch, a 4-D tensor."""
    full, ids = make_inputs((3, 9, 777), dtype)
    cases = {
        "3d": (full, ids),
        "trl_shifted_view": (full[:, :-1, :], ids[:, 1:]),
        "transposed": (full.transpose(0, 1), ids.transpose(0, 1)),
        "4d": (full.view(3, 3, 3, 777), ids.view(3, 3, 3)),
        "int32_labels": (full, ids.to(torch.int32)),
    }
    for name, (logits, labels) in cases.items():
        out = rlkern.token_logprobs(logits, labels, return_entropy=True, backend=backend)
        assert out.logprobs.shape == labels.shape, name
        ref = reference(logits, labels.long())
        assert_close_rows(out.logprobs, ref["logprobs"], dtype, name)
        assert_close_rows(out.entropy, ref["entropy"], dtype, name)


def test_64bit_offsets():
    """Rows that start past element 2^31 of their storage are read at the right place."""
    vocab = 1000
    base = torch.empty(2**31 + 3 * vocab, dtype=torch.bfloat16)  # pages are touched lazily
    rows = torch.randn(2, vocab).bfloat16()
    big = base.as_strided((2, 1, vocab), (2**31 + vocab, vocab, 1))
    big[:, 0].copy_(rows)
    labels = torch.tensor([[3], [999]])
    out = rlkern.token_logprobs(big, labels, return_entropy=True)
    ref = reference(rows.view(2, 1, vocab), labels)
    assert_close_rows(out.logprobs, ref["logprobs"], torch.bfloat16)
    assert_close_rows(out.entropy, ref["entropy"], torch.bfloat16)


# ------------------------------------------------------------------------ ignore / -inf


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ignore_index_rows_are_zero(backend):
    logits, labels = make_inputs((6, 40), torch.float32, ignore_frac=0.0)
    labels[1] = -1
    labels[4] = -1
    logits.requires_grad_()
    out = rlkern.token_logprobs(logits, labels, ignore_index=-1, return_entropy=True,
                                return_stats=True, backend=backend)
    for field in FIELDS:
        values = getattr(out, field)
        assert torch.all(values[[1, 4]] == 0), field
        assert torch.all(values[[0, 2, 3, 5]] != 0), field
    (out.logprobs.sum() + out.entropy.sum() + out.lse.sum()).backward()
    assert torch.all(logits.grad[[1, 4]] == 0)
    assert torch.all(logits.grad[[0, 2]].abs().sum(-1) > 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_masked_vocab_neg_inf(backend, dtype):
    logits, labels = make_inputs((5, 300), dtype, ignore_frac=0.0)
    logits[:, ::3] = float("-inf")
    labels = (labels // 3) * 3 + 1  # labels on unmasked entries
    logits.requires_grad_()
    out = rlkern.token_logprobs(logits, labels, return_entropy=True, return_stats=True,
                                backend=backend)
    ref = reference(logits.detach(), labels)
    check_forward(out, ref, dtype, stats=False)
    assert torch.all(torch.isposinf(out.self_certainty))  # mean z = -inf: KL(U||p) is infinite
    assert_close_rows(out.sum_p_sq, ref["sum_p_sq"], dtype)
    (out.logprobs.sum() + 0.5 * out.entropy.sum()).backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.all(logits.grad[:, ::3] == 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_all_neg_inf_row_raises_in_checked_mode(backend):
    logits, labels = make_inputs((3, 20), torch.float32, ignore_frac=0.0)
    logits[1] = float("-inf")
    with pytest.raises(ValueError, match=r"row 1 .*all -inf"):
        rlkern.token_logprobs(logits, labels, backend=backend)
    labels[1] = -100  # an ignored all -inf row is fine
    out = rlkern.token_logprobs(logits, labels, backend=backend)
    assert out.logprobs[1] == 0
    rlkern.set_checks(False)
    try:
        labels[1] = 0
        out = rlkern.token_logprobs(logits, labels, backend=backend)
        assert torch.isneginf(out.lse[1]) and torch.isfinite(out.lse[[0, 2]]).all()
    finally:
        rlkern.set_checks(True)


def test_nan_logits_propagate_to_their_row_only():
    logits, labels = make_inputs((3, 100), torch.float32, ignore_frac=0.0)
    logits[1, 17] = float("nan")
    out = rlkern.token_logprobs(logits, labels, return_entropy=True)
    assert torch.isnan(out.logprobs[1]) and torch.isnan(out.entropy[1])
    assert torch.isfinite(out.logprobs[[0, 2]]).all()


# ------------------------------------------------------------------------------ backward


def _weighted(out, w_lp, w_ent, w_lse):
    return (out["logprobs"] * w_lp).sum() + (out["entropy"] * w_ent).sum() + (
        out["lse"] * w_lse).sum()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [3, 99, 5000])
def test_backward_matches_reference(backend, dtype, vocab):
    logits, labels = make_inputs((2, 4, vocab), dtype)
    w = [torch.randn(2, 4) for _ in range(3)]
    x = logits.clone().requires_grad_()
    out = rlkern.token_logprobs(x, labels, temperature=0.8, return_entropy=True,
                                backend=backend)
    _weighted(out._asdict(), *w).backward()
    x64 = logits.double().requires_grad_()
    _weighted(token_logprobs_reference(x64, labels, temperature=0.8), *w).backward()
    assert x.grad.dtype == dtype
    assert_close_grad(x.grad, x64.grad, dtype, "grad_logits")


@pytest.mark.parametrize("which", ["logprobs", "entropy", "lse"])
def test_backward_each_output_alone(which):
    logits, labels = make_inputs((5, 64), torch.float32)
    x = logits.clone().requires_grad_()
    getattr(rlkern.token_logprobs(x, labels, return_entropy=True), which).sum().backward()
    x64 = logits.double().requires_grad_()
    token_logprobs_reference(x64, labels)[which].sum().backward()
    assert_close_grad(x.grad, x64.grad, torch.float32, which)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_writes_into_logits(backend, dtype):
    logits, labels = make_inputs((3, 5, 301), dtype)
    expected_x = logits.clone().requires_grad_()
    out = rlkern.token_logprobs(expected_x, labels, return_entropy=True, backend=backend)
    (out.logprobs.sum() + out.entropy.sum()).backward()

    leaf = logits.clone().requires_grad_()
    buffer = leaf * 1.0  # a non-leaf (like lm_head output) that the gradient may overwrite
    buffer.retain_grad()
    out = rlkern.token_logprobs(buffer, labels, return_entropy=True, inplace_backward=True,
                                backend=backend)
    (out.logprobs.sum() + out.entropy.sum()).backward()
    assert torch.equal(buffer.grad, expected_x.grad)
    # The gradient was written over the logits buffer itself (no new (N, V) allocation).
    assert torch.equal(buffer.detach(), expected_x.grad)
    torch.testing.assert_close(leaf.grad, expected_x.grad)


def test_inplace_backward_on_strided_view():
    full, ids = make_inputs((2, 6, 129), torch.float32)
    expected = full.clone().requires_grad_()
    rlkern.token_logprobs(expected[:, :-1], ids[:, 1:]).logprobs.sum().backward()
    leaf = full.clone().requires_grad_()
    shifted = (leaf * 1.0)[:, :-1]
    rlkern.token_logprobs(shifted, ids[:, 1:], inplace_backward=True).logprobs.sum().backward()
    torch.testing.assert_close(leaf.grad, expected.grad)


def test_gradcheck_float64():
    logits = torch.randn(3, 2, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, -100], [6, 0], [3, 3]])

    def fn(x):
        out = rlkern.token_logprobs(x, labels, temperature=0.7, return_entropy=True)
        return out.logprobs, out.entropy, out.lse

    assert torch.autograd.gradcheck(fn, (logits,))
    assert torch.autograd.gradgradcheck is not None  # second order is not supported (documented)


def test_stats_are_not_differentiable():
    logits, labels = make_inputs((2, 10), torch.float32)
    out = rlkern.token_logprobs(logits.requires_grad_(), labels, return_stats=True)
    assert not out.self_certainty.requires_grad and not out.sum_p_sq.requires_grad
    assert out.logprobs.requires_grad


# ------------------------------------------------------------------------ invariance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_invariance_bitwise(dtype):
    logits, labels = make_inputs((33, 3001), dtype)
    batch = rlkern.token_logprobs(logits, labels, return_entropy=True, return_stats=True)
    for r in [0, 7, 32]:
        alone = rlkern.token_logprobs(logits[r:r + 1], labels[r:r + 1], return_entropy=True,
                                      return_stats=True)
        for field in FIELDS:
            assert torch.equal(getattr(alone, field)[0], getattr(batch, field)[r]), field
    # Different thread counts split rows differently; results must not change.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = rlkern.token_logprobs(logits, labels, return_entropy=True, return_stats=True)
    finally:
        torch.set_num_threads(threads)
    for field in FIELDS:
        assert torch.equal(getattr(single, field), getattr(batch, field)), field


def test_backward_batch_invariance_bitwise():
    logits, labels = make_inputs((9, 1000), torch.bfloat16)
    x = logits.clone().requires_grad_()
    rlkern.token_logprobs(x, labels, return_entropy=True).entropy.sum().backward()
    x1 = logits[4:5].clone().requires_grad_()
    rlkern.token_logprobs(x1, labels[4:5], return_entropy=True).entropy.sum().backward()
    assert torch.equal(x1.grad[0], x.grad[4])


# -------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    logits, labels = make_inputs((4, 10), torch.float32, ignore_frac=0.0)
    with pytest.raises(TypeError, match="logits must be bfloat16"):
        rlkern.token_logprobs(logits.long(), labels)
    with pytest.raises(TypeError, match="labels must be int32 or int64"):
        rlkern.token_logprobs(logits, labels.float())
    with pytest.raises(ValueError, match=r"labels must have shape .*\(4,\)"):
        rlkern.token_logprobs(logits, labels[:3])
    with pytest.raises(ValueError, match="logits must have shape"):
        rlkern.token_logprobs(logits[0], labels[0])
    with pytest.raises(ValueError, match="contiguous along the vocab"):
        rlkern.token_logprobs(logits.t().contiguous().t(), labels)
    for bad_t in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            rlkern.token_logprobs(logits, labels, temperature=bad_t)
    with pytest.raises(ValueError, match="backend must be one of"):
        rlkern.token_logprobs(logits, labels, backend="gpu")
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        rlkern.token_logprobs(logits, labels, backend="cuda")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [10, 11, -1, -101])
def test_label_out_of_range_raises(backend, bad):
    logits, labels = make_inputs((4, 10), torch.float32, ignore_frac=0.0)
    labels[2] = bad
    with pytest.raises(ValueError, match=rf"labels: value {bad} at flat position 2"):
        rlkern.token_logprobs(logits, labels, backend=backend)


def test_label_out_of_range_unchecked_gives_nan_without_reading():
    logits, labels = make_inputs((4, 10), torch.float32, ignore_frac=0.0)
    labels[2] = 10**12  # would be far outside the allocation if it were read
    rlkern.set_checks(False)
    try:
        out = rlkern.token_logprobs(logits, labels)
    finally:
        rlkern.set_checks(True)
    assert torch.isnan(out.logprobs[2]) and torch.isfinite(out.logprobs[[0, 1, 3]]).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 10), (2, 0, 10), (0, 5, 7)])
def test_empty_inputs_give_empty_outputs(backend, shape):
    logits = torch.randn(shape, requires_grad=True)
    labels = torch.zeros(shape[:-1], dtype=torch.long)
    out = rlkern.token_logprobs(logits, labels, return_entropy=True, return_stats=True,
                                backend=backend)
    for field in FIELDS:
        assert getattr(out, field).shape == shape[:-1]
    (out.logprobs.sum() + out.entropy.sum()).backward()
    assert logits.grad.shape == shape


def test_zero_vocab_with_labels_raises():
    with pytest.raises(ValueError, match="empty vocab"):
        rlkern.token_logprobs(torch.randn(3, 0), torch.zeros(3, dtype=torch.long))
