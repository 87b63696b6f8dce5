"""The CUDA kernels of csrc/cuda/logprobs.cu, executed on the CPU, against the float64 reference.

No GPU is needed: tests/cuda_emu compiles the real ``.cu`` source with the host C++ compiler
and runs every CUDA thread as a fiber, with emulated barriers, warp shuffles and shared
memory (tests/cuda_emu/README.md says what that can and cannot catch). The launchers
``rlkern_logprobs_fwd_cuda`` / ``rlkern_logprobs_bwd_cuda`` are called through ctypes on the
data pointers of CPU tensors, exactly as csrc/cuda_ops.cpp calls them on CUDA tensors.

Every call is also checked for writes outside its outputs (guard bands around each output,
a gradient buffer whose storage outside the view must stay untouched) and for reads outside
the rows: logits live in NaN-filled storage, so reading a byte outside a row poisons a result.
The emulator itself stops a launch on a divergent barrier, a shuffle whose lanes are missing,
a misaligned vector access or an out-of-bounds fixed-size array, and each test runs under its
default schedule; ``test_results_do_not_depend_on_scheduling`` varies the thread order, the
number of worker threads and the grid size (grid-stride loops).

Tolerances are the per-dtype tables of conftest.py (fp32 1e-5 relative; bf16/fp16 inputs
with fp32 accumulation 1e-4 on per-row outputs; gradients at the rounding of their dtype).
One honest caveat: the GPU's __expf is ex2.approx(x·log2 e); the emulator reproduces the
rounded prescale (the error that grows with |x|) but evaluates exp2 correctly rounded, while
ex2.approx is off by up to 2 ulp. Summed over a row that is ~2e-7 relative on Σ exp at worst,
far inside the 1e-5 tolerance, so these tolerances hold on a GPU too; bitwise comparisons are
only ever made between two emulated runs.

Run on its own with ``python -m pytest tests/test_cuda_emulation.py`` or
``python tests/test_cuda_emulation.py`` (the first run compiles the library, ~5 s of CPU; it is
cached by content in $CUDA_EMU_CACHE or the temp dir). The emulator's own tests are in
test_cuda_emu_selftest.py. ``-m "not slow"`` leaves out
the few heaviest cases. Skipped, with the reason, when no host C++ compiler is found.
"""

from __future__ import annotations

import ctypes
import sys

import pytest
import torch

from conftest import assert_close_grad, assert_close_rows
from cuda_emu import EmulatedLibrary
from cuda_emu.testing import (
    CSRC,
    DTYPE_CODE,
    ERR_DTYPE,
    ERR_INVALID_ARGUMENT,
    ERR_NULL_POINTER,
    F32,
    I64,
    OK,
    Guarded,
    P,
    emulated,
)
from rlkern.reference import token_logprobs_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FIELDS = ("logprobs", "lse", "entropy", "self_certainty", "sum_p_sq")


# --------------------------------------------------------------------- building the kernels


