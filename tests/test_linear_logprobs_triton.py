"""linear_logprobs on the Triton backend (kernels/linear_logprobs.py).

Without a GPU the kernels run in Triton's interpreter on CPU tensors (the real kernel code,
executed by numpy); with CUDA the same tests run the compiled kernels on CUDA tensors.

What the results are judged against, and why the tolerances are the shared ones of
conftest.py:

* The truth is the float64 reference on the float64 logits of the *rounded* inputs,
  ``F.linear(h.double(), w.double(), b.double())``: for bf16 inputs these are the exact
  logits (a product of two bf16 values is exact in float64, and H ≤ 40 terms lose nothing).
  The Triton path forms the logits in fp32 from the bf16 inputs (products exact in fp32,
  fp32 accumulation), so its only errors are fp32 rounding in the matmul and the epilogue:
  ROW_TOL holds as is (fp32 1e-5, bf16 1e-4 rtol/atol). ``token_logprobs(F.linear(h, w, b))``
  in bf16 would *not* be a fair yardstick: F.linear rounds every logit to bf16 (about 2⁻⁹
  relative, ~1e-2 absolute at |x| ≈ 3), an error of the eager path, not of this kernel —
  ``test_bf16_logits_are_not_rounded`` shows the difference. For fp32 inputs the eager path
  is also compared directly.
* Gradients: fp32 / fp64 by conftest's GRAD_TOL (fp32 2e-5 relative, with its slack for
  cancelling entries). bf16: the kernels round ``dZ`` to bf16 before the ∂h / ∂W
  tensor-core products (as the CPU path rounds its logits tile, and eager PyTorch its bf16
  logits gradient) and the op rounds the fp32 accumulators to bf16 at the end. The second
  is GRAD_TOL's 8e-3 relative; the first is up to one unit roundoff of every *term* of the
  sums (``∂h = Σ_v dZ_v W_v``, ``∂W = Σ_rows dZ h``), which cancel (the label's term against
  the rest), so it is bounded per element by ``Σ|terms|`` times the rounding error of one
  conversion, not by a fraction of the result: :func:`assert_grad` allows machine epsilon
  2⁻⁷ · Σ|terms|, the worst case of Triton's interpreter, whose fp32 → bf16 conversion
  truncates (a GPU rounds to nearest: half of that).

Shapes are tiny and the heuristics pick 16-wide blocks for them, because the interpreter is
slow: the file runs in well under a minute on two cores.
"""

from __future__ import annotations

import os

import torch

# Triton decides between compiling and interpreting when a kernel is decorated, so the
# interpreter must be on before anything imports rlkern.kernels (conftest.py does the same;
# repeated here so that the file also runs on its own).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch.nn.functional as F

import rlkern
from conftest import GRAD_TOL, ROW_TOL, assert_close_grad, assert_close_rows
from rlkern import backends
from rlkern.reference import token_logprobs_reference

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OUTPUTS = ("logprobs", "entropy", "lse")

pytestmark = [
    # The interpreter evaluates −inf arithmetic in lanes the kernels then discard with
    # tl.where (padding columns, empty summaries); numpy warns about those, harmlessly.
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
    pytest.mark.skipif(
        DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
        reason="Triton on CPU tensors needs TRITON_INTERPRET=1 before rlkern is imported",
    ),
]


def kernels():
    return backends.triton_module("linear_logprobs", torch.device(DEVICE))


def make(n, hidden, vocab, dtype=torch.float32, *, bias=True, ignore=(), scale=0.4):
    h = torch.randn(n, hidden, dtype=torch.float64).to(dtype).to(DEVICE)
    w = (torch.randn(vocab, hidden, dtype=torch.float64) * scale).to(dtype).to(DEVICE)
    b = (torch.randn(vocab, dtype=torch.float64).to(dtype).to(DEVICE) if bias else None)
    y = torch.randint(0, vocab, (n,))
    for i in ignore:
        y[i] = -100
    return h, w, b, y.to(DEVICE)


