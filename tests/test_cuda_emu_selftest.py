"""The CUDA emulator of tests/cuda_emu, tested on its own: tests/cuda_emu/selftest.cu checks
its semantics (shuffles with PTX's rules, votes and reductions, barriers and shared memory,
atomics, half/bfloat16 conversions bitwise against torch), shows that a missing barrier is seen
as a dependence on the thread schedule, and plants bugs the emulator must report with the
source line; the source rewriter is checked on its own. The CUDA kernels of csrc/cuda run in
the emulator in test_*cuda_emulation.py.

Skipped, with the reason, when no host C++ compiler is found.
"""

from __future__ import annotations

import ctypes
import math
import sys

import pytest
import torch

from cuda_emu import CudaEmuError, EmulatedLibrary
from cuda_emu.testing import LAUNCH_FAILURE, ROOT, P, bind, emulated


@pytest.fixture(scope="module")
def selftest() -> EmulatedLibrary:
    return emulated(ROOT / "tests" / "cuda_emu" / "selftest.cu", include_dirs=())


def shfl_expected(mode, lane, arg, width):
    """PTX shfl.sync: the lane read (its own when the source is out of range)."""
    first = lane & ~(width - 1)
    if mode == "idx":
        return first + (arg & (width - 1))
    if mode == "up":
        return lane - arg if lane - arg >= first else lane
    if mode == "down":
        return lane + arg if lane + arg <= first + width - 1 else lane
    src = lane ^ arg  # xor may read an earlier segment, never a later one
    return src if src <= first + width - 1 else lane


SHUFFLES = [("idx", 5, 32), ("idx", 37, 8), ("up", 3, 32), ("up", 3, 8), ("down", 1, 32),
            ("down", 3, 16), ("xor", 1, 32), ("xor", 16, 16), ("xor", 4, 8), ("xor", 31, 32)]


@pytest.mark.parametrize(("mode", "arg", "width"), SHUFFLES)
def test_emulated_shuffles_follow_ptx(selftest, mode, arg, width):
    fn = bind(selftest, "selftest_shuffle", [ctypes.c_int] * 3 + [P])
    out = torch.zeros(32, dtype=torch.int32)
    assert fn(["idx", "up", "down", "xor"].index(mode), arg, width, out.data_ptr()) == 0
    assert (out - 100).tolist() == [shfl_expected(mode, lane, arg, width) for lane in range(32)]


def test_emulated_warp_ops(selftest):
    fn = bind(selftest, "selftest_warp_ops", [P, ctypes.c_int, P, P, P])
    warps = 3
    x = torch.randn(32 * warps, dtype=torch.float64)
    sums, votes = torch.zeros_like(x), torch.zeros(3 * warps, dtype=torch.int32)
    ballots = torch.zeros(warps, dtype=torch.int32)
    assert fn(x.data_ptr(), warps, sums.data_ptr(), ballots.data_ptr(), votes.data_ptr()) == 0
    ballots = ballots.long() & 0xFFFFFFFF  # unsigned
    for w in range(warps):
        chunk = x[32 * w : 32 * (w + 1)]
        torch.testing.assert_close(sums[32 * w : 32 * (w + 1)], chunk.sum().expand(32))
        assert ballots[w] == sum(1 << lane for lane in range(32) if chunk[lane] > 0)
        assert votes[3 * w : 3 * w + 3].tolist() == [1, 0, sum(range(32))]


@pytest.mark.parametrize(("threads", "blocks"), [(32, 1), (128, 2), (256, 5)])
def test_emulated_shared_memory_and_barriers(selftest, threads, blocks):
    """A tree reduction in dynamic shared memory, a static __shared__ counter fed by
    atomics, __syncthreads_count, and a grid-stride loop over rows."""
    fn = bind(selftest, "selftest_block_sum", [P, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                                  ctypes.c_int, P, P])
    rows, n = 7, 1000
    x = torch.randn(rows, n)
    sums, positives = torch.zeros(rows), torch.zeros(2 * rows, dtype=torch.int32)
    rc = fn(x.data_ptr(), rows, n, threads, blocks, sums.data_ptr(), positives.data_ptr())
    assert rc == 0, selftest.last_error()
    torch.testing.assert_close(sums, x.sum(1), rtol=1e-5, atol=1e-4)
    assert positives[:rows].tolist() == (x > 0).sum(1).tolist()
    per_thread = torch.zeros(rows, threads, dtype=torch.bool)
    for i in range(threads):
        per_thread[:, i] = (x[:, i::threads] > 0).any(1)
    assert positives[rows:].tolist() == per_thread.sum(1).tolist()


