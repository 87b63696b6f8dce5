"""token_logprobs on edge inputs, on every backend (cpu, torch, triton in the interpreter).

Finite logits give finite, correct outputs and gradients at any magnitude and temperature
(everything is formed relative to the row max before 1/T scales it); NaN and +inf rows are NaN
in every output and gradient; an all −inf row is reported as such, and only such a row; the
argument checks name the argument. docs/logprobs.md states these behaviours.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import rlkern
from rlkern.reference import token_logprobs_reference

BACKENDS = ["cpu", "torch", "triton"]
# The python/ directory this rlkern was imported from (the subprocess imports the same one).
PYTHON_DIR = Path(rlkern.__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _run(logits, labels, backend, **kw):
    if backend == "triton":
        pytest.importorskip("triton")
    return rlkern.token_logprobs(logits, labels, return_entropy=True, return_stats=True,
                                 backend=backend, **kw)


def _grad(logits, labels, backend, *, temperature=1.0, w_lp=1.0, w_ent=0.5, w_lse=0.0):
    x = logits.detach().clone().requires_grad_()
    out = _run(x, labels, backend, temperature=temperature)
    total = (out.logprobs * w_lp).sum() + (out.entropy * w_ent).sum() + (out.lse * w_lse).sum()
    total.backward()
    return x.grad


def _uniform(v):
    """What a row of equal (or effectively equal) logits gives, V = v."""
    return {"logprobs": -math.log(v), "entropy": math.log(v), "self_certainty": math.log(v),
            "sum_p_sq": 1.0 / v}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_constant_row_of_minus_1e10_gives_minus_log_v(backend, dtype):
    logits = torch.full((2, 7), -1e10, dtype=dtype)
    out = _run(logits, torch.tensor([0, 6]), backend)
    for name, value in _uniform(7).items():
        torch.testing.assert_close(getattr(out, name).double(), torch.full((2,), value,
                                   dtype=torch.float64), rtol=1e-5, atol=1e-5, msg=name)
    x = float(logits[0, 0])
    torch.testing.assert_close(out.lse.double(), torch.full((2,), x + math.log(7),
                               dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_temperature_gives_the_uniform_distribution(backend):
    logits = torch.randn(3, 5) * 3
    logits[1, 2] = float("-inf")  # a masked entry stays masked at any temperature
    out = _run(logits, torch.tensor([0, 1, 4]), backend, temperature=1e300)
    torch.testing.assert_close(out.logprobs, torch.tensor([-math.log(5), -math.log(4),
                                                          -math.log(5)]))
    torch.testing.assert_close(out.entropy, torch.tensor([math.log(5), math.log(4),
                                                         math.log(5)]))
    assert torch.isfinite(_grad(logits, torch.tensor([0, 1, 4]), backend,
                                temperature=1e300)).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["one logit 1e10", "temperature 1e-10", "bf16 finfo.min"])
def test_finite_rows_never_raise_all_neg_inf(backend, case):
    """Finite rows whose scaled logits are huge were reported as "all -inf" (x·log2e/T − m
    lost every digit); they give finite, correct logprobs."""
    labels = torch.tensor([3, 1])
    temperature = 1.0
    if case == "one logit 1e10":
        logits = torch.randn(2, 6)
        logits[:, 3] = 1e10
        expected = torch.tensor([0.0, -1e10])
    elif case == "temperature 1e-10":
        logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 1.5, -2.0]] * 2)
        temperature = 1e-10
        expected = torch.tensor([0.0, -2e10])
    else:
        logits = torch.full((2, 6), torch.finfo(torch.bfloat16).min, dtype=torch.bfloat16)
        expected = torch.full((2,), -math.log(6))
    out = _run(logits, labels, backend, temperature=temperature)
    torch.testing.assert_close(out.logprobs, expected, rtol=1e-6, atol=1e-5)
    for name in ("entropy", "self_certainty", "sum_p_sq"):
        assert torch.isfinite(getattr(out, name)).all(), name
    g = _grad(logits.float() if case == "bf16 finfo.min" else logits, labels, backend,
              temperature=temperature)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 1e-10])
def test_huge_logits_backward_matches_float64(backend, temperature):
    """Rows whose lse is far from 0 (huge logits, a tiny temperature) take the backward's exact
    path: p relative to the recomputed row max, not exp(z − rounded lse)."""
    torch.manual_seed(0)
    logits = torch.randn(4, 9) * 2
    logits[0] = 1e10 + 1024 * torch.arange(9.0)  # huge, spread of 1 ulp each: not one-hot
    logits[1] = 7.0  # ties: uniform at every temperature
    logits[2, [2, 5]] = 30.0  # two equal maxima
    labels = torch.tensor([1, 4, 2, 8])
    expected = _grad(logits.double(), labels, "torch", temperature=temperature * 1024,
                     w_lse=0.25)
    got = _grad(logits, labels, backend, temperature=temperature * 1024, w_lse=0.25)
    scale = float(expected.abs().max())
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["logprobs", "entropy"])
def test_label_on_a_neg_inf_logit_has_a_finite_gradient(backend, which):
    logits = torch.randn(2, 5)
    logits[:, 3] = float("-inf")
    labels = torch.tensor([3, 0])
    w = (1.0, 0.0) if which == "logprobs" else (0.0, 1.0)
    g = _grad(logits, labels, backend, w_lp=w[0], w_ent=w[1])
    assert torch.isfinite(g).all()
    if which == "logprobs":  # ∂logp/∂x_y = 1 − p_y = 1 at the masked label
        assert float(g[0, 3]) == 1.0
    else:
        assert float(g[0, 3]) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_pos_inf_rows_are_nan_everywhere(backend):
    logits = torch.randn(4, 6)
    logits[0, 2] = float("nan")
    logits[1] = float("nan")  # all NaN: not an "all -inf" row
    logits[2, 4] = float("inf")
    labels = torch.tensor([0, 1, 2, 3])
    out = _run(logits, labels, backend)
    for name in ("logprobs", "entropy", "lse", "self_certainty", "sum_p_sq"):
        values = getattr(out, name)
        assert torch.isnan(values[:3]).all(), name
        assert torch.isfinite(values[3]), name
    x = logits.clone().requires_grad_()
    out = _run(x, labels, backend)
    (torch.nan_to_num(out.logprobs) + torch.nan_to_num(out.entropy)).sum().backward()
    assert torch.isnan(x.grad[:3]).all() and torch.isfinite(x.grad[3]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_neg_inf_row_with_checks_off(backend):
    """lse = −inf, every other output NaN, and so the gradient row (no softmax exists)."""
    logits = torch.randn(2, 5)
    logits[0] = float("-inf")
    labels = torch.tensor([1, 2])
    rlkern.set_checks(False)
    try:
        out = _run(logits, labels, backend)
        assert torch.isneginf(out.lse[0])
        for name in ("logprobs", "entropy", "self_certainty", "sum_p_sq"):
            assert torch.isnan(getattr(out, name)[0]), name
            assert torch.isfinite(getattr(out, name)[1]), name
        g = _grad(logits, labels, backend)
        assert torch.isnan(g[0]).all() and torch.isfinite(g[1]).all()
    finally:
        rlkern.set_checks(True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_on_expanded_logits_is_out_of_place(backend):
    """Rows sharing memory (stride 0) cannot each hold their own gradient: the gradient is
    the out-of-place one, and the logits are left untouched."""
    row = torch.randn(1, 7)
    labels = torch.tensor([0, 3, 6])

    def grad(inplace):
        base = row.clone().requires_grad_()
        logits = base.expand(3, 7)
        out = rlkern.token_logprobs(logits, labels, return_entropy=True,
                                    inplace_backward=inplace, backend=backend)
        (out.logprobs.sum() + out.entropy.sum()).backward()
        return base.grad, base.detach()

    g_inplace, kept = grad(True)
    g_ref, _ = grad(False)
    torch.testing.assert_close(g_inplace, g_ref)
    torch.testing.assert_close(kept, row)


@pytest.mark.parametrize("when", ["never set", "set after import"])
def test_triton_backend_in_a_fresh_process_without_the_interpreter_variable(when):
    """The docs promise the interpreter is switched on automatically on a machine without
    CUDA, although importing rlkern imports torch._dynamo, hence triton.language (and its
    @jit library functions), first; the same when the variable is set after that import."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("on a CUDA machine backend='triton' compiles for the GPU")
    late = "import os; os.environ['TRITON_INTERPRET'] = '1'\n" if when != "never set" else ""
    code = (
        "import torch, rlkern\n" + late +
        "x = torch.randn(3, 11); y = torch.tensor([0, 5, 10])\n"
        "a = rlkern.token_logprobs(x, y, return_entropy=True, backend='triton')\n"
        "b = rlkern.token_logprobs(x, y, return_entropy=True, backend='cpu')\n"
        "torch.testing.assert_close(a.logprobs, b.logprobs)\n"
        "h = torch.randn(3, 4); w = torch.randn(11, 4)\n"
        "c = rlkern.linear_logprobs(h, w, y, backend='triton')\n"
        "torch.testing.assert_close(c.logprobs, rlkern.linear_logprobs(h, w, y).logprobs)\n"
        "s = rlkern.sample(x, seeds=torch.arange(3), steps=torch.zeros(3, dtype=torch.long),"
        " backend='triton')\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PYTHON_DIR), env.get("PYTHONPATH"))
                                        if p)
    res = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


