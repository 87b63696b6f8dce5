"""The CUDA truncated token log-probs (csrc/cuda/truncated_logprobs.cu), executed on the CPU by
the CUDA emulator of tests/cuda_emu, against the float64 reference and the emulated CUDA sampler.

The launchers ``rlkern_truncated_logprobs_{fwd,bwd}_cuda`` are called through ctypes on CPU
tensors, as csrc/cuda/truncated_logprobs_ops.cpp calls them on CUDA tensors. Asserted:

* logprobs / entropy / lse within the fp32 tolerance of the float64 reference for every filter
  combination, both filter orders, ties, per-row filters, bf16 / fp16 / fp32 logits; −inf
  exactly where the label is outside the kept set;
* ``logprobs`` equal the emulated CUDA sampler's ``processed_logprobs`` of the drawn tokens bit
  for bit (the kept set and kept mass come from the same device code,
  rlkern/cuda_sample_row.cuh), and ``lse`` the sampler's ``lse``;
* the backward against the reference's closed-form gradient (the kept set held fixed);
* ignore_index rows (0, never read), rows that cannot be sampled (NaN; lse −inf for all −inf),
  an out-of-range label (NaN), strided rows, nothing written outside the outputs, the same bits
  under every legal thread schedule, and the launchers' argument checks.

Emulated sizes are small (each filtered row costs ~100 block barriers of 256 fibers).
"""

from __future__ import annotations

import pytest
import torch

from cuda_emu import EmulatedLibrary
from cuda_emu.testing import CSRC, DTYPE_CODE, ERR_DTYPE, I64, INT, Guarded, P, bind, emulated, ptr
from cuda_emu.testing import ERR_INVALID_ARGUMENT as ERR_INVALID
from cuda_emu.testing import ERR_NULL_POINTER as ERR_NULL
from rlkern.reference.sample import filtered_probs
from rlkern.reference.truncated_logprobs import (
    truncated_logprobs_grad_reference,
    truncated_logprobs_reference,
)
from test_sample_cuda_emulation import (
    _per_row,
    _seeds,
    emu_sample,
    same_under_every_schedule,
    sample_library,
)

GUARD = 8
ROW_ARGS = [P, INT, I64, I64, I64, I64, I64, P, I64, P, P, P, P, INT]

# Every filter combination, both orders where they differ.
FILTERS = [dict(top_k=5), dict(top_p=0.8), dict(min_p=0.1), dict(top_k=6, top_p=0.7),
           dict(top_k=6, top_p=0.7, filter_order="joint"), dict(top_k=6, min_p=0.05),
           dict(top_p=0.85, min_p=0.02), dict(top_k=8, top_p=0.75, min_p=0.03),
           dict(top_k=8, top_p=0.75, min_p=0.03, filter_order="joint"), dict(top_p=1.0),
           dict(top_k=1), dict()]


@pytest.fixture(scope="module")
def emu() -> EmulatedLibrary:
    lib = emulated(CSRC / "cuda" / "truncated_logprobs.cu")
    bind(lib, "rlkern_truncated_logprobs_fwd_cuda", [*ROW_ARGS, P, P, P, P])
    bind(lib, "rlkern_truncated_logprobs_bwd_cuda", [*ROW_ARGS, P, P, P, P, P])
    return lib


@pytest.fixture(scope="module")
def emu_sampler() -> EmulatedLibrary:
    return sample_library()


def _row_args(logits: torch.Tensor, labels: torch.Tensor, temperature, top_k, top_p, min_p,
              filter_order, ignore_index) -> list:
    """The launchers' shared leading arguments for logits (B, L, V) (vocab contiguous)."""
    B, L, V = logits.shape
    n = B * L
    keep = [labels.reshape(-1).to(torch.int64).contiguous(),
            _per_row(temperature, n, torch.float64), _per_row(top_k, n, torch.int64),
            _per_row(top_p, n, torch.float64), _per_row(min_p, n, torch.float64)]
    args = [logits.data_ptr(), DTYPE_CODE[logits.dtype], B, L, V, logits.stride(0),
            logits.stride(1), keep[0].data_ptr(), ignore_index, keep[1].data_ptr(),
            ptr(keep[2]), ptr(keep[3]), ptr(keep[4]), int(filter_order == "joint")]
    return args, keep  # keep: the arrays must outlive the call


