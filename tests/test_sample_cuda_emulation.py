"""The CUDA sampler (csrc/cuda/sample.cu), executed on the CPU by the CUDA emulator of
tests/cuda_emu, against the C++ CPU kernel and the float64 reference.

The launcher ``rlkern_sample_cuda`` is called through ctypes on CPU tensors, as
csrc/cuda_ops.cpp calls it on CUDA tensors. What docs/sampling.md promises across backends, and
what is asserted here:

* tokens: the same Philox uniform for ``(seed, step)`` on every backend, so the same token as
  the CPU kernel and the reference (the sums behind the CDF are accumulated in different
  orders; a uniform within rounding of a CDF step could split them — none of these cases does);
* logprobs and entropy: within the fp32 tolerance of the float64 reference;
* the filtered distribution exactly (χ²), filtered-out tokens never drawn;
* bitwise batch invariance and replay, and the same bits under every legal thread schedule
  the emulator can pick (a missing barrier would show as a difference);
* rows that cannot be sampled (NaN, all −inf) are flagged through ``lse``; nothing is read
  outside a row and nothing is written outside the outputs (NaN-filled padding, guard bands).

Skipped, with the reason, when no host C++ compiler is found.
"""

from __future__ import annotations

import pytest
import torch
from scipy import stats

import sample_cases
from cuda_emu import EmulatedLibrary
from cuda_emu.testing import CSRC, DTYPE_CODE, ERR_DTYPE, I64, INT, Guarded, P, bind, emulated, ptr
from cuda_emu.testing import ERR_INVALID_ARGUMENT as ERR_INVALID
from cuda_emu.testing import ERR_NULL_POINTER as ERR_NULL
from rlkern.ops.sample import sample
from rlkern.reference.sample import filtered_probs

GUARD = 8
OUTPUTS = ("tokens", "raw_logprobs", "processed_logprobs", "entropy", "lse")
# rlkern_sample_cuda's ctypes signature; rlkern_sample_n_cuda has num_samples after n.
SAMPLE_ARGS = [P, INT, I64, I64, I64, I64, P, P, P, P, P, P, P, INT, INT, P, P, P, P, P, P]


def sample_library() -> EmulatedLibrary:
    """csrc/cuda/sample.cu built for the emulator, both launchers bound (also used by
    tests/test_sample_groups_cuda_emulation.py and the truncated log-probs' emulation tests)."""
    lib = emulated(CSRC / "cuda" / "sample.cu")
    bind(lib, "rlkern_sample_cuda", SAMPLE_ARGS)
    bind(lib, "rlkern_sample_n_cuda", [*SAMPLE_ARGS[:6], I64, *SAMPLE_ARGS[6:]])
    return lib


@pytest.fixture(scope="module")
def emu() -> EmulatedLibrary:
    return sample_library()


def _per_row(value, n: int, dtype: torch.dtype) -> torch.Tensor | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.to(dtype).contiguous()
    return torch.full((n,), value, dtype=dtype)


def _padded_logits(logits: torch.Tensor, pad: int = 5) -> torch.Tensor:
    """The same values in NaN-filled storage with a row stride of V + pad: a read outside a row
    (or beyond the last one) poisons a result."""
    R, V = logits.shape
    store = torch.full((R + 1, V + pad), float("nan"), dtype=logits.dtype)
    store[:R, :V] = logits
    return store[:R, :V]


def emu_sample(emu: EmulatedLibrary, logits: torch.Tensor, *, seeds, steps, temperature=1.0,
               top_k=None, top_p=None, min_p=None, indices=None, filter_order="top_k_first",
               raw_temperature=True, num_samples=None) -> dict[str, torch.Tensor]:
    """Call the launcher on CPU tensors (rlkern_sample_n_cuda when num_samples is given: n·G
    outputs); check its return code and the guard bands."""
    R, V = logits.shape
    n = seeds.numel() if indices is None else indices.numel()
    G = 1 if num_samples is None else num_samples
    temp = _per_row(temperature, n, torch.float64)
    k = _per_row(top_k, n, torch.int64)
    p = _per_row(top_p, n, torch.float64)
    mp = _per_row(min_p, n, torch.float64)
    idx = None if indices is None else indices.to(torch.int64).contiguous()
    bufs = {name: Guarded((n * G,), torch.int64 if name == "tokens" else torch.float32,
                          pad=GUARD) for name in OUTPUTS}
    head = [logits.data_ptr(), DTYPE_CODE[logits.dtype], R, V, logits.stride(0) if R > 1 else V,
            n, *([] if num_samples is None else [num_samples])]
    fn = emu.lib.rlkern_sample_cuda if num_samples is None else emu.lib.rlkern_sample_n_cuda
    rc = fn(*head, ptr(idx), temp.data_ptr(), ptr(k), ptr(p), ptr(mp), seeds.data_ptr(),
            steps.data_ptr(), int(filter_order == "joint"), int(raw_temperature),
            *(bufs[name].ptr() for name in OUTPUTS), None)
    assert rc == 0, f"rc={rc}: {emu.last_error()}"
    for name, out in bufs.items():
        assert out.untouched(), f"{name}: a write outside the output"
        assert out.written(), f"{name}: a row was never written"
    return {name: out.view for name, out in bufs.items()}


