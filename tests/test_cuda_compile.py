"""The CUDA C++ kernels compile for sm_80 and sm_90 and the hot ones do not spill registers.

Runs on any machine with nvcc (no GPU needed; DESIGN.md "Verifying GPU code without a GPU"):
every ``csrc/cuda/*.cu`` is compiled with ``-Xptxas -v`` through
:func:`rlkern.nvcc.compile_cuda_sources`. Skipped, with the reason, when nvcc is absent.
"""

from __future__ import annotations

import pytest

from rlkern import nvcc

ARCHS = (80, 90)
# Kernels on the training hot path: every instantiation must be spill-free.
HOT_KERNELS = ("logprobs_fwd_kernel", "logprobs_bwd_kernel", "sample_kernel",
               "truncated_fwd_kernel", "truncated_bwd_kernel")
ROW_KEYS = {"file", "kernel", "arch", "registers", "spill_stores", "spill_loads", "shared_bytes"}


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    if not nvcc.nvcc_available():
        pytest.skip(reason=(
            "nvcc not found: set CUDA_HOME or RLKERN_NVCC, or put nvcc on PATH, to compile "
            "the CUDA kernels ahead of time"
        ))
    return nvcc.compile_cuda_sources(archs=ARCHS)


def test_row_format(rows: list[dict]) -> None:
    assert rows, "ptxas reported no kernels"
    for row in rows:
        assert set(row) == ROW_KEYS
        assert isinstance(row["file"], str) and isinstance(row["kernel"], str)
        for key in ROW_KEYS - {"file", "kernel"}:
            assert isinstance(row[key], int) and row[key] >= 0, (key, row)
        assert row["arch"] in ARCHS


def test_every_source_compiles_for_every_arch(rows: list[dict]) -> None:
    sources = {f"csrc/cuda/{p.name}" for p in nvcc.cuda_sources()}
    assert sources, "no csrc/cuda/*.cu found"
    assert {r["file"] for r in rows} == sources, "a source produced no kernels"
    archs_of: dict[tuple[str, str], set[int]] = {}
    for r in rows:
        archs_of.setdefault((r["file"], r["kernel"]), set()).add(r["arch"])
    missing = {k: set(ARCHS) - v for k, v in archs_of.items() if v != set(ARCHS)}
    assert not missing, f"kernels not built for every arch: {missing}"


def test_logprobs_instantiations(rows: list[dict]) -> None:
    # forward: {fp32, fp16, bf16} × {entropy?} × {stats?}; backward: one per dtype.
    for arch in ARCHS:
        fwd = [r for r in rows if "logprobs_fwd_kernel" in r["kernel"] and r["arch"] == arch]
        bwd = [r for r in rows if "logprobs_bwd_kernel" in r["kernel"] and r["arch"] == arch]
        assert len(fwd) == 12, [r["kernel"] for r in fwd]
        assert len(bwd) == 3, [r["kernel"] for r in bwd]


def test_sample_instantiations(rows: list[dict]) -> None:
    # One sampler kernel per logits dtype (fp32, fp16, bf16) and arch, all on the no-spill list.
    for arch in ARCHS:
        got = [r for r in rows if "sample_kernel" in r["kernel"] and r["arch"] == arch]
        assert len(got) == 3, [r["kernel"] for r in got]
        assert all(r["file"] == "csrc/cuda/sample.cu" for r in got)


def test_truncated_logprobs_instantiations(rows: list[dict]) -> None:
    # Truncated token log-probs: a forward and a backward kernel per logits dtype and arch, all
    # on the no-spill list; the sampler's per-row code (rlkern/cuda_sample_row.cuh) inlined.
    for arch in ARCHS:
        for name in ("truncated_fwd_kernel", "truncated_bwd_kernel"):
            got = [r for r in rows if name in r["kernel"] and r["arch"] == arch]
            assert len(got) == 3, [r["kernel"] for r in got]
            assert all(r["file"] == "csrc/cuda/truncated_logprobs.cu" for r in got)


def test_hot_kernels_do_not_spill(rows: list[dict]) -> None:
    hot = [r for r in rows if any(name in r["kernel"] for name in HOT_KERNELS)]
    assert hot
    spilling = [
        (r["kernel"], r["arch"], r["spill_stores"], r["spill_loads"])
        for r in hot
        if r["spill_stores"] or r["spill_loads"]
    ]
    assert not spilling, f"register spills (kernel, arch, store bytes, load bytes): {spilling}"


def test_parse_ptxas_report() -> None:
    # The parser on a fixed ptxas -v excerpt (independent of the installed nvcc).
    text = (
        "ptxas info    : 0 bytes gmem\n"
        "ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z1kPf\n"
        "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 40 registers, used 1 barriers, 320 bytes smem\n"
        "ptxas info    : Compiling entry function '_Z1gv' for 'sm_80'\n"
        "ptxas info    : Function properties for _Z1gv\n"
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 9 registers, used 0 barriers, 364 bytes cmem[0]\n"
    )
    assert nvcc._parse_ptxas(text) == [
        {
            "kernel": "_Z1kPf",
            "arch": 90,
            "registers": 40,
            "spill_stores": 4,
            "spill_loads": 12,
            "shared_bytes": 320,
        },
        {
            "kernel": "_Z1gv",
            "arch": 80,
            "registers": 9,
            "spill_stores": 0,
            "spill_loads": 0,
            "shared_bytes": 0,
        },
    ]