def truth(h, w, b, y, weights=None, **kw):
    """float64 reference on the exact logits of the (rounded) inputs; with ``weights``
    ({output: per-row weight}) also the float64 gradients of Σ weight·output wrt hidden,
    weight (and bias), each paired with the sum of the absolute values of the terms it adds
    up (see :func:`assert_grad`)."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (h, w, b)]
    logits = F.linear(*leaves)
    ref = token_logprobs_reference(logits, y, **kw)
    grads = None
    if weights is not None:
        loss = sum((ref[k] * g.double()).sum() for k, g in weights.items())
        dz, *grads = torch.autograd.grad(loss, [logits] + [t for t in leaves if t is not None])
        a_dz, a_h, a_w = dz.abs().flatten(0, -2), leaves[0].detach().abs(), leaves[1].detach().abs()
        terms = [(a_dz @ a_w).view(h.shape), a_dz.T @ a_h.flatten(0, -2), a_dz.sum(0)]
        grads = list(zip(grads, terms, strict=False))
    return {k: v.detach() for k, v in ref.items()}, grads


def assert_grad(got, expected, dtype, what):
    """A parameter gradient against the float64 truth ``expected = (grad, terms)``.

    fp32 / fp64: conftest's GRAD_TOL. 16-bit inputs: GRAD_TOL's rtol (the final rounding to
    the parameter dtype) plus the effect of rounding ``dZ`` to the input dtype before the
    tensor-core products (as eager PyTorch rounds a bf16 logits gradient too): each term of
    ``∂h = Σ_v dZ_v W_v`` (``∂W = Σ_rows dZ h``) is off by at most one rounding of itself —
    ``u`` (bf16 2⁻⁸) on a GPU, which rounds to nearest, ``eps = 2u`` in Triton's interpreter,
    which truncates fp32 → bf16 — and the sums cancel (the label's term against the rest), so
    the bound is ``eps · Σ|terms|`` per element, not a fraction of the result. Measured:
    up to 0.67 of the whole bound on these shapes over six seeds.
    """
    grad, terms = expected
    assert got.dtype == dtype and got.shape == grad.shape, what
    if dtype not in (torch.bfloat16, torch.float16):
        assert_close_grad(got, grad, dtype, what)
        return
    rtol, atol = GRAD_TOL[dtype]
    err = (got.double() - grad).abs()
    bound = atol + rtol * grad.abs() + torch.finfo(dtype).eps * terms
    worst = int((err - bound).argmax())
    assert torch.all(err <= bound), (
        f"{what} ({dtype}): error {float(err.flatten()[worst]):.3g} > bound "
        f"{float(bound.flatten()[worst]):.3g} at flat index {worst}")


def triton_grads(h, w, b, y, weights, **kw):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (h, w, b)]
    out = rlkern.linear_logprobs(leaves[0], leaves[1], y, bias=leaves[2], return_entropy=True,
                                 backend="triton", **kw)
    sum((getattr(out, k) * g).sum() for k, g in weights.items()).backward()
    return out, [t.grad for t in leaves if t is not None]


def random_weights(shape):
    return {k: torch.randn(shape, device=DEVICE) for k in OUTPUTS}


# ------------------------------------------------------------------------- forward+backward


CASES = [  # (N, H, V, bias): N ∈ {1, 7, 33}, H ∈ {16, 40}, V ∈ {50, 257}
    (1, 16, 50, False),
    (7, 40, 257, True),
    (33, 16, 257, False),
    (33, 40, 50, True),
    (7, 16, 50, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,hidden,vocab,bias", CASES)
def test_matches_float64_truth(dtype, n, hidden, vocab, bias):
    """Outputs and the gradients wrt hidden, weight and bias, temperature ≠ 1, ignored rows."""
    h, w, b, y = make(n, hidden, vocab, dtype, bias=bias, ignore=(3,) if n > 3 else ())
    weights = random_weights(n)
    out, grads = triton_grads(h, w, b, y, weights, temperature=0.7)
    ref, ref_grads = truth(h, w, b, y, weights, temperature=0.7)
    for key in OUTPUTS:
        assert getattr(out, key).dtype == torch.float32
        assert_close_rows(getattr(out, key), ref[key], dtype, key)
    for name, got, exp in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=False):
        assert_grad(got, exp, dtype, f"grad_{name}")


def test_fp32_matches_eager_token_logprobs():
    """The yardstick a user would reach for: token_logprobs of the materialised fp32 logits."""
    h, w, b, y = make(33, 40, 257, ignore=(0, 9))
    weights = random_weights(33)
    out, grads = triton_grads(h, w, b, y, weights, temperature=1.3)
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    eager = rlkern.token_logprobs(F.linear(*leaves).float(), y, temperature=1.3,
                                  return_entropy=True)
    sum((getattr(eager, k) * g).sum() for k, g in weights.items()).backward()
    for key in OUTPUTS:
        assert_close_rows(getattr(out, key), getattr(eager, key), torch.float32, key)
    for name, got, leaf in zip(("hidden", "weight", "bias"), grads, leaves, strict=True):
        assert_close_grad(got, leaf.grad, torch.float32, f"grad_{name}")


def test_bf16_logits_are_not_rounded():
    """bf16 inputs: the kernel's logits are fp32, so it is closer to the truth than
    token_logprobs(F.linear(...)) in bf16, whose logits are rounded to 8 bits."""
    h, w, b, y = make(33, 40, 257, torch.bfloat16, scale=1.0)
    out = rlkern.linear_logprobs(h, w, y, bias=b, backend="triton")
    eager = rlkern.token_logprobs(F.linear(h, w, b), y)
    ref, _ = truth(h, w, b, y)
    ours = (out.logprobs.double() - ref["logprobs"]).abs().max()
    theirs = (eager.logprobs.double() - ref["logprobs"]).abs().max()
    assert ours <= ROW_TOL[torch.bfloat16][1] * (1 + ref["logprobs"].abs().max())
    assert theirs > 10 * ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_3d_input_with_ignored_rows(dtype):
    """(B, L, H) hidden states (a TRL-style shifted view), ignored rows give 0 and no
    gradient; only the other rows shape the parameter gradients."""
    full, w, b, _ = make(3 * 6, 16, 50, dtype)
    h3 = full.view(3, 6, 16)[:, :-1]  # (3, 5, 16) view with row stride 16, batch stride 96
    y3 = torch.randint(0, 50, (3, 5), device=DEVICE)
    y3[0, 2] = y3[2, 4] = -100
    weights = {k: torch.randn(3, 5, device=DEVICE) for k in OUTPUTS}
    out, grads = triton_grads(h3, w, b, y3, weights, temperature=0.9)
    assert out.logprobs.shape == (3, 5) and out.self_certainty is None
    for key in OUTPUTS:
        values = getattr(out, key)
        assert values[0, 2] == 0 and values[2, 4] == 0, key
    assert torch.all(grads[0][0, 2] == 0) and torch.all(grads[0][2, 4] == 0)
    ref, ref_grads = truth(h3, w, b, y3, weights, temperature=0.9)
    for key in OUTPUTS:
        assert_close_rows(getattr(out, key), ref[key], dtype, key)
    for name, got, exp in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=True):
        assert_grad(got, exp, dtype, f"grad_{name}")


def test_float64():
    """fp64 inputs accumulate in fp64 (fp64 outputs); 1/T travels as two fp32 halves."""
    h, w, b, y = make(7, 16, 50, torch.float64, ignore=(2,))
    weights = random_weights(7)
    out, grads = triton_grads(h, w, b, y, weights, temperature=0.3)
    ref, ref_grads = truth(h, w, b, y, weights, temperature=0.3)
    for key in OUTPUTS:
        assert getattr(out, key).dtype == torch.float64
        assert_close_rows(getattr(out, key), ref[key], torch.float64, key)
    for name, got, exp in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=True):
        assert_grad(got, exp, torch.float64, f"grad_{name}")


@pytest.mark.parametrize("which", OUTPUTS)
def test_each_gradient_term_alone(which):
    """Each upstream gradient alone (the other HAS_GRAD_* flags off)."""
    h, w, b, y = make(7, 16, 50, ignore=(1,))
    weights = {which: torch.randn(7, device=DEVICE)}
    _, grads = triton_grads(h, w, b, y, weights, temperature=0.8)
    _, ref_grads = truth(h, w, b, y, weights, temperature=0.8)
    for name, got, exp in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=True):
        assert_grad(got, exp, torch.float32, f"{which}: grad_{name}")


# ---------------------------------------------------------------------- with_grad / run_fused


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_with_grad(dtype):
    h, w, b, y = make(2 * 7, 40, 257, dtype, ignore=(4,))
    g_lp, g_ent = torch.randn(2, 7, device=DEVICE), torch.randn(2, 7, device=DEVICE)
    res = rlkern.linear_logprobs_with_grad(
        h.view(2, 7, 40), w, y.view(2, 7), bias=b, grad_logprobs=g_lp, grad_entropy=g_ent,
        return_entropy=True, temperature=0.9, backend="triton")
    assert res.grad_hidden.shape == (2, 7, 40) and res.grad_hidden.dtype == dtype
    weights = {"logprobs": g_lp.view(-1), "entropy": g_ent.view(-1)}
    ref, ref_grads = truth(h, w, b, y, weights, temperature=0.9)
    assert_close_rows(res.outputs.logprobs.view(-1), ref["logprobs"], dtype, "logprobs")
    assert_close_rows(res.outputs.entropy.view(-1), ref["entropy"], dtype, "entropy")
    got = (res.grad_hidden.view(-1, 40), res.grad_weight, res.grad_bias)
    for name, g, exp in zip(("hidden", "weight", "bias"), got, ref_grads, strict=True):
        assert_grad(g, exp, dtype, f"grad_{name}")


def test_run_fused_calls_grad_fn_between_the_kernels():
    """run_fused(backend="triton"): grad_fn sees the forward's results for all rows at once
    and its gradients (here depending on the logprobs, as a fused loss's do) drive the
    backward; without a bias, grad_bias is None."""
    from rlkern.ops.linear_logprobs import run_fused

    h, w, _, y = make(7, 16, 50, bias=False, ignore=(5,))
    calls = []

    def grad_fn(lp, ent, rows):
        calls.append((rows, lp.clone(), ent))
        return torch.exp(lp), None  # d/d logp of Σ exp(logp)

    (lp, _, ent), gh, gw, gb = run_fused(h, w, y, None, 1.0, -100, False, 4, grad_fn,
                                           backend="triton")
    assert len(calls) == 1 and calls[0][0] == slice(0, 7) and calls[0][2] is None
    assert ent is None and gb is None
    torch.testing.assert_close(calls[0][1], lp)
    ref, ref_grads = truth(h, w, None, y, {"logprobs": torch.exp(lp)})
    assert_close_rows(lp, ref["logprobs"], torch.float32, "logprobs")
    assert_grad(gh, ref_grads[0], torch.float32, "grad_hidden")
    assert_grad(gw, ref_grads[1], torch.float32, "grad_weight")


# --------------------------------------------------------------------- the launchers directly


def _outputs(n, dtype=torch.float32):
    return [torch.empty(n, dtype=dtype, device=DEVICE) for _ in range(3)]


def test_many_tiles_splits_and_k_steps():
    """Forced 16-wide tiles: 17 vocabulary tiles in 9 splits of 2 (the merge), 3 K steps
    with a remainder (H = 40), 3 row blocks; in the backward 9 ∂h splits (the per-split
    buffers and their ordered sum) and 17 ∂W programs over 3 row blocks each. Row 5's
    logits ascend across the vocabulary (its running max rises in every tile), row 6's
    descend (it never does)."""
    k = kernels()
    n, hidden, vocab = 37, 40, 257
    h, w, b, y = make(n, hidden, vocab, ignore=(3, 20))
    ramp = torch.linspace(-15.0, 15.0, vocab, device=DEVICE)
    b2 = b + ramp
    w[:, 0] -= 2 * ramp
    h[5] = 0.0  # logits = b + ramp
    h[6] = 0.0
    h[6, 0] = 1.0  # logits = b − ramp
    cfg = k.LinearLaunchConfig(16, 16, 16, 4, 3, 32)
    lp, lse, ent = _outputs(n)
    k.linear_logprobs_fwd(h, w, y, b2, lp, lse, ent, temperature=0.6, ignore_index=-100,
                          config=cfg)
    ref, _ = truth(h, w, b2, y, temperature=0.6)
    for key, got in zip(OUTPUTS, (lp, ent, lse), strict=True):
        assert_close_rows(got, ref[key], torch.float32, key)

    weights = random_weights(n)
    grads = [torch.zeros(t.shape, device=DEVICE) for t in (h, w, b2)]
    k.linear_logprobs_bwd(h, w, y, b2, lse, ent, weights["logprobs"], weights["entropy"],
                          weights["lse"], *grads, temperature=0.6, ignore_index=-100,
                          config=k.LinearBwdConfig(dh=cfg, dw=cfg))
    _, ref_grads = truth(h, w, b2, y, weights, temperature=0.6)
    for name, got, exp in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=True):
        assert_grad(got, exp, torch.float32, f"grad_{name}")


def test_backward_accumulates_and_is_deterministic():
    """Repeated calls are bitwise identical (no atomics); the launcher adds into the
    accumulators it is given (twice the gradient after two calls, up to rounding) and may
    skip any of them."""
    k = kernels()
    h, w, b, y = make(33, 16, 257, ignore=(2,))
    lp, lse, ent = _outputs(33)
    k.linear_logprobs_fwd(h, w, y, b, lp, lse, ent, temperature=1.0, ignore_index=-100)
    g = torch.randn(33, device=DEVICE)

    def grads(acc=None, **skip):
        acc = acc or [torch.zeros(t.shape, device=DEVICE) for t in (h, w, b)]
        gh, gw, gb = (None if skip.get(name) else t for name, t in zip("hwb", acc, strict=True))
        k.linear_logprobs_bwd(h, w, y, b, lse, ent, g, g, None, gh, gw, gb, temperature=1.0,
                              ignore_index=-100)
        return acc

    first, second = grads(), grads()
    for a, c in zip(first, second, strict=True):
        assert torch.equal(a, c)
    twice = grads([t.clone() for t in first])
    for a, c in zip(twice, first, strict=True):
        torch.testing.assert_close(a, 2 * c, rtol=1e-6, atol=1e-7)
    only_h = grads(w=True, b=True)
    assert torch.equal(only_h[0], first[0]) and not only_h[1].any() and not only_h[2].any()
    only_w = grads(h=True)
    assert not only_w[0].any() and torch.equal(only_w[1], first[1])
    with pytest.raises(TypeError, match="accumulator dtype"):
        k.linear_logprobs_bwd(h, w, y, b, lse, ent, g, None, None, first[0].double(), None,
                              None, temperature=1.0, ignore_index=-100)


def test_batch_invariance():
    """A row's outputs do not depend on the other rows or the batch size (bitwise)."""
    h, w, b, y = make(16, 40, 257)
    full = rlkern.linear_logprobs(h, w, y, bias=b, return_entropy=True, backend="triton")
    part = rlkern.linear_logprobs(h[5:8], w, y[5:8], bias=b, return_entropy=True,
                                  backend="triton")
    for key in OUTPUTS:
        assert torch.equal(getattr(full, key)[5:8], getattr(part, key)), key


def test_strided_inputs_without_copy():
    """Row strides other than H (views into wider buffers) are read in place."""
    h_buf, w_buf, _, y = make(7, 64, 50)
    h, w = h_buf[:, 8:48], w_buf[:, 16:56]  # (7, 40) and (50, 40) with row stride 64
    assert not h.is_contiguous() and not w.is_contiguous()
    out = rlkern.linear_logprobs(h, w, y, return_entropy=True, backend="triton")
    ref, _ = truth(h, w, None, y)
    for key in OUTPUTS:
        assert_close_rows(getattr(out, key), ref[key], torch.float32, key)


def test_label_out_of_range_unchecked():
    """With checks off an out-of-range label gives NaN for its row only (it is never used as
    an address) and the backward still runs (the label matches no column)."""
    h, w, b, y = make(5, 16, 50)
    y[2] = 50
    with pytest.raises(ValueError, match="labels: value 50 at flat position 2"):
        rlkern.linear_logprobs(h, w, y, bias=b, backend="triton")
    rlkern.set_checks(False)
    try:
        hh = h.clone().requires_grad_()
        out = rlkern.linear_logprobs(hh, w, y, bias=b, return_entropy=True, backend="triton")
        out.entropy.sum().backward()
    finally:
        rlkern.set_checks(True)
    assert torch.isnan(out.logprobs[2]) and torch.isfinite(out.logprobs[[0, 1, 3, 4]]).all()
    assert torch.isfinite(out.entropy).all() and torch.isfinite(hh.grad).all()


def test_empty_and_opcheck():
    h = torch.randn(0, 16, device=DEVICE, requires_grad=True)
    out = rlkern.linear_logprobs(h, torch.randn(50, 16, device=DEVICE),
                                 torch.zeros(0, dtype=torch.long, device=DEVICE),
                                 return_entropy=True, backend="triton")
    assert out.logprobs.shape == (0,)
    h, w, b, y = make(5, 16, 50)
    torch.library.opcheck(torch.ops.rlkern.linear_logprobs_fwd.default,
                          (h.requires_grad_(), w, y, b, 1.0, -100, True, 4, 16, "", "triton"),
                          test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------- backend wiring


def test_backend_resolution(monkeypatch):
    """auto on CUDA tensors means Triton for this op, even with RLKERN_BACKEND=cuda; an
    explicit backend='cuda' names the way out."""
    from rlkern.ops.linear_logprobs import _resolve_backend

    cuda = torch.device("cuda")
    assert _resolve_backend("auto", cuda) == "triton"
    monkeypatch.setenv("RLKERN_BACKEND", "cuda")
    assert _resolve_backend("auto", cuda) == "triton"
    assert _resolve_backend("auto", torch.device("cpu")) == "cpu"
    h, w, b, y = make(3, 16, 50)
    with pytest.raises(rlkern.BackendUnavailableError, match="use backend='triton' on CUDA"):
        torch.ops.rlkern.linear_logprobs_fwd(h, w, y, b, 1.0, -100, False, 4, 16, "", "cuda")


# ------------------------------------------------------------------------------ heuristics


def test_heuristics():
    k = kernels()
    # Small problems get small blocks (cheap in the interpreter, little padding on a GPU).
    assert k.fwd_config(7, 50, 40, 4)[:3] == (16, 64, 16)
    small = k.bwd_config(7, 50, 16, 2)
    assert small.dh[:3] == (16, 64, 16) and small.dw[:3] == (16, 64, 16)
    # The defaults at an LM-head shape (these are the AOT_SPECS configs).
    big = (4096, 151936, 2048)
    assert k.fwd_config(*big, 2) == (128, 128, 64, 8, 3, 128 * 19)
    assert k.fwd_config(*big, 4)[:3] == (128, 128, 16)
    bwd = k.bwd_config(*big, 2)
    assert bwd.dh[:3] == (64, 128, 64) and bwd.dw[:3] == (128, 64, 64)
    # ∂h splits: 64 row blocks need 4 splits for ~256 programs.
    assert triton_cdiv(151936, bwd.dh.split_cols) == 4
    # Batch invariance: what fixes a row's arithmetic does not depend on N.
    for n in (1, 5, 100, 4096, 10**6):
        cfg = k.fwd_config(n, 151936, 2048, 2)
        assert (cfg.block_n, cfg.block_k, cfg.split_cols) == (128, 64, 128 * 19)
    # Unaligned H: element-wise loads, so a short K step.
    assert k.fwd_config(4096, 151936, 2040, 2).block_k == 16
    for cfg in (k.fwd_config(33, 257, 40, 2), *k.bwd_config(33, 257, 40, 4)):
        assert cfg.split_cols % cfg.block_n == 0


def triton_cdiv(a, b):
    return -(-a // b)


def test_aot_specs_are_the_launcher_defaults():
    """AOT_SPECS (compiled for sm_80 / sm_90 by tests/test_aot.py) are the heuristics'
    configs for bf16 / fp16 / fp32 at the LM-head shape and a small one; temperature is a
    runtime fp32 argument (DESIGN rule 7), and the interpreter-only flag is off."""
    k = kernels()
    names = {"_linear_logprobs_fwd_kernel", "_linear_logprobs_bwd_dh_kernel",
             "_linear_logprobs_bwd_dw_kernel"}
    for dtype, size in (("bf16", 2), ("fp16", 2), ("fp32", 4)):
        specs = [s for s in k.AOT_SPECS if s["name"].startswith(f"{dtype} N=4096 H=2048 ")]
        assert {s["fn"].__name__ for s in specs} == names, dtype
        fwd, bwd = k.fwd_config(4096, 151936, 2048, size), k.bwd_config(4096, 151936, 2048, size)
        expected = {"_linear_logprobs_fwd_kernel": fwd, "_linear_logprobs_bwd_dh_kernel": bwd.dh,
                    "_linear_logprobs_bwd_dw_kernel": bwd.dw}
        for spec in specs:
            cfg = expected[spec["fn"].__name__]
            c = spec["constexprs"]
            assert (c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]) == cfg[:3]
            assert spec["num_warps"] == cfg.num_warps and c["UPCAST_DOT"] is False
            assert spec["signature"]["hidden_ptr"] == f"*{dtype}"
            assert spec["signature"]["inv_temperature"] == "fp32"
    kernel_names = {s["fn"].__name__ for s in k.AOT_SPECS}
    assert {"_linear_logprobs_merge_kernel", "_sum_splits_kernel"} <= kernel_names