@pytest.mark.parametrize("value,error", [(2**70, ValueError), (-(2**63) - 1, ValueError),
                                         (1.5, TypeError), ("-100", TypeError)])
def test_ignore_index_is_checked(value, error):
    with pytest.raises(error, match="ignore_index"):
        rlkern.token_logprobs(torch.randn(2, 3), torch.tensor([0, 1]), ignore_index=value)


def test_temperature_whose_inverse_overflows_is_refused():
    with pytest.raises(ValueError, match="temperature"):
        rlkern.token_logprobs(torch.randn(2, 3), torch.tensor([0, 1]), temperature=1e-320)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_agrees_with_the_kernels_on_mixed_extremes(backend):
    """A batch mixing every extreme row: each backend equals the float64 reference."""
    rows = [torch.randn(8) * 3, torch.full((8,), -1e10), torch.full((8,), 3e38),
            torch.tensor([1e10, -1e10, 0, 1, 2, 3, 4, 5.0]), torch.linspace(-1, 1, 8) * 1e-30]
    logits = torch.stack(rows)
    labels = torch.tensor([1, 2, 3, 0, 7])
    for temperature in (1.0, 0.3, 1e-10, 1e300):
        out = _run(logits, labels, backend, temperature=temperature)
        ref = token_logprobs_reference(logits.double(), labels, temperature=temperature)
        for name in ("logprobs", "entropy", "self_certainty", "sum_p_sq"):
            got, exp = getattr(out, name).double(), ref[name]
            assert torch.isfinite(got).all(), (name, temperature)
            torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5,
                                       msg=f"{name} at T={temperature}")