class Logprobs:
    """The logprobs launchers of the emulated library, called on CPU tensors."""

    def __init__(self, emu: EmulatedLibrary):
        self.emu = emu
        lib = emu.lib
        self.fwd = lib.rlkern_logprobs_fwd_cuda
        self.fwd.argtypes = [P, ctypes.c_int, I64, I64, I64, I64, I64, P, F32, I64,
                             P, P, P, P, P, P]
        self.fwd.restype = ctypes.c_int
        self.bwd = lib.rlkern_logprobs_bwd_cuda
        self.bwd.argtypes = [P, ctypes.c_int, I64, I64, I64, I64, I64, P, P, P, P, P, P, F32,
                             I64, P, I64, I64, P]
        self.bwd.restype = ctypes.c_int
        self.error_string = lib.rlkern_cuda_error_string
        self.error_string.argtypes = [ctypes.c_int]
        self.error_string.restype = ctypes.c_char_p

    def check(self, rc: int) -> None:
        assert rc == OK, f"rc={rc} ({self.error_string(rc).decode()}): {self.emu.last_error()}"

    def forward(self, logits, labels, *, temperature=1.0, ignore_index=-100,
                outputs=FIELDS) -> dict[str, torch.Tensor | None]:
        """Run the forward on a (B, L, V) view; only the fields in ``outputs`` get a buffer
        (the others are passed as null). Checks that every requested row was written and
        nothing around the outputs was."""
        B, L, V = logits.shape
        labels = labels.contiguous()  # (kept alive across the call)
        out = {name: Guarded((B, L)) if name in outputs or name in ("logprobs", "lse") else None
               for name in FIELDS}
        rc = self.fwd(logits.data_ptr(), DTYPE_CODE[logits.dtype], B, L, V, logits.stride(0),
                      logits.stride(1), labels.data_ptr(), temperature, ignore_index,
                      *(g.ptr() if g is not None else None for g in out.values()), None)
        self.check(rc)
        for name, g in out.items():
            if g is not None:
                g.check(name)
        return {name: g.view if g is not None else None for name, g in out.items()}

    def backward(self, logits, labels, fwd, grads, *, temperature=1.0, ignore_index=-100,
                 grad: Strided | None = None) -> torch.Tensor:
        """Gradient wrt the logits of Σ grads[k]·output_k for k in logprobs/entropy/lse,
        written into ``grad.view`` (default: a fresh contiguous buffer); checks that nothing
        outside the view was written."""
        B, L, V = logits.shape
        labels = labels.contiguous()
        if grad is None:
            grad = Strided(logits.shape, logits.dtype, fill=1234.0)
        given = {k: grads[k].float().contiguous() if k in grads else None
                 for k in ("logprobs", "entropy", "lse")}
        g = grad.view
        rc = self.bwd(logits.data_ptr(), DTYPE_CODE[logits.dtype], B, L, V, logits.stride(0),
                      logits.stride(1), labels.data_ptr(), fwd["lse"].data_ptr(),
                      fwd["entropy"].data_ptr() if fwd["entropy"] is not None else None,
                      *(t.data_ptr() if t is not None else None for t in given.values()),
                      temperature, ignore_index, g.data_ptr(), g.stride(0), g.stride(1), None)
        self.check(rc)
        assert grad.untouched_outside(), "grad_logits: written outside the (B, L, V) view"
        return g


@pytest.fixture(scope="module")
def kernels() -> Logprobs:
    return Logprobs(emulated(CSRC / "cuda" / "logprobs.cu"))


# ------------------------------------------------------------------------ inputs, layouts

LAYOUTS = ("contiguous", "trl_shifted", "transposed", "padded_rows")


def layout_strides(shape, layout):
    """(storage elements, strides) of a (B, L, V) view:
    contiguous;  trl_shifted: x[:, :-1, :] of a (B, L + 1, V) tensor (TRL's shifted logits);
    transposed: y.transpose(0, 1) of an (L, B, V) tensor;  padded_rows: rows V + 3 apart, so
    successive rows start at different alignments."""
    B, L, V = shape
    if layout == "contiguous":
        return B * L * V, (L * V, V, 1)
    if layout == "trl_shifted":
        return B * (L + 1) * V, ((L + 1) * V, V, 1)
    if layout == "transposed":
        return L * B * V, (V, B * V, 1)
    if layout == "padded_rows":
        return B * L * (V + 3), (L * (V + 3), V + 3, 1)
    raise ValueError(layout)


class Strided:
    """A (B, L, V) view into a larger storage filled with ``fill`` (NaN for logits: a read
    outside the view poisons a result), starting ``offset`` elements in (offset 1 makes the
    base pointer misaligned)."""

    GUARD = 64

    def __init__(self, shape, dtype, layout="contiguous", offset=0, fill=float("nan")):
        size, strides = layout_strides(shape, layout)
        self.storage = torch.full((offset + size + self.GUARD,), fill, dtype=dtype)
        self.view = self.storage.as_strided(shape, strides, offset)
        self.outside = torch.ones(self.storage.shape, dtype=torch.bool)
        self.outside.as_strided(shape, strides, offset).fill_(False)
        self.before = self.bits()

    def bits(self) -> torch.Tensor:
        return self.storage.view(torch.int16 if self.storage.element_size() == 2 else torch.int32)

    def untouched_outside(self) -> bool:
        return torch.equal(self.bits()[self.outside], self.before[self.outside])


def make_values(shape, dtype, *, scale=3.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)


def make_labels(shape, vocab, *, ignored=(), ignore_index=-100):
    labels = torch.randint(0, vocab, shape)
    for index in ignored:
        labels[index] = ignore_index
    return labels


def place(values, layout="contiguous", offset=0):
    """``values`` copied into a fresh NaN-surrounded view of the given layout."""
    s = Strided(values.shape, values.dtype, layout, offset)
    s.view.copy_(values)
    return s.view