@pytest.mark.parametrize(("blocks", "threads"), [(1, 32), (6, 64)])
def test_emulated_atomics(selftest, blocks, threads):
    """Each atomic applied once by every thread of several blocks, which run on parallel
    worker threads: nothing is lost, and every old value is returned once."""
    fn = bind(selftest, "selftest_atomics", [P, ctypes.c_int, ctypes.c_int, P, P, P, P])
    n = blocks * threads
    v = torch.randint(-50, 51, (n,), dtype=torch.int32, generator=torch.Generator().manual_seed(n))
    fsum = torch.zeros(1)
    ints = torch.tensor([7, 7, -1000, 1000, -1, 0], dtype=torch.int32)
    bits = torch.tensor([-1, 0, 0], dtype=torch.int32)  # viewed as unsigned by the kernel
    exch_old = torch.zeros(n, dtype=torch.int32)
    args = (v, fsum, ints, bits, exch_old)
    assert fn(v.data_ptr(), blocks, threads, *(t.data_ptr() for t in args[1:])) == 0, \
        selftest.last_error()
    assert fsum.item() == 0.5 * v.sum().item()  # halves of small integers: exact in float
    assert ints[:4].tolist() == [7 + v.sum().item(), 7 - v.sum().item(), v.max().item(),
                                 v.min().item()]
    # The exchanges form one chain: the old values and the final one are the initial value
    # and every thread's index, each exactly once.
    assert sorted([*exch_old.tolist(), ints[4].item()]) == [-1, *range(n)]
    assert ints[5].item() == n  # no compare-and-swap increment lost
    xor = 0
    for x in v.tolist():
        xor ^= x & 0xFFFFFFFF
    # Every lane of a warp clears its bit of bits[0] and sets its bit of bits[1].
    assert [b & 0xFFFFFFFF for b in bits.tolist()] == [0, 0xFFFFFFFF, xor]


def test_emulated_half_and_bfloat16_conversions_match_torch(selftest):
    fn = bind(selftest, "selftest_convert", [P, ctypes.c_int, P, P, P, P])
    x = torch.cat([
        torch.randn(2000) * torch.logspace(-9, 6, 2000),  # subnormal to overflow for fp16
        torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 6e-8, 3e-8, 2.0**-25, 1.0 + 2**-11,
                      1.0 + 3 * 2**-11, float("inf"), float("-inf"), 3.4e38, 1e-40]),
    ])
    n = x.numel()
    hb, bb = torch.zeros(n, dtype=torch.int16), torch.zeros(n, dtype=torch.int16)
    hf, bf = torch.zeros(n), torch.zeros(n)
    assert fn(x.data_ptr(), n, hb.data_ptr(), bb.data_ptr(), hf.data_ptr(), bf.data_ptr()) == 0
    assert torch.equal(hb, x.half().view(torch.int16))
    assert torch.equal(bb, x.bfloat16().view(torch.int16))
    assert torch.equal(hf, x.half().float())
    assert torch.equal(bf, x.bfloat16().float())
    nan = torch.tensor([float("nan")])
    assert fn(nan.data_ptr(), 1, hb.data_ptr(), bb.data_ptr(), hf.data_ptr(), bf.data_ptr()) == 0
    assert math.isnan(hf[0]) and math.isnan(bf[0])


def test_a_missing_barrier_shows_as_schedule_dependence(selftest):
    """racy_sum_kernel lacks the __syncthreads between writing shared memory and reading it;
    its result changes with the thread order, which is how the tests above would notice."""
    fn = bind(selftest, "selftest_racy_sum", [P, P])
    x, out = torch.randn(64), torch.zeros(1)
    results = set()
    for settings in [{"order": "forward"}, {"order": "reverse"}, {"order": "random", "seed": 1},
                     {"order": "random", "seed": 2}]:
        with selftest.settings(**settings):
            assert fn(x.data_ptr(), out.data_ptr()) == 0
        results.add(out.item())
    assert len(results) > 1