def same_under_every_schedule(emu: EmulatedLibrary, expected: dict[str, torch.Tensor],
                              run) -> None:
    """``run()`` gives ``expected`` bit for bit under thread schedules the emulator can pick
    (reverse, random, one warp racing ahead, one worker): a missing barrier would not."""
    for settings in (dict(order="reverse"), dict(order="random", seed=3),
                     dict(run_ahead=True), dict(order="reverse", run_ahead=True, workers=1)):
        with emu.settings(**settings):
            other = run()
        for name, out in expected.items():
            assert torch.equal(out, other[name]), (settings, name)


def _seeds(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.randint(0, 2**40, (n,), generator=gen),
            torch.randint(0, 1000, (n,), generator=gen))


OPTIONS = [*sample_cases.OPTIONS, dict(top_k=50), dict(top_p=0.95, temperature=1.3),
           dict(temperature=0.6, raw_temperature=False)]
_ids = sample_cases.option_id


def check_against_cpu(got, logits, seeds, steps, indices=None, num_samples=1, **opts) -> None:
    """Tokens equal to the C++ CPU kernel and the reference; values within the fp32 tolerance
    of the float64 reference (ALGORITHMS.md §4; the tolerance of tests/test_sample.py)."""
    kw = dict(indices=indices, return_entropy=True, num_samples=num_samples, **opts)
    cpu = sample(logits, seeds=seeds, steps=steps, backend="cpu", **kw)
    ref = sample(logits, seeds=seeds, steps=steps, backend="torch", **kw)
    assert torch.equal(got["tokens"], cpu.tokens), (got["tokens"], cpu.tokens)
    assert torch.equal(got["tokens"], ref.tokens)
    for name in ("raw_logprobs", "processed_logprobs", "entropy"):
        torch.testing.assert_close(got[name].double(), getattr(ref, name).double(), rtol=1e-5,
                                   atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")
    rows = indices if indices is not None else torch.arange(logits.shape[0])
    temp = opts.get("temperature", 1.0)
    lse = torch.logsumexp(logits.double()[rows] / temp, -1).repeat_interleave(num_samples)
    torch.testing.assert_close(got["lse"].double(), lse, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("opts", OPTIONS, ids=_ids)
@pytest.mark.parametrize("V", [1, 3, 99, 4099])
def test_matches_cpu_kernel_and_reference(emu, opts, V):
    gen = torch.Generator().manual_seed(V * 31 + len(opts))
    logits = torch.randn(13, V, generator=gen) * 3
    seeds, steps = _seeds(13, gen)
    got = emu_sample(emu, _padded_logits(logits), seeds=seeds, steps=steps, **opts)
    check_against_cpu(got, logits, seeds, steps, **opts)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("opts", [dict(temperature=0.7), dict(top_k=50, top_p=0.9,
                                                               temperature=0.7)], ids=_ids)
def test_half_precision_inputs(emu, dtype, opts):
    gen = torch.Generator().manual_seed(7)
    logits = (torch.randn(9, 2053, generator=gen) * 4).to(dtype)
    seeds, steps = _seeds(9, gen)
    got = emu_sample(emu, _padded_logits(logits), seeds=seeds, steps=steps, **opts)
    check_against_cpu(got, logits, seeds, steps, **opts)


def test_qwen_vocabulary_bf16(emu):
    # V = 151936 (Qwen): several 2048-token chunks in the draw, a deep threshold search.
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(3, 151936, generator=gen) * 4).to(torch.bfloat16)
    seeds, steps = _seeds(3, gen)
    for opts in (dict(temperature=0.7), dict(temperature=0.7, top_k=50, top_p=0.9)):
        got = emu_sample(emu, logits, seeds=seeds, steps=steps, **opts)
        check_against_cpu(got, logits, seeds, steps, **opts)


def test_per_row_options_and_shared_rows(emu):
    # indices: the G members of a group draw from one shared row at their first step.
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(3, 517, generator=gen) * 2.5
    n = 12
    indices = torch.arange(3).repeat_interleave(4)
    seeds, steps = _seeds(n, gen)
    opts = dict(temperature=torch.linspace(0.5, 1.5, n, dtype=torch.float64),
                top_k=torch.tensor([1, 5, 517, 600, 40, 3, 7, 100, 2, 9, 517, 20]),
                top_p=torch.linspace(0.3, 1.0, n, dtype=torch.float64),
                min_p=torch.tensor([0.0, 0.05] * 6, dtype=torch.float64))
    got = emu_sample(emu, logits, seeds=seeds, steps=steps, indices=indices, **opts)
    cpu = sample(logits, seeds=seeds, steps=steps, indices=indices, backend="cpu",
                 return_entropy=True, **opts)
    assert torch.equal(got["tokens"], cpu.tokens)
    for name in ("raw_logprobs", "processed_logprobs", "entropy"):
        torch.testing.assert_close(got[name], getattr(cpu, name), rtol=1e-5, atol=2e-5)
    assert got["processed_logprobs"][0] == 0.0  # top_k = 1: one kept token, log 1 exactly
    # members of a group (same row) with different seeds draw different tokens, and their
    # raw logprobs / entropy (same row, same temperature) agree with the row's
    assert len(set(got["tokens"][4:8].tolist())) > 1


@pytest.mark.parametrize("opts", [dict(), dict(top_k=6, top_p=0.8), dict(min_p=0.2),
                                  dict(top_p=0.7, filter_order="joint")], ids=_ids)
def test_chi2_goodness_of_fit(emu, opts):
    gen = torch.Generator().manual_seed(0)
    # A filtered row costs ~100 block barriers (the threshold searches), each a switch of 256
    # emulated threads: fewer draws there (the kept cells still expect ≥ 20 each).
    V, n = 13, (3000 if not opts else 500)
    row = torch.randn(1, V, generator=gen) * 1.5
    seeds, steps = torch.arange(1000, 1000 + n), torch.zeros(n, dtype=torch.int64)
    got = emu_sample(emu, row, seeds=seeds, steps=steps, indices=torch.zeros(n, dtype=torch.long),
                     **opts)
    p = filtered_probs(row[0].double(), **opts)
    assert_draws_follow(got["tokens"], p, n)
    torch.testing.assert_close(got["processed_logprobs"].double(), p.log()[got["tokens"]],
                               rtol=1e-5, atol=1e-5)


def assert_draws_follow(tokens: torch.Tensor, p: torch.Tensor, n: int) -> None:
    """The n drawn tokens never hit a token of probability 0 under p, and their counts fit p
    (χ² goodness of fit, p-value > 1e-3)."""
    counts = torch.bincount(tokens, minlength=p.numel()).double()
    kept = p > 0
    assert counts[~kept].sum() == 0, "a filtered-out token was drawn"
    res = stats.chisquare(counts[kept].numpy(), (p[kept] * n).numpy())
    assert res.pvalue > 1e-3, (res, counts, p * n)


def test_ties_keep_lower_indices(emu):
    # Ties at the top-k threshold: the lower vocabulary indices are kept.
    logits = torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0, -1.0, 1.0]])
    n = 120
    got = emu_sample(emu, logits, seeds=torch.arange(n), steps=torch.zeros(n, dtype=torch.long),
                     indices=torch.zeros(n, dtype=torch.long), top_k=2)
    assert set(got["tokens"].tolist()) == {1, 2}


