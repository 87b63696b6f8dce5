"""csrc/cpu/simd.h's bf16 load and store, over every input (tests/cpp/simd_bf16_exhaustive.cpp):
the store's conversion instruction and its integer-rounding fallback together must give round
to nearest even for all 2^32 floats, and each build's NaN (0x7fc0 on AVX-512). Built with
-march=native, as the extension is, so it checks the instructions this machine's build uses."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "cpp" / "simd_bf16_exhaustive.cpp"


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
