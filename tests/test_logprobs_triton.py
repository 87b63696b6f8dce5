"""token_logprobs on the Triton backend (kernels/logprobs.py) against the float64 reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors: the real kernel code,
executed by numpy. With CUDA the same tests run the compiled kernels on CUDA tensors.

Tolerances are the shared per-dtype table of conftest.py, judged against the float64
reference evaluated on the same (already rounded) inputs:

    per-row outputs (ROW_TOL, rtol / atol):  fp32 1e-5 / 1e-5,  bf16 and fp16 1e-4 / 1e-4,
                                             fp64 1e-10 / 1e-10
    logit gradients (GRAD_TOL, stored in the logits dtype, so their error is that dtype's
    rounding):  fp32 2e-5,  bf16 8e-3,  fp16 2e-3,  fp64 1e-10

Shapes are small because the interpreter is slow: the whole file runs in well under a minute
on two CPU cores.
"""

from __future__ import annotations

import os

import torch

# Triton decides between compiling and interpreting when a kernel is decorated, so the
# interpreter must be on before anything imports rlkern.kernels.logprobs (conftest.py does
# the same; repeated here so the file also runs on its own).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import rlkern
from conftest import assert_close_grad, assert_close_rows
from rlkern.reference import token_logprobs_reference

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FIELDS = ("logprobs", "entropy", "lse", "self_certainty", "sum_p_sq")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

pytestmark = [
    # The interpreter evaluates −inf arithmetic in lanes the kernel then discards with
    # tl.where (e.g. padding lanes); numpy warns about those, harmlessly.
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
    pytest.mark.skipif(
        DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
        reason="Triton on CPU tensors needs TRITON_INTERPRET=1 before rlkern is imported",
    ),
]


def make_inputs(shape, dtype, *, scale=3.0, ignore_frac=0.2, ignore_index=-100):
    vocab = shape[-1]
    logits = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(DEVICE)
    labels = torch.randint(0, vocab, shape[:-1])
    labels[torch.rand(shape[:-1]) < ignore_frac] = ignore_index
    return logits, labels.to(DEVICE)


def triton_logprobs(logits, labels, **kw):
    return rlkern.token_logprobs(logits, labels, backend="triton", **kw)


def reference(logits, labels, **kw):
    """Float64 truth on the same rounded inputs."""
    return token_logprobs_reference(logits.double(), labels, **kw)


def check_forward(out, ref, dtype, *, entropy=True, stats=True, what=""):
    fields = ["logprobs", "lse"] + ["entropy"] * entropy + ["self_certainty", "sum_p_sq"] * stats
    for field in fields:
        assert_close_rows(getattr(out, field), ref[field], dtype, f"{what} {field}")


def weighted_loss(out, weights):
    """Σ_k w_k · output_k over the differentiable outputs named in ``weights``."""
    get = out.__getitem__ if isinstance(out, dict) else out.__getattribute__
    return sum((get(name) * w).sum() for name, w in weights.items())


def reference_grad(logits, labels, weights, **kw):
    """d(weighted_loss)/d(logits) of the float64 reference. −inf logits are replaced by a
    finite value so small that p = 0 exactly in float64: the reference's autograd would
    otherwise give NaN through 0·(−inf), where the true gradient (the limit) is 0."""
    x64 = logits.detach().double()
    x64 = torch.where(torch.isneginf(x64), torch.full_like(x64, -1e6), x64).requires_grad_()
    weighted_loss(token_logprobs_reference(x64, labels, **kw), weights).backward()
    return x64.grad


# ------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 3, 99, 1000])
def test_forward_matches_reference(dtype, vocab):
    logits, labels = make_inputs((6, vocab), dtype)
    out = triton_logprobs(logits, labels, temperature=0.7, return_entropy=True,
                          return_stats=True)
    assert out.logprobs.dtype == torch.float32 and out.logprobs.shape == labels.shape
    check_forward(out, reference(logits, labels, temperature=0.7), dtype)