def poison_ignored(values, labels, ignore_index=-100):
    """``values`` with NaN in the rows whose label is ignore_index: the launchers promise not
    to read those rows, so any use of them would show (the reference sees the clean values)."""
    out = values.clone()
    out[labels == ignore_index] = float("nan")
    return out


def reference(values, labels, **kw):
    """Float64 truth on the same (already rounded) inputs."""
    return token_logprobs_reference(values.double(), labels, **kw)


def check_rows(out, ref, dtype, fields=FIELDS, what=""):
    for name in fields:
        assert_close_rows(out[name], ref[name], dtype, f"{what} {name}")


def reference_grad(values, labels, grads, **kw):
    """d(Σ_k grads[k]·output_k)/d(logits) of the float64 reference. −inf logits become a
    finite value so small that p = 0 exactly: autograd would otherwise meet 0·(−inf) where the
    true gradient (the limit) is 0."""
    x = values.double()
    x = torch.where(torch.isneginf(x), torch.full_like(x, -1e6), x).requires_grad_()
    out = token_logprobs_reference(x, labels, **kw)
    loss = sum((out[k] * g.double()).sum() for k, g in grads.items())
    if grads:
        loss.backward()
    return x.grad if x.grad is not None else torch.zeros_like(x)


# ------------------------------------------------------------------------------- forward

# Launch shapes these sizes reach: V = 1, 3, 99: one warp per row, 8 rows per block;
# 4097: 512 threads per row with a partial last chunk; 50257: 512 threads, and in bf16/fp16
# every other row starts misaligned (50257·2 bytes is not a multiple of 16), so the scalar
# load path runs next to the vector one.
VOCABS = [1, 3, 99, 4097, 50257]
SLOW = pytest.mark.slow  # the heaviest cases (about a second each): `-m "not slow"` skips them


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", VOCABS)
def test_forward_matches_reference(kernels, dtype, vocab):
    shape = (2, 3, vocab) if vocab < 50000 else (1, 3, vocab)
    values = make_values(shape, dtype)
    labels = make_labels(shape[:2], vocab, ignored=[(0, 1)])
    out = kernels.forward(place(poison_ignored(values, labels)), labels, temperature=0.7)
    check_rows(out, reference(values, labels, temperature=0.7), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.25, 1.0, 3.0])
def test_temperature(kernels, dtype, temperature):
    values = make_values((2, 2, 999), dtype, scale=2.0)
    labels = make_labels((2, 2), 999)
    out = kernels.forward(place(values), labels, temperature=temperature)
    check_rows(out, reference(values, labels, temperature=temperature), dtype)