def emu_fwd(emu: EmulatedLibrary, logits: torch.Tensor, labels: torch.Tensor, *,
            temperature=1.0, top_k=None, top_p=None, min_p=None, filter_order="top_k_first",
            ignore_index=-100, entropy=True) -> dict[str, torch.Tensor]:
    """Forward on logits (B, L, V) or (N, V); checks the return code and the guard bands."""
    x = logits if logits.dim() == 3 else logits[:, None, :]
    n = x.shape[0] * x.shape[1]
    args, _keep = _row_args(x, labels, temperature, top_k, top_p, min_p, filter_order,
                            ignore_index)
    bufs = {name: Guarded((n,), torch.float32, pad=GUARD) for name in ("logprobs", "entropy",
                                                                         "lse")}
    rc = emu.lib.rlkern_truncated_logprobs_fwd_cuda(
        *args, bufs["logprobs"].ptr(), bufs["entropy"].ptr() if entropy else None,
        bufs["lse"].ptr(), None)
    assert rc == 0, f"rc={rc}: {emu.last_error()}"
    for name, out in bufs.items():
        if name == "entropy" and not entropy:
            assert not out.written() or n == 0
            continue
        out.check(name)
    return {name: out.view for name, out in bufs.items()}


def emu_bwd(emu: EmulatedLibrary, logits: torch.Tensor, labels: torch.Tensor, grads, *,
            temperature=1.0, top_k=None, top_p=None, min_p=None, filter_order="top_k_first",
            ignore_index=-100) -> torch.Tensor:
    """Backward: the contiguous gradient (the logits' shape and dtype)."""
    x = logits if logits.dim() == 3 else logits[:, None, :]
    n = x.shape[0] * x.shape[1]
    args, _keep = _row_args(x, labels, temperature, top_k, top_p, min_p, filter_order,
                            ignore_index)
    g = [None if t is None else t.to(torch.float32).reshape(-1).contiguous() for t in grads]
    out = Guarded((n, x.shape[2]), logits.dtype, pad=GUARD)
    rc = emu.lib.rlkern_truncated_logprobs_bwd_cuda(*args, *(ptr(t) for t in g), out.ptr(), None)
    assert rc == 0, f"rc={rc}: {emu.last_error()}"
    out.check("grad_logits")
    return out.view.reshape(logits.shape)


def _ref(x, y, **opts):
    return truncated_logprobs_reference(x, y, **opts)


def _close(got, want, name):
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=2e-5,
                               msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("opts", FILTERS, ids=str)