def test_forward_float64():
    """fp64 logits accumulate in fp64; 1/T travels as two fp32 halves, so the result keeps
    (nearly) double precision despite Triton's fp32 scalar arguments."""
    logits, labels = make_inputs((5, 2, 77), torch.float64)
    out = triton_logprobs(logits, labels, temperature=0.3, return_entropy=True,
                          return_stats=True)
    assert out.logprobs.dtype == torch.float64
    check_forward(out, reference(logits, labels, temperature=0.3), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_several_chunks_with_growing_max(dtype):
    """V = 9000 spans three 4096-wide chunks. Ascending logits make every chunk raise the
    running max (each segment summary is rescaled every iteration); descending ones never do."""
    ramp = torch.linspace(-8.0, 8.0, 9000, dtype=torch.float64)
    noise = torch.randn(4, 9000, dtype=torch.float64)
    logits = torch.stack([ramp, ramp.flip(0), noise[2] * 4, noise[3] * 0.01])
    logits = logits.to(dtype).to(DEVICE)
    labels = torch.tensor([8999, 0, 4500, 123], device=DEVICE)
    out = triton_logprobs(logits, labels, temperature=0.9, return_entropy=True,
                          return_stats=True)
    check_forward(out, reference(logits, labels, temperature=0.9), dtype)


@pytest.mark.parametrize("temperature", [0.05, 0.6, 1.0, 2.5])
def test_temperatures(temperature):
    logits, labels = make_inputs((7, 99), torch.float32, scale=1.0)
    out = triton_logprobs(logits, labels, temperature=temperature, return_entropy=True,
                          return_stats=True)
    check_forward(out, reference(logits, labels, temperature=temperature), torch.float32)


def test_confident_rows_have_small_errors():
    """A near-one-hot row (logprob ≈ −1e-8, lse = 25): logp is formed from x_y − max x, so its
    error stays at the fp32 resolution of 1, not of lse."""
    logits = torch.zeros(2, 1000, device=DEVICE)
    logits[:, 5] = 25.0
    labels = torch.tensor([5, 6], device=DEVICE)
    out = triton_logprobs(logits, labels, return_entropy=True)
    ref = reference(logits, labels)
    torch.testing.assert_close(out.logprobs.double(), ref["logprobs"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.entropy.double(), ref["entropy"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layouts_without_copy(dtype):
    """(N, V), (B, L, V), TRL's logits[:, :-1, :], a transposed batch, padded rows."""
    full, ids = make_inputs((3, 9, 131), dtype)
    padded = make_inputs((9, 140), dtype)[0][:, :131]  # row stride 140, not 16-aligned
    cases = {
        "2d": (full[0], ids[0]),
        "3d": (full, ids),
        "trl_shifted_view": (full[:, :-1, :], ids[:, 1:]),
        "transposed": (full.transpose(0, 1), ids.transpose(0, 1)),
        "padded_rows": (padded, ids[0]),
    }
    for name, (logits, labels) in cases.items():
        out = triton_logprobs(logits, labels, return_entropy=True)
        assert out.logprobs.shape == labels.shape, name
        check_forward(out, reference(logits, labels), dtype, stats=False, what=name)


def test_optional_outputs_do_not_change_the_others():
    logits, labels = make_inputs((5, 300), torch.float32)
    plain = triton_logprobs(logits, labels)
    assert plain.entropy is None and plain.self_certainty is None and plain.sum_p_sq is None
    stats = triton_logprobs(logits, labels, return_stats=True)
    assert stats.entropy is None and stats.sum_p_sq is not None
    full = triton_logprobs(logits, labels, return_entropy=True, return_stats=True)
    check_forward(full, reference(logits, labels), torch.float32)
    for out in (plain, stats):
        assert_close_rows(out.logprobs, full.logprobs, torch.float32, "logprobs")
        assert_close_rows(out.lse, full.lse, torch.float32, "lse")


# ------------------------------------------------------------------------ ignore / -inf


@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_ignore_index_rows_are_zero(ignore_index):
    """Ignored rows give 0 everywhere and a zero gradient row, even when ignore_index is a
    valid vocabulary id (2) and even when their logits are NaN (they must not be read)."""
    logits, labels = make_inputs((6, 40), torch.float32, ignore_frac=0.0)
    labels[labels == ignore_index] = 0
    labels[[1, 4]] = ignore_index
    logits[1] = float("nan")
    x = logits.clone().requires_grad_()
    out = triton_logprobs(x, labels, ignore_index=ignore_index, return_entropy=True,
                          return_stats=True)
    for field in FIELDS:
        values = getattr(out, field)
        assert torch.all(values[[1, 4]] == 0), field
        assert torch.isfinite(values).all() and torch.all(values[[0, 2, 3, 5]] != 0), field
    weights = {"logprobs": torch.randn(6, device=DEVICE), "entropy": torch.randn(6, device=DEVICE),
               "lse": torch.randn(6, device=DEVICE)}
    weighted_loss(out, weights).backward()
    assert torch.all(x.grad[[1, 4]] == 0)
    valid = [0, 2, 3, 5]
    expected = reference_grad(logits[valid], labels[valid],
                              {k: w[valid] for k, w in weights.items()},
                              ignore_index=ignore_index)
    assert_close_grad(x.grad[valid], expected, torch.float32, "grad_logits")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_vocab_neg_inf(dtype):
    logits, labels = make_inputs((5, 300), dtype, ignore_frac=0.0)
    logits[:, ::3] = float("-inf")
    logits[2, :150] = float("-inf")  # a whole first half masked: segments that stay empty
    logits[3] -= 300.0  # far below 0: an empty summary must not be rescaled by 2^(0 − m₂)
    labels = (labels // 3) * 3 + 1  # labels on unmasked entries
    labels[2] = 250
    x = logits.clone().requires_grad_()
    out = triton_logprobs(x, labels, return_entropy=True, return_stats=True)
    ref = reference(logits, labels)
    check_forward(out, ref, dtype, stats=False)
    assert torch.all(torch.isposinf(out.self_certainty))  # mean z = −inf: KL(U‖p) is infinite
    assert_close_rows(out.sum_p_sq, ref["sum_p_sq"], dtype, "sum_p_sq")
    weights = {"logprobs": torch.randn(5, device=DEVICE),
               "entropy": torch.randn(5, device=DEVICE) * 3}
    weighted_loss(out, weights).backward()
    assert torch.isfinite(x.grad).all()
    assert torch.all(x.grad[torch.isneginf(logits)] == 0)
    assert_close_grad(x.grad, reference_grad(logits, labels, weights), dtype, "grad_logits")


def test_all_neg_inf_row():
    logits, labels = make_inputs((3, 20), torch.float32, ignore_frac=0.0)
    logits[1] = float("-inf")
    with pytest.raises(ValueError, match=r"row 1 .*all -inf"):
        triton_logprobs(logits, labels)
    rlkern.set_checks(False)
    try:
        out = triton_logprobs(logits, labels)
    finally:
        rlkern.set_checks(True)
    assert torch.isneginf(out.lse[1]) and torch.isfinite(out.lse[[0, 2]]).all()


def test_nan_logits_propagate_to_their_row_only():
    logits, labels = make_inputs((3, 100), torch.float32, ignore_frac=0.0)
    logits[1, 17] = float("nan")
    out = triton_logprobs(logits, labels, return_entropy=True)
    assert torch.isnan(out.logprobs[1]) and torch.isnan(out.entropy[1])
    assert torch.isfinite(out.logprobs[[0, 2]]).all()


@pytest.mark.parametrize("bad", [20, 10**12, -1, -101])
def test_label_out_of_range(bad):
    """Checked: a clear error. Unchecked: NaN for that row, nothing read out of bounds, and
    the backward runs (the label matches no column)."""
    logits, labels = make_inputs((4, 20), torch.float32, ignore_frac=0.0)
    labels[2] = bad
    with pytest.raises(ValueError, match=rf"labels: value {bad} at flat position 2"):
        triton_logprobs(logits, labels)
    rlkern.set_checks(False)
    try:
        x = logits.clone().requires_grad_()
        out = triton_logprobs(x, labels, return_entropy=True)
        out.entropy.sum().backward()
    finally:
        rlkern.set_checks(True)
    assert torch.isnan(out.logprobs[2]) and torch.isfinite(out.logprobs[[0, 1, 3]]).all()
    assert torch.isfinite(x.grad).all()


def test_empty_inputs():
    logits = torch.randn(2, 0, 10, device=DEVICE, requires_grad=True)
    labels = torch.zeros(2, 0, dtype=torch.long, device=DEVICE)
    out = triton_logprobs(logits, labels, return_entropy=True, return_stats=True)
    for field in FIELDS:
        assert getattr(out, field).shape == (2, 0)
    (out.logprobs.sum() + out.entropy.sum()).backward()
    assert logits.grad.shape == logits.shape


# ------------------------------------------------------------------------------ backward


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [3, 1000])
def test_backward_matches_reference(dtype, vocab):
    logits, labels = make_inputs((2, 3, vocab), dtype)
    weights = {name: torch.randn(2, 3, device=DEVICE) for name in ("logprobs", "entropy", "lse")}
    x = logits.clone().requires_grad_()
    out = triton_logprobs(x, labels, temperature=0.8, return_entropy=True)
    weighted_loss(out, weights).backward()
    assert x.grad.dtype == dtype
    expected = reference_grad(logits, labels, weights, temperature=0.8)
    assert_close_grad(x.grad, expected, dtype, "grad_logits")


@pytest.mark.parametrize("which", ["logprobs", "entropy", "lse"])
def test_backward_each_output_alone(which):
    logits, labels = make_inputs((5, 99), torch.float32)
    weights = {which: torch.randn(5, device=DEVICE)}
    x = logits.clone().requires_grad_()
    weighted_loss(triton_logprobs(x, labels, temperature=1.3, return_entropy=True),
                  weights).backward()
    expected = reference_grad(logits, labels, weights, temperature=1.3)
    assert_close_grad(x.grad, expected, torch.float32, which)


def test_backward_float64():
    logits, labels = make_inputs((4, 50), torch.float64)
    weights = {"logprobs": torch.randn(4, device=DEVICE), "entropy": torch.randn(4, device=DEVICE)}
    x = logits.clone().requires_grad_()
    weighted_loss(triton_logprobs(x, labels, temperature=0.3, return_entropy=True),
                  weights).backward()
    expected = reference_grad(logits, labels, weights, temperature=0.3)
    assert_close_grad(x.grad, expected, torch.float64, "grad_logits")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward(dtype):
    """The gradient is written over the logits buffer (here a strided TRL-style view of a
    non-leaf, as the lm_head output would be) and equals the out-of-place one bitwise."""
    full, ids = make_inputs((2, 6, 129), dtype)
    expected = full.clone().requires_grad_()
    out = triton_logprobs(expected[:, :-1], ids[:, 1:], return_entropy=True)
    (out.logprobs.sum() + out.entropy.sum()).backward()

    leaf = full.clone().requires_grad_()
    buffer = leaf * 1.0
    buffer.retain_grad()
    out = triton_logprobs(buffer[:, :-1], ids[:, 1:], return_entropy=True,
                          inplace_backward=True)
    (out.logprobs.sum() + out.entropy.sum()).backward()
    assert torch.equal(leaf.grad, expected.grad)
    assert torch.equal(buffer.detach()[:, :-1], expected.grad[:, :-1])


# ------------------------------------------------------------------------ invariance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_invariance_bitwise(dtype):
    """A row's outputs and gradient are bitwise the same alone, in a batch, in another
    position of another batch, and in a strided view."""
    logits, labels = make_inputs((9, 1000), dtype, ignore_frac=0.0)
    kw = {"return_entropy": True, "return_stats": True}
    x = logits.clone().requires_grad_()
    batch = triton_logprobs(x, labels, **kw)
    (batch.logprobs.sum() + batch.entropy.sum()).backward()
    shuffled = triton_logprobs(logits.flip(0), labels.flip(0), **kw)
    strided = triton_logprobs(logits.view(3, 3, 1000)[:, 1:], labels.view(3, 3)[:, 1:], **kw)
    for r in (0, 4, 8):
        x1 = logits[r:r + 1].clone().requires_grad_()
        alone = triton_logprobs(x1, labels[r:r + 1], **kw)
        (alone.logprobs.sum() + alone.entropy.sum()).backward()
        for field in FIELDS:
            value = getattr(alone, field)[0]
            assert torch.equal(value, getattr(batch, field)[r]), field
            assert torch.equal(value, getattr(shuffled, field)[8 - r]), field
            if r % 3:
                assert torch.equal(value, getattr(strided, field)[r // 3, r % 3 - 1]), field
        assert torch.equal(x1.grad[0], x.grad[r])