def option_sets(names: tuple[str, ...], *chosen: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """None of the optional ``names``, each alone, the ``chosen`` combinations, and all of them,
    keyed by a test id: "none", "a", "a+b", "all"."""
    sets = [(), *((n,) for n in names), *chosen, names]
    return {"none" if not s else "all" if s == names else "+".join(s): s for s in sets}


OUTPUT_SETS = option_sets(("entropy", "self_certainty", "sum_p_sq"),
                          ("self_certainty", "sum_p_sq"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_optional_outputs(kernels, dtype):
    """Each combination of optional outputs (four kernel instantiations) writes exactly the
    outputs asked for; the shared ones are bitwise the same in every combination."""
    values = make_values((3, 2, 1500), dtype)
    labels = make_labels((3, 2), 1500, ignored=[(1, 1)])
    ref = reference(values, labels)
    logits = place(poison_ignored(values, labels))
    full = kernels.forward(logits, labels)
    check_rows(full, ref, dtype)
    for name, fields in OUTPUT_SETS.items():
        out = kernels.forward(logits, labels, outputs=fields)
        for field in FIELDS:
            if field in ("logprobs", "lse") or field in fields:
                assert torch.equal(out[field], full[field]), (name, field)
            else:
                assert out[field] is None


@pytest.mark.parametrize("ignore_index", [-100, -1, 7])
def test_ignored_rows_are_zero(kernels, ignore_index):
    values = make_values((4, 5, 300), torch.float32)
    labels = make_labels((4, 5), 300)
    labels[labels == ignore_index] = ignore_index + 1  # only the chosen rows are ignored
    rows = [(0, 0), (1, 3), (3, 4)]
    for r in rows:
        labels[r] = ignore_index
    logits = place(poison_ignored(values, labels, ignore_index))
    out = kernels.forward(logits, labels, ignore_index=ignore_index)
    ref = reference(values, labels, ignore_index=ignore_index)
    check_rows(out, ref, torch.float32)
    ignored = labels == ignore_index
    for name in FIELDS:
        assert torch.all(out[name][ignored] == 0), name
        assert torch.all(out[name][~ignored] != 0), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [40, 3001])
def test_masked_vocab_neg_inf(kernels, dtype, vocab):
    values = make_values((1, 5, vocab), dtype)
    labels = make_labels((1, 5), vocab)
    values[0, 0, ::3] = float("-inf")  # a masked vocabulary
    labels[0, 0] = 1
    values[0, 1, : vocab // 2] = float("-inf")  # a masked half (whole chunks and threads)
    labels[0, 1] = vocab - 1
    values[0, 2, :] = float("-inf")  # one finite entry
    values[0, 2, 5] = 1.5
    labels[0, 2] = 5
    values[0, 3, :] = float("-inf")  # all −inf: lse = −inf (the caller's checks reject it)
    out = kernels.forward(place(values), labels)
    ref = reference(values, labels)
    finite_rows = [0, 1, 2, 4]
    for name in ("logprobs", "lse", "entropy", "sum_p_sq"):
        assert_close_rows(out[name][0, finite_rows], ref[name][0, finite_rows], dtype, name)
    assert torch.all(torch.isposinf(out["self_certainty"][0, :3]))  # mean z = −inf
    assert_close_rows(out["self_certainty"][0, 4], ref["self_certainty"][0, 4], dtype)
    assert out["lse"][0, 3] == float("-inf")
    assert out["logprobs"][0, 2] == 0 and out["entropy"][0, 2] == 0


def test_out_of_range_labels_give_nan_without_reading(kernels):
    vocab = 500
    values = make_values((1, 5, vocab), torch.float32)
    labels = torch.tensor([[vocab, -1, 10**12, -(10**12), 3]])  # only the last is valid
    out = kernels.forward(place(values), labels)
    ref = reference(values, torch.full_like(labels, 3))
    assert torch.all(torch.isnan(out["logprobs"][0, :4]))
    assert_close_rows(out["logprobs"][0, 4], ref["logprobs"][0, 4], torch.float32)
    for name in ("lse", "entropy", "self_certainty", "sum_p_sq"):
        assert_close_rows(out[name], ref[name], torch.float32, name)


def test_nan_logit_poisons_only_its_row(kernels):
    values = make_values((1, 3, 700), torch.float32)
    values[0, 1, 123] = float("nan")
    labels = make_labels((1, 3), 700)
    out = kernels.forward(place(values), labels)
    for name in FIELDS:
        assert torch.isnan(out[name][0, 1]), name
        assert torch.isfinite(out[name][0, [0, 2]]).all(), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned_base"])
def test_layouts(kernels, dtype, layout, offset):
    """TRL-style shifted views, a transposed batch, rows at every alignment, and a base
    pointer one element off 16 bytes: outputs match the contiguous reference."""
    values = make_values((2, 3, 777), dtype)
    labels = make_labels((2, 3), 777, ignored=[(1, 0)])
    logits = place(poison_ignored(values, labels), layout, offset)
    out = kernels.forward(logits, labels, temperature=1.3)
    check_rows(out, reference(values, labels, temperature=1.3), dtype, what=layout)


@pytest.mark.parametrize(
    ("vocab", "dtype"),
    [(99, torch.float32), (4097, torch.float16), (32000, torch.bfloat16),
     pytest.param(50257, torch.bfloat16, marks=SLOW)],
)
def test_batch_invariance_bitwise(kernels, vocab, dtype):
    """A row's outputs are bitwise the same alone, at any position of any batch, at any
    alignment and in any layout (the launch shape depends on V only)."""
    row = make_values((vocab,), dtype)
    label = 17
    results = []
    for (B, L), pos, layout, offset in [((1, 1), (0, 0), "contiguous", 0),
                                        ((3, 4), (2, 1), "contiguous", 0),
                                        ((2, 5), (1, 4), "trl_shifted", 1),
                                        ((4, 3), (3, 0), "padded_rows", 3),
                                        ((2, 2), (0, 1), "transposed", 5)]:
        values = make_values((B, L, vocab), dtype)
        values[pos] = row
        labels = make_labels((B, L), vocab)
        labels[pos] = label
        out = kernels.forward(place(values, layout, offset), labels, temperature=0.9)
        results.append(torch.stack([out[name][pos] for name in FIELDS]))
    for r in results[1:]:
        assert torch.equal(r, results[0]), (results[0], r)


# ------------------------------------------------------------------------------ backward

GRAD_SETS = option_sets(("logprobs", "entropy", "lse"), ("logprobs", "entropy"))


def run_backward(kernels, values, labels, which, *, layout="contiguous", offset=0,
                 temperature=0.8, ignore_index=-100):
    logits = place(poison_ignored(values, labels, ignore_index), layout, offset)
    fwd = kernels.forward(logits, labels, temperature=temperature, ignore_index=ignore_index,
                          outputs=("entropy",))
    grads = {k: torch.randn(labels.shape) for k in which}
    grad = kernels.backward(logits, labels, fwd, grads, temperature=temperature,
                            ignore_index=ignore_index)
    expected = reference_grad(values, labels, grads, temperature=temperature,
                              ignore_index=ignore_index)
    return logits, fwd, grads, grad, expected


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", list(GRAD_SETS), ids=list(GRAD_SETS))
def test_backward_each_gradient_combination(kernels, dtype, which):
    values = make_values((2, 3, 4097), dtype)
    labels = make_labels((2, 3), 4097, ignored=[(1, 2)])
    *_, grad, expected = run_backward(kernels, values, labels, GRAD_SETS[which])
    assert grad.dtype == dtype
    assert_close_grad(grad, expected, dtype, which)
    if which == "none":
        assert torch.all(grad == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [*VOCABS[:-1], pytest.param(VOCABS[-1], marks=SLOW)])
def test_backward_matches_reference(kernels, dtype, vocab):
    shape = (2, 3, vocab) if vocab < 50000 else (1, 3, vocab)
    values = make_values(shape, dtype)
    if vocab > 10:
        values[0, 0, : vocab // 3] = float("-inf")
    labels = make_labels(shape[:2], vocab, ignored=[(0, 2)])
    labels[0, 0] = vocab - 1  # a label on an unmasked entry
    *_, grad, expected = run_backward(kernels, values, labels, GRAD_SETS["all"])
    assert_close_grad(grad, expected, dtype, f"V={vocab}")
    assert torch.all(grad[0, 2] == 0)  # the ignored row
    if vocab > 10:
        assert torch.all(grad[0, 0, : vocab // 3] == 0)  # −inf logits


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "trl_shifted", "padded_rows"])
def test_backward_in_place(kernels, dtype, layout):
    """grad_logits aliasing the logits (each element read, then overwritten by the same
    thread) gives bitwise the out-of-place gradient, and nothing outside the view changes."""
    values = make_values((2, 3, 2049), dtype)
    labels = make_labels((2, 3), 2049, ignored=[(0, 0)])
    _, fwd, grads, grad, expected = run_backward(kernels, values, labels, GRAD_SETS["all"],
                                                 layout=layout)
    s = Strided(values.shape, dtype, layout)
    s.view.copy_(poison_ignored(values, labels))
    kernels.backward(s.view, labels, fwd, grads, temperature=0.8, grad=s)
    assert torch.equal(s.view, grad)
    assert_close_grad(s.view, expected, dtype, "in place")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("logits_offset", "grad_offset", "grad_layout"),
                         [(0, 1, "contiguous"), (1, 0, "contiguous"), (3, 3, "padded_rows"),
                          (0, 0, "transposed")])
def test_backward_gradient_layouts(kernels, dtype, logits_offset, grad_offset, grad_layout):
    """Logits and gradient misaligned differently (the scalar path), alike (the vector
    path with a scalar head), or strided: the same values, and no write outside the view."""
    values = make_values((2, 2, 1003), dtype)
    labels = make_labels((2, 2), 1003)
    logits = place(values, "contiguous", logits_offset)
    fwd = kernels.forward(logits, labels, outputs=("entropy",))
    grads = {k: torch.randn(2, 2) for k in ("logprobs", "entropy", "lse")}
    g = Strided(values.shape, dtype, grad_layout, grad_offset, fill=777.0)
    kernels.backward(logits, labels, fwd, grads, grad=g)
    assert_close_grad(g.view, reference_grad(values, labels, grads), dtype)


def test_backward_out_of_range_label_has_no_label_term(kernels):
    values = make_values((1, 3, 64), torch.float32)
    labels = torch.tensor([[64, -5, 10**12]])
    logits = place(values)
    fwd = kernels.forward(logits, labels, outputs=("entropy",))
    grad = kernels.backward(logits, labels, fwd, {"logprobs": torch.ones(1, 3)})
    expected = -torch.softmax(values.double(), dim=-1)  # d logp / dx without the 1[v = y]
    assert_close_grad(grad, expected, torch.float32)


# ------------------------------------------------- edge inputs (issue 14: max-shifted math)


@pytest.mark.parametrize("case", ["constant -1e10", "temperature 1e38", "one logit 1e10",
                                  "temperature 1e-10", "bf16 finfo.min", "all NaN"])
def test_extreme_finite_rows_stay_finite(kernels, case):
    """Everything relative to the row max before 1/T scales it: a constant row of −1e10 gave
    logprob −inf and lse +inf, huge temperatures NaN, and finite rows were taken for all −inf
    ones. An all-NaN row is NaN everywhere (it was lse = −inf, "all -inf")."""
    dtype, temperature, vocab = torch.float32, 1.0, 40
    values = make_values((1, 3, vocab), dtype)
    if case == "constant -1e10":
        values[0, 1] = -1e10
    elif case == "temperature 1e38":
        temperature = 1e38
    elif case == "one logit 1e10":
        values[0, 1, 7] = 1e10
    elif case == "temperature 1e-10":
        temperature = 1e-10
    elif case == "bf16 finfo.min":
        dtype = torch.bfloat16
        values = values.to(dtype)
        values[0, 1] = torch.finfo(dtype).min
    else:
        values[0, 1] = float("nan")
    labels = torch.tensor([[3, 7, 39]])
    out = kernels.forward(place(values), labels, temperature=temperature)
    ref = reference(values, labels, temperature=temperature)
    if case == "all NaN":
        for name in FIELDS:
            assert torch.isnan(out[name][0, 1]), name
        return
    for name in ("logprobs", "entropy", "self_certainty", "sum_p_sq"):
        assert torch.isfinite(out[name]).all(), name
        torch.testing.assert_close(out[name].double(), ref[name], rtol=1e-5, atol=2e-5,
                                   msg=name)
    torch.testing.assert_close(out["lse"].double(), ref["lse"], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 1e-10])
def test_backward_of_huge_rows_takes_the_exact_path(kernels, temperature, in_place):
    """|lse| ≥ kBwdLseBound: p relative to the recomputed row max (each warp of the row on its
    own); the rounded lse would move p by up to e^1000. In place, too: one block per row, and
    its warps read the whole row before any of them writes."""
    vocab = 3000  # several warps per row, several column tiles
    values = make_values((1, 4, vocab), torch.float32, scale=1.0)
    values[0, 0] += 1e10
    values[0, 1, :] = 5.0  # ties
    values[0, 2, [10, 2000]] = 40.0  # two equal maxima
    labels = torch.tensor([[1, 2, 10, 2999]])
    grads = {k: torch.linspace(0.5, 1.5, 4).view(1, 4) for k in ("logprobs", "entropy", "lse")}
    logits = place(values)
    fwd = kernels.forward(logits, labels, temperature=temperature, outputs=("entropy",))
    expected = reference_grad(values, labels, grads, temperature=temperature)
    if in_place:
        s = Strided(values.shape, torch.float32)
        s.view.copy_(values)
        kernels.backward(s.view, labels, fwd, grads, temperature=temperature, grad=s)
        grad = s.view
    else:
        grad = kernels.backward(logits, labels, fwd, grads, temperature=temperature)
    assert torch.isfinite(grad).all()
    assert_close_grad(grad, expected, torch.float32, "exact path")


def test_backward_label_on_a_neg_inf_logit(kernels):
    values = make_values((1, 2, 70), torch.float32)
    values[0, :, 5] = float("-inf")
    labels = torch.tensor([[5, 6]])
    logits = place(values)
    fwd = kernels.forward(logits, labels, outputs=("entropy",))
    grad = kernels.backward(logits, labels, fwd, {"logprobs": torch.ones(1, 2),
                                                  "entropy": torch.ones(1, 2)})
    assert torch.isfinite(grad).all() and float(grad[0, 0, 5]) == 1.0


# ------------------------------------------------------------- scheduling and grid size

SETTINGS = [
    {"order": "reverse"},
    {"order": "random", "seed": 1},
    {"order": "random", "seed": 2, "workers": 1},
    {"order": "reverse", "run_ahead": True},
    {"max_grid": (1, 1, 1)},  # one block walks every row and every column tile
    {"max_grid": (1, 1, 1), "order": "reverse", "run_ahead": True},
    {"max_grid": (2, 3, 1), "order": "random", "seed": 3, "run_ahead": True},
]


@pytest.mark.parametrize(
    ("vocab", "dtype", "rows"),
    [(50, torch.float32, 37), (4097, torch.float32, 5),
     pytest.param(20000, torch.bfloat16, 3, marks=SLOW)],
)
def test_results_do_not_depend_on_scheduling(kernels, vocab, dtype, rows):
    """Forward and backward are bitwise the same whatever order a block's threads run in
    between barriers, round-robin or with some warps racing ahead (a missing __syncthreads
    or __syncwarp would show here), however many workers run the blocks, and with the grid
    clamped so that the grid-stride loops over rows (grid.x) and column tiles (grid.y) do the
    work — and a block reuses its shared memory for several rows."""
    values = make_values((1, rows, vocab), dtype)
    labels = make_labels((1, rows), vocab, ignored=[(0, 1)])
    logits = place(poison_ignored(values, labels))
    grads = {k: torch.randn(1, rows) for k in ("logprobs", "entropy", "lse")}

    def run():
        fwd = kernels.forward(logits, labels, temperature=0.7)
        grad = kernels.backward(logits, labels, fwd, grads, temperature=0.7)
        return fwd, grad

    base_fwd, base_grad = run()
    check_rows(base_fwd, reference(values, labels, temperature=0.7), dtype)
    for settings in SETTINGS:
        with kernels.emu.settings(**settings):
            fwd, grad = run()
        for name in FIELDS:
            assert torch.equal(fwd[name], base_fwd[name]), (settings, name)
        assert torch.equal(grad, base_grad), settings


@pytest.mark.parametrize("vocab", [700, 9000])
def test_exact_path_in_place_does_not_depend_on_scheduling(kernels, vocab):
    """Rows on the backward's exact path mixed with ordinary ones, in place: with two warps
    per row and four rows per block (V = 700; the last block has inactive rows) every warp
    reads its whole row before any thread of the block writes (the barrier); with several
    column tiles per row (V = 9000) one block does all of a row's tiles, so no other block
    overwrites logits a row's recompute still reads. Under every thread order, worker count
    and grid clamp."""
    rows = 7
    values = make_values((1, rows, vocab), torch.float32)
    values[0, ::2] += 1e10  # rows 0, 2, 4, 6: |lse| ≥ kBwdLseBound
    labels = make_labels((1, rows), vocab, ignored=[(0, 3)])
    grads = {k: torch.randn(1, rows) for k in ("logprobs", "entropy", "lse")}
    fwd = kernels.forward(place(values), labels, outputs=("entropy",))

    def run():
        s = Strided(values.shape, torch.float32)
        s.view.copy_(values)
        kernels.backward(s.view, labels, fwd, grads, grad=s)
        return s.view.clone()

    base = run()
    assert torch.isfinite(base).all()
    assert_close_grad(base, reference_grad(values, labels, grads), torch.float32)
    for settings in SETTINGS:
        with kernels.emu.settings(**settings):
            assert torch.equal(run(), base), settings


def test_grid_clamp_really_runs_fewer_blocks(kernels):
    values = make_values((1, 24, 64), torch.float32)
    labels = make_labels((1, 24), 64)
    before = kernels.emu.counters()
    kernels.forward(place(values), labels)
    full = kernels.emu.counters()
    with kernels.emu.settings(max_grid=(1, 1, 1)):
        kernels.forward(place(values), labels)
    clamped = kernels.emu.counters()
    assert full["launches"] - before["launches"] == 1
    assert full["blocks"] - before["blocks"] == 3  # 24 rows, 8 one-warp rows per block
    assert clamped["blocks"] - full["blocks"] == 1


# ------------------------------------------------------------------------ argument errors


def fwd_args(**override):
    """Valid forward arguments (B=1, L=2, V=4) with some replaced."""
    logits, labels = torch.zeros(1, 2, 4), torch.zeros(1, 2, dtype=torch.long)
    outs = [torch.zeros(1, 2) for _ in range(5)]
    args = {"logits": logits.data_ptr(), "dtype": 0, "B": 1, "L": 2, "V": 4, "s0": 8, "s1": 4,
            "labels": labels.data_ptr(), "temperature": 1.0, "ignore_index": -100,
            "logprobs": outs[0].data_ptr(), "lse": outs[1].data_ptr(),
            "entropy": outs[2].data_ptr(), "self_certainty": None, "sum_p_sq": None,
            "stream": None}
    args.update(override)
    return (logits, labels, outs), list(args.values())


def bwd_args(**override):
    """Valid backward arguments (B=1, L=2, V=4) with some replaced."""
    logits, labels = torch.zeros(1, 2, 4), torch.zeros(1, 2, dtype=torch.long)
    rows = [torch.ones(1, 2) for _ in range(5)]
    grad = torch.zeros(1, 2, 4)
    args = {"logits": logits.data_ptr(), "dtype": 0, "B": 1, "L": 2, "V": 4, "s0": 8, "s1": 4,
            "labels": labels.data_ptr(), "lse": rows[0].data_ptr(), "entropy": rows[1].data_ptr(),
            "grad_logprobs": rows[2].data_ptr(), "grad_entropy": rows[3].data_ptr(),
            "grad_lse": rows[4].data_ptr(), "temperature": 1.0, "ignore_index": -100,
            "grad": grad.data_ptr(), "gs0": 8, "gs1": 4, "stream": None}
    args.update(override)
    return (logits, labels, rows, grad), list(args.values())


FWD_ERRORS = [
    ({"dtype": 3}, ERR_DTYPE),
    ({"dtype": -1}, ERR_DTYPE),
    ({"B": -1}, ERR_INVALID_ARGUMENT),
    ({"L": -2}, ERR_INVALID_ARGUMENT),
    ({"V": -4}, ERR_INVALID_ARGUMENT),
    ({"V": 2**30 + 1}, ERR_INVALID_ARGUMENT),
    ({"temperature": 0.0}, ERR_INVALID_ARGUMENT),
    ({"temperature": -1.0}, ERR_INVALID_ARGUMENT),
    ({"temperature": float("nan")}, ERR_INVALID_ARGUMENT),
    ({"temperature": float("inf")}, ERR_INVALID_ARGUMENT),
    ({"labels": None}, ERR_NULL_POINTER),
    ({"logprobs": None}, ERR_NULL_POINTER),
    ({"lse": None}, ERR_NULL_POINTER),
    ({"logits": None}, ERR_NULL_POINTER),
    ({"B": 0, "logits": None, "labels": None, "logprobs": None, "lse": None}, OK),
    ({"L": 0, "logits": None, "labels": None, "logprobs": None, "lse": None}, OK),
]

BWD_ERRORS = [
    ({"dtype": 7}, ERR_DTYPE),
    ({"B": -1}, ERR_INVALID_ARGUMENT),
    ({"V": 2**30 + 1}, ERR_INVALID_ARGUMENT),
    ({"temperature": 0.0}, ERR_INVALID_ARGUMENT),
    ({"temperature": float("nan")}, ERR_INVALID_ARGUMENT),
    ({"entropy": None}, ERR_INVALID_ARGUMENT),  # grad_entropy without entropy
    ({"logits": None}, ERR_NULL_POINTER),
    ({"labels": None}, ERR_NULL_POINTER),
    ({"lse": None}, ERR_NULL_POINTER),
    ({"grad": None}, ERR_NULL_POINTER),
    ({"entropy": None, "grad_entropy": None}, OK),
    ({"B": 0, "logits": None, "grad": None}, OK),
    ({"V": 0, "logits": None, "grad": None}, OK),
]


def _ids(cases):
    return [",".join(f"{k}={v}" for k, v in o.items()) for o, _ in cases]


@pytest.mark.parametrize(("override", "code"), FWD_ERRORS, ids=_ids(FWD_ERRORS))
def test_forward_argument_errors(kernels, override, code):
    _alive, args = fwd_args(**override)
    before = kernels.emu.counters()["launches"]
    assert kernels.fwd(*args) == code
    empty = override.get("B") == 0 or override.get("L") == 0  # nothing to launch
    assert kernels.emu.counters()["launches"] - before == (1 if code == OK and not empty else 0)


@pytest.mark.parametrize(("override", "code"), BWD_ERRORS, ids=_ids(BWD_ERRORS))
def test_backward_argument_errors(kernels, override, code):
    _alive, args = bwd_args(**override)
    before = kernels.emu.counters()["launches"]
    assert kernels.bwd(*args) == code
    empty = override.get("B") == 0 or override.get("V") == 0
    assert kernels.emu.counters()["launches"] - before == (1 if code == OK and not empty else 0)


def test_error_strings(kernels):
    text = {c: kernels.error_string(c).decode() for c in (0, -1, -2, -3, -99, 9, 719)}
    assert text[0] == "no error"
    assert "dtype" in text[-1] and "invalid argument" in text[-2] and "null" in text[-3]
    assert "unknown" in text[-99]
    assert text[9] == "invalid configuration argument"  # positive: the CUDA runtime's text
    assert text[719] == "unspecified launch failure"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