def test_forward_matches_float64_reference(emu, opts):
    gen = torch.Generator().manual_seed(len(str(opts)))
    x = torch.randn(7, 61, generator=gen) * 2.5
    y = torch.randint(0, 61, (7,), generator=gen)
    got = emu_fwd(emu, x, y, temperature=0.8, **opts)
    ref = _ref(x, y, temperature=0.8, **opts)
    kept = torch.stack([filtered_probs(x[r].double(), temperature=0.8, **opts)[y[r]] > 0
                        for r in range(7)])
    assert torch.equal(torch.isfinite(got["logprobs"]), kept)
    assert torch.isneginf(got["logprobs"][~kept]).all()
    for name in ("logprobs", "entropy", "lse"):
        _close(got[name], ref[name], name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_half_precision_inputs_and_every_label(emu, dtype):
    # Every label of two rows: the renormalised probabilities of the kept set sum to 1.
    gen = torch.Generator().manual_seed(3)
    V = 40
    rows = (torch.randn(2, V, generator=gen) * 3).to(dtype)
    x = rows.repeat_interleave(V, 0)
    y = torch.arange(V).repeat(2)
    opts = dict(top_k=12, top_p=0.8, temperature=0.7)
    got = emu_fwd(emu, x, y, **opts)
    ref = _ref(x, y, **opts)
    for name in ("logprobs", "entropy", "lse"):
        _close(got[name], ref[name], name)
    torch.testing.assert_close(got["logprobs"].double().exp().reshape(2, V).sum(-1),
                               torch.ones(2, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_ties_keep_lower_indices(emu):
    # Six tokens tied at the top: top-k keeps the lowest indices, min-p all six.
    x = torch.zeros(10, 10)
    x[:, :6] = 1.0
    y = torch.arange(10)
    for opts, kept in ((dict(top_k=3), 3), (dict(min_p=0.5), 6), (dict(top_p=0.4), None)):
        lp = emu_fwd(emu, x, y, **opts)["logprobs"]
        ref = _ref(x, y, **opts)["logprobs"]
        assert torch.equal(torch.isfinite(lp), torch.isfinite(ref)), opts
        if kept is not None:
            assert torch.isfinite(lp).nonzero().flatten().tolist() == list(range(kept))
        _close(lp[torch.isfinite(lp)], ref[torch.isfinite(ref)], str(opts))


def test_per_row_filters_and_strided_3d_layout(emu):
    # Per-row tensors (one value per (b, l)), a non-contiguous (B, L, V) view.
    gen = torch.Generator().manual_seed(11)
    B, L, V = 2, 3, 97
    store = torch.full((B, L + 1, V + 5), float("nan"))
    store[:, :L, :V] = torch.randn(B, L, V, generator=gen) * 2
    x = store[:, :L, :V]
    y = torch.randint(0, V, (B, L), generator=gen)
    opts = dict(temperature=torch.linspace(0.5, 1.5, B * L, dtype=torch.float64),
                top_k=torch.tensor([1, 5, 97, 200, 40, 3]),
                top_p=torch.tensor([0.3, 0.9, 1.0, 0.5, 0.99, 0.7], dtype=torch.float64),
                min_p=torch.tensor([0.0, 0.05, 0.0, 0.2, 0.0, 0.01], dtype=torch.float64))
    got = emu_fwd(emu, x, y, **opts)
    ref = _ref(x.contiguous(), y, **opts)
    for name in ("logprobs", "entropy", "lse"):
        _close(got[name], ref[name].reshape(-1), name)
    assert got["logprobs"][0] == 0.0 or torch.isneginf(got["logprobs"][0])  # top_k = 1


def test_bitwise_equal_to_the_cuda_sampler(emu, emu_sampler):
    """logprobs(drawn tokens) == the sampler's processed_logprobs bit for bit, and the same lse,
    every dtype and filter order, from the same emulated device code."""
    gen = torch.Generator().manual_seed(5)
    n, V = 6, 300
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for opts in (dict(top_p=0.9), dict(top_k=20, min_p=0.05),
                     dict(top_k=30, top_p=0.8, filter_order="joint"), dict(top_p=0.95)):
            x = (torch.randn(n, V, generator=gen) * 3).to(dtype)
            seeds, steps = _seeds(n, gen)
            drawn = emu_sample(emu_sampler, x, seeds=seeds, steps=steps, temperature=0.7, **opts)
            proc = drawn["processed_logprobs"]
            got = emu_fwd(emu, x, drawn["tokens"], temperature=0.7, **opts)
            assert torch.equal(got["logprobs"], proc), (dtype, opts, got["logprobs"] - proc)
            assert torch.equal(got["lse"], drawn["lse"]), (dtype, opts)


@pytest.mark.parametrize("opts", [dict(top_p=0.8), dict(top_k=6, min_p=0.05),
                                  dict(top_k=8, top_p=0.75, filter_order="joint")], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_reference_gradient(emu, opts, dtype):
    gen = torch.Generator().manual_seed(2)
    n, V = 6, 50
    x = (torch.randn(n, V, generator=gen) * 2).to(dtype)
    y = torch.randint(0, V, (n,), generator=gen)
    y[0] = int(x[0].float().argmax())  # a kept label
    y[1] = -100                        # ignored: a zero row
    grads = [torch.randn(n, generator=gen) for _ in range(3)]
    kw = dict(temperature=0.9, **opts)
    got = emu_bwd(emu, x, y, grads, **kw)
    ref = truncated_logprobs_grad_reference(x, y, *grads, **kw)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(got.double(), ref.to(dtype).double(), **tol)
    assert (got[1] == 0).all()
    # Each upstream gradient alone (the others null); the closed form of the reference is
    # checked against autograd in tests/test_truncated_logprobs.py.
    for i in range(3):
        only = [g if j == i else None for j, g in enumerate(grads)]
        got_i = emu_bwd(emu, x, y, only, **kw)
        ref_i = truncated_logprobs_grad_reference(x, y, *only, **kw)
        torch.testing.assert_close(got_i.double(), ref_i.to(dtype).double(), **tol)


def test_label_outside_the_kept_set_has_no_logprob_gradient(emu):
    x = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    y = torch.tensor([4])  # filtered out by top_k = 2
    got = emu_fwd(emu, x, y, top_k=2)
    assert torch.isneginf(got["logprobs"]).all()
    g = emu_bwd(emu, x, y, [torch.ones(1), None, None], top_k=2)
    assert (g == 0).all()


def test_ignore_index_bad_rows_and_out_of_range_labels(emu):
    x = torch.randn(5, 30)
    x[1, 4] = float("nan")
    x[2] = float("-inf")
    x[3, 7] = float("inf")
    y = torch.tensor([-100, 3, 3, 3, 30])  # row 4: a label outside [0, V) (checks off)
    got = emu_fwd(emu, x, y, top_p=0.9)
    assert got["logprobs"][0] == 0 and got["entropy"][0] == 0 and got["lse"][0] == 0
    for r in (1, 2, 3):
        assert torch.isnan(got["logprobs"][r]) and torch.isnan(got["entropy"][r])
    assert torch.isnan(got["lse"][1]) and torch.isneginf(got["lse"][2])
    assert torch.isnan(got["lse"][3])
    assert torch.isnan(got["logprobs"][4]) and torch.isfinite(got["lse"][4])
    # an ignored row is never read: NaN logits there change nothing
    x[0] = float("nan")
    again = emu_fwd(emu, x, y, top_p=0.9)
    assert again["logprobs"][0] == 0 and again["lse"][0] == 0
    g = emu_bwd(emu, x, y, [torch.ones(5), torch.ones(5), torch.ones(5)], top_p=0.9)
    assert (g[0] == 0).all() and torch.isnan(g[1:4]).all() and torch.isfinite(g[4]).all()
    # without entropy: nothing written there
    emu_fwd(emu, x, y, top_p=0.9, entropy=False)


def test_batch_invariance_and_schedules(emu):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(5, 257, generator=gen) * 3
    y = torch.randint(0, 257, (5,), generator=gen)
    opts = dict(temperature=0.9, top_k=40, top_p=0.9)
    full = emu_fwd(emu, x, y, **opts)
    alone = emu_fwd(emu, x[3:4].contiguous(), y[3:4], **opts)
    grads = [torch.randn(5, generator=gen) for _ in range(3)]
    g_full = emu_bwd(emu, x, y, grads, **opts)
    g_alone = emu_bwd(emu, x[3:4].contiguous(), y[3:4], [g[3:4] for g in grads], **opts)
    assert torch.equal(g_full[3:4], g_alone)
    for name, out in full.items():
        assert torch.equal(out[3:4], alone[name]), name
    same_under_every_schedule(emu, {**full, "grad": g_full},
                              lambda: {**emu_fwd(emu, x, y, **opts),
                                       "grad": emu_bwd(emu, x, y, grads, **opts)})


def test_launchers_reject_bad_arguments(emu):
    fwd = emu.lib.rlkern_truncated_logprobs_fwd_cuda
    bwd = emu.lib.rlkern_truncated_logprobs_bwd_cuda
    x = torch.randn(2, 3, 8)
    y = torch.zeros(6, dtype=torch.int64)
    t = torch.ones(6, dtype=torch.float64)
    o = [torch.empty(6) for _ in range(3)]
    g = torch.empty(2, 3, 8)
    x_ptr, y_ptr = x.data_ptr(), y.data_ptr()

    def row(dtype=0, B=2, L=3, V=8, logits=x_ptr, labels=y_ptr, s0=24):
        return [logits, dtype, B, L, V, s0, 8, labels, -100, t.data_ptr(), None, None, None, 0]

    outs = [o[0].data_ptr(), None, o[2].data_ptr(), None]
    assert fwd(*row(), *outs) == 0
    assert bwd(*row(), None, None, None, g.data_ptr(), None) == 0
    assert fwd(*row(dtype=7), *outs) == ERR_DTYPE
    assert fwd(*row(V=0), *outs) == ERR_INVALID
    assert fwd(*row(B=-1), *outs) == ERR_INVALID
    assert fwd(*row(s0=-1), *outs) == ERR_INVALID
    assert fwd(*row(B=2**31, L=2), *outs) == ERR_INVALID  # more rows than a grid holds
    assert fwd(*row(logits=None), *outs) == ERR_NULL
    assert fwd(*row(labels=None), *outs) == ERR_NULL
    assert fwd(*row(), None, None, o[2].data_ptr(), None) == ERR_NULL  # no logprobs output
    assert bwd(*row(), None, None, None, None, None) == ERR_NULL  # no grad_logits
    assert fwd(*row(B=0, logits=None), *outs) == 0  # empty: nothing to read
    assert bwd(*row(L=0, logits=None), None, None, None, None, None) == 0
