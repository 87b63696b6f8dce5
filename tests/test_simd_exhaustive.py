"""The CPU kernels' vector conversions against their scalar specifications, over (nearly) every
input, built with -march=native as the extension is, so each checks the instructions this
machine's build uses (the bf16 conversions also as the portable build compiles them; the other
checks would compare the portable build's scalar functions with themselves):

* csrc/cpu/simd.h's bf16 load, store and paired store (``store_pair``; tests/cpp/
  simd_bf16_exhaustive.cpp): round to nearest even for all 2^32 floats, and each build's NaN
  (0x7fc0 on AVX-512);
* the policy-loss lane policies' exp (csrc/cpu/policy_loss_simd.h; tests/cpp/
  policy_loss_exp_exhaustive.cpp): exp_host_f32's bits on every 7th float and every float near
  the ends of its range;
* VecF::exp2 (csrc/cpu/simd.h; tests/cpp/exp2_exhaustive.cpp): exp2_scalar's bits on every 5th
  float of its domain, and on every float whose 2^x is subnormal or zero;
* the fold's integer max of 16-bit logits (csrc/cpu/simd.h ``max_bits16``; tests/cpp/
  max_bits16_check.cpp): the float max's bits on every length to 300, every sign and magnitude."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPP = ROOT / "tests" / "cpp"
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the check")


# The extension's two CPU builds (CMakeLists.txt): -march=native, and RLKERN_CPU_ARCH=portable
# (no -march: baseline x86-64, the scalar VecF and lane policies).
ARCHS = {"native": ["-march=native"], "portable": []}


def _build_and_run(name: str, tmp_path: Path, arch: str, flags: tuple[str, ...] = ()) -> str:
    """Builds tests/cpp/<name>.cpp as the extension's `arch` build is built (plus `flags`, the
    compile options CMakeLists.txt gives the sources under test) and runs it; returns its
    output, after asserting that it built and exited 0."""
    exe = tmp_path / name
    build = subprocess.run(["g++", "-O2", *ARCHS[arch], *flags, "-std=c++17", f"-I{ROOT / 'csrc'}",
                            f"-I{ROOT / 'csrc' / 'include'}", str(CPP / f"{name}.cpp"), "-o",
                            str(exe)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


@needs_gxx
@pytest.mark.parametrize("arch", list(ARCHS))
def test_bf16_load_and_store_match_their_specification_on_every_input(tmp_path, arch):
    out = _build_and_run("simd_bf16_exhaustive", tmp_path, arch)
    assert "load mismatches 0, store mismatches 0, pair mismatches 0" in out


@needs_gxx
def test_policy_loss_vector_exp_has_the_scalar_bits(tmp_path):
    # policy_loss.cpp's option: GCC would otherwise fuse the scalar exp's x·log2 e + 1.5·2^23
    # into one FMA, whose n differs from the vector exp's rounding near the ties
    out = _build_and_run("policy_loss_exp_exhaustive", tmp_path, "native",
                         ("-ffp-contract=off",))
    assert "expv mismatches 0, expv_clamped mismatches 0" in out


@needs_gxx
def test_vector_exp2_has_the_scalar_bits(tmp_path):
    out = _build_and_run("exp2_exhaustive", tmp_path, "native")
    assert "exp2 checked" in out and "mismatches 0" in out


@needs_gxx
def test_integer_max_of_16_bit_logits_is_the_float_max(tmp_path):
    out = _build_and_run("max_bits16_check", tmp_path, "native")  # the portable build has none
    if "not in this build" in out:
        pytest.skip("max_bits16 is AVX-512BW only: an AVX2 version was slower (docs/logprobs.md)")
    assert "max_bits16 cases" in out and "mismatches 0" in out