def test_batch_invariance_replay_and_schedules(emu):
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 1031, generator=gen) * 3
    seeds, steps = _seeds(6, gen)
    opts = dict(temperature=0.9, top_k=40, top_p=0.9)
    full = emu_sample(emu, logits, seeds=seeds, steps=steps, **opts)
    again = emu_sample(emu, logits, seeds=seeds, steps=steps, **opts)
    perm = torch.tensor([4, 1, 5, 0, 3, 2])
    permuted = emu_sample(emu, logits[perm].contiguous(), seeds=seeds[perm], steps=steps[perm],
                          **opts)
    alone = emu_sample(emu, logits[2:3].contiguous(), seeds=seeds[2:3], steps=steps[2:3], **opts)
    for name, out in full.items():
        assert torch.equal(out, again[name]), name  # replay
        assert torch.equal(out[perm], permuted[name]), name
        assert torch.equal(out[2:3], alone[name]), name
    # Every legal thread schedule gives the same bits (a race would not).
    same_under_every_schedule(emu, full,
                              lambda: emu_sample(emu, logits, seeds=seeds, steps=steps, **opts))


def test_rows_that_cannot_be_sampled(emu):
    logits = torch.randn(3, 50)
    logits[0, 7] = float("nan")
    logits[1] = float("-inf")
    got = emu_sample(emu, logits, seeds=torch.arange(3), steps=torch.zeros(3, dtype=torch.long),
                     top_p=0.9)
    assert got["tokens"][:2].tolist() == [-1, -1]
    assert torch.isnan(got["lse"][0]) and torch.isneginf(got["lse"][1])
    assert torch.isfinite(got["lse"][2]) and 0 <= int(got["tokens"][2]) < 50


