"""The CUDA tensor glue (csrc/cuda_ops.cpp and csrc/cuda/*_ops.cpp) compiles on a CPU machine.

These files are built only with a CUDA torch, so without this check an edit to them could only
be caught on a GPU machine. The CPU wheel ships c10/cuda's headers but not the one CMake
generates (``cuda_cmake_macros.h``); an empty stand-in takes its place, and each file is
compiled with ``-fsyntax-only`` against torch's headers and the CUDA toolkit's.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GLUE = sorted([ROOT / "csrc" / "cuda_ops.cpp", *(ROOT / "csrc" / "cuda").glob("*_ops.cpp")])


def _cuda_include() -> Path | None:
    nvcc = shutil.which("nvcc")
    candidates = [Path(nvcc).resolve().parent.parent / "include"] if nvcc else []
    candidates.append(Path("/usr/local/cuda/include"))
    return next((p for p in candidates if (p / "cuda_runtime.h").exists()), None)


@pytest.mark.parametrize("source", GLUE, ids=lambda p: str(p.relative_to(ROOT)))
def test_cuda_glue_compiles(source: Path, tmp_path: Path) -> None:
    cuda_inc = _cuda_include()
    compiler = shutil.which("g++") or shutil.which("c++")
    if cuda_inc is None or compiler is None:
        pytest.skip(reason="needs a C++ compiler and the CUDA toolkit's headers (cuda_runtime.h)")
    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cmd = [compiler, "-std=c++20", "-fsyntax-only", "-Wall", "-Wno-unknown-pragmas",
           "-DRLKERN_WITH_CUDA=1", f"-I{tmp_path}", *(f"-I{p}" for p in include_paths()),
           f"-I{cuda_inc}", f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc'}", str(source)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert done.returncode == 0, "\n".join(errors[:20]) or done.stderr[-4000:]