PLANTED_BUGS = [
    ("divergent_barrier", LAUNCH_FAILURE, "divergent barriers"),
    ("barrier_after_exit", LAUNCH_FAILURE, "exited while 40 other threads wait at __syncthreads"),
    ("partial_shuffle", LAUNCH_FAILURE, "exited while lanes 0-15 of its warp wait for it"),
    ("deadlock", LAUNCH_FAILURE, "deadlock: no thread can proceed"),
    ("misaligned_float4", LAUNCH_FAILURE, "misaligned address"),
    ("misaligned_ldg", LAUNCH_FAILURE, "__ldg: misaligned address"),
    ("local_array_oob", LAUNCH_FAILURE, "index 4 out of bounds for type 'float [4]'"),
    ("shared_array_oob", LAUNCH_FAILURE, "index 32 out of bounds for type 'float [32]'"),
    ("launch_bounds", 701, "exceeds the kernel's __launch_bounds__(64)"),
    ("block_too_large", 9, "invalid configuration"),
    ("too_much_dynamic_shared", 1, "dynamic shared memory exceed"),
]


@pytest.mark.parametrize(("index", "code", "message"),
                         [(i, c, m) for i, (_, c, m) in enumerate(PLANTED_BUGS)],
                         ids=[name for name, _, _ in PLANTED_BUGS])
def test_emulator_reports_planted_bugs(selftest, index, code, message):
    fn = bind(selftest, "selftest_bug", [ctypes.c_int, P])
    buffer = torch.zeros(1024)
    assert fn(index, buffer.data_ptr()) == code
    error = selftest.last_error()
    assert message in error
    assert "selftest.cu:" in error  # names the launch site (and the kernel's line for UB)


def test_rewrite_keeps_lines_and_rejects_unsupported_shared():
    from cuda_emu import rewrite_cuda_source

    src = (
        "// a <<<comment>>> and \"__shared__ in a string\"\n"
        "__global__ void __launch_bounds__(128, 2) k(float* x) {\n"
        "  __shared__ __align__(16) float tile[4][33];\n"
        "  extern __shared__ float dyn[];\n"
        "  x[0] = tile[0][0] + dyn[0];\n"
        "}\n"
        "void go(float* x, cudaStream_t s) {\n"
        "  ns::k2<float, (3 > 2)>\n"
        "      <<<dim3(4, 2), 128, 64 * sizeof(float), s>>>(\n"
        "      x, 1'000);\n"
        "  k<<<1, 32>>>();\n"
        "}\n"
    )
    out = rewrite_cuda_source(src, "x.cu").splitlines()
    assert out[0] == '#line 1 "x.cu"'
    assert len(out) - 1 == src.count("\n")  # every line keeps its number
    assert out[1] == src.splitlines()[0]  # comments and strings untouched
    assert "launch_bounds_exceeded(128)" in out[2]
    assert "auto& tile = ::cuda_emu::block_shared<float[4][33], 16>(0, \"tile\");" in out[3]
    assert "float* const dyn = ::cuda_emu::dynamic_shared<float>();" in out[4]
    assert "dim3(dim3(4, 2)), dim3(128), static_cast<size_t>(64 * sizeof(float))" in out[8]
    assert "{ ns::k2<float, (3 > 2)>(cuda_emu_args...); }, x, 1'000)" in out[8]
    assert "static_cast<size_t>(0), (cudaStream_t)(nullptr)" in out[11]
    masked = rewrite_cuda_source(
        '#define BOUNDS __launch_bounds__(64)\nconst char* s = R"x(a "<<<" b)x";\n'
        "__global__ void BOUNDS k() {}\n", "m.cu")
    assert "launch_bounds_exceeded" not in masked and "cuda_emu::launch" not in masked
    with pytest.raises(CudaEmuError, match=r"y.cu:2: unsupported __shared__"):
        rewrite_cuda_source("void f() {\n  __shared__ float a[2], b[2];\n}\n", "y.cu")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