@pytest.mark.parametrize("case", ["bf16 finfo.min", "one logit 1e10", "temperature 1e-10",
                                  "lse beyond float", "all NaN", "+inf"])
def test_rows_at_the_edges_of_the_float_range(emu, case):
    """z = (x − max x)/T: finite rows are sampled at any magnitude and temperature (they were
    flagged as NaN or all −inf once x/T overflowed); an all-NaN or +inf row is flagged as
    NaN (not as all −inf)."""
    logits, temperature = torch.randn(2, 40), 1.0
    if case == "bf16 finfo.min":
        logits = torch.full((2, 40), torch.finfo(torch.bfloat16).min, dtype=torch.bfloat16)
        temperature = 0.3
    elif case == "one logit 1e10":
        logits[:, 17] = 1e10
    elif case == "temperature 1e-10":
        logits[:, 5] = 10.0
        temperature = 1e-10
    elif case == "lse beyond float":
        logits[:, 3] = 3e38
        temperature = 1e-10
    elif case == "all NaN":
        logits[0] = float("nan")
    else:
        logits[0, 9] = float("inf")
    got = emu_sample(emu, logits, seeds=torch.arange(2), steps=torch.zeros(2, dtype=torch.long),
                     temperature=temperature, top_p=0.9)
    if case in ("all NaN", "+inf"):
        assert int(got["tokens"][0]) == -1 and torch.isnan(got["lse"][0])
        assert 0 <= int(got["tokens"][1]) < 40
        return
    assert ((got["tokens"] >= 0) & (got["tokens"] < 40)).all()
    for name in ("raw_logprobs", "processed_logprobs", "entropy"):
        assert torch.isfinite(got[name]).all(), name
    expected = {"one logit 1e10": 17, "temperature 1e-10": 5, "lse beyond float": 3}.get(case)
    if expected is not None:
        assert got["tokens"].tolist() == [expected] * 2


class LauncherCall:
    """Valid buffers for the sampler launchers' argument checks: 2 rows of 8 fp32 logits,
    temperature 1, seeds and steps 0, room for 8 output rows. ``args`` gives the arguments of
    ``rlkern_sample_cuda`` (``G`` None) or ``rlkern_sample_n_cuda`` with one of them changed."""

    def __init__(self) -> None:
        self.x = torch.randn(2, 8)
        self.t = torch.ones(2, dtype=torch.float64)
        self.s = torch.zeros(2, dtype=torch.int64)
        self.tok = torch.empty(8, dtype=torch.int64)
        self.o = [torch.empty(8) for _ in range(4)]

    def args(self, *, G=None, dtype=0, R=2, V=8, n=2, logits=True, seeds=True) -> list:
        x = self.x.data_ptr() if logits is True else logits
        sd = self.s.data_ptr() if seeds is True else seeds
        o = [b.data_ptr() for b in self.o]
        return ([x, dtype, R, V, 8, n] + ([] if G is None else [G])
                + [None, self.t.data_ptr(), None, None, None, sd, self.s.data_ptr(), 0, 1,
                   self.tok.data_ptr(), o[0], o[1], None, o[3], None])


def test_launcher_rejects_bad_arguments(emu):
    f = emu.lib.rlkern_sample_cuda
    args = LauncherCall().args
    assert f(*args()) == 0
    assert f(*args(dtype=7)) == ERR_DTYPE
    assert f(*args(n=3)) == ERR_INVALID  # more output rows than logits rows, no indices
    assert f(*args(V=0)) == ERR_INVALID
    assert f(*args(n=-1)) == ERR_INVALID
    assert f(*args(logits=None)) == ERR_NULL
    assert f(*args(seeds=None)) == ERR_NULL
    assert f(*args(n=0, logits=None)) == 0  # empty: nothing to read
