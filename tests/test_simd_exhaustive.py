"""The CPU kernels' vector conversions against their scalar specifications, over (nearly) every
input, built with -march=native as the extension is, so each checks the instructions this
machine's build uses:

* csrc/cpu/simd.h's bf16 load and store (tests/cpp/simd_bf16_exhaustive.cpp): round to nearest
  even for all 2^32 floats, and each build's NaN (0x7fc0 on AVX-512);
* the policy-loss lane policies' exp (csrc/cpu/policy_loss_simd.h; tests/cpp/
  policy_loss_exp_exhaustive.cpp): exp_host_f32's bits on every 7th float and every float near
  the ends of its range."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "cpp" / "simd_bf16_exhaustive.cpp"
EXP_SOURCE = ROOT / "tests" / "cpp" / "policy_loss_exp_exhaustive.cpp"


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the check")
def test_bf16_load_and_store_match_their_specification_on_every_input(tmp_path):
    exe = tmp_path / "simd_bf16_exhaustive"
    build = subprocess.run(["g++", "-O2", "-march=native", "-std=c++17", f"-I{ROOT / 'csrc'}",
                            str(SOURCE), "-o", str(exe)], capture_output=True, text=True,
                           timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "load mismatches 0, store mismatches 0" in run.stdout


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the check")
def test_policy_loss_vector_exp_has_the_scalar_bits(tmp_path):
    exe = tmp_path / "policy_loss_exp_exhaustive"
    build = subprocess.run(["g++", "-O2", "-march=native", "-std=c++17", f"-I{ROOT / 'csrc'}",
                            f"-I{ROOT / 'csrc' / 'include'}", str(EXP_SOURCE), "-o", str(exe)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "expv mismatches 0, expv_clamped mismatches 0" in run.stdout
