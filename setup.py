"""Build rlkern: the Python package (python/rlkern, kernels/) and the extension rlkern._C via CMake.

Install with ``pip install --no-build-isolation -e .`` so the extension builds against the torch
that is installed (an isolated build environment would fetch a different torch).

Environment:
    RLKERN_CPU_ARCH   native (default) | portable | any -march value
    RLKERN_WITH_CUDA  1 / 0 to force the CUDA kernels on or off (default: on when nvcc and a
                      CUDA build of torch are both present)
    MAX_JOBS          parallel compile jobs (default: CPU count)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _want_cuda() -> bool:
    forced = os.environ.get("RLKERN_WITH_CUDA")
    if forced is not None:
        return forced == "1"
    import torch

    return torch.version.cuda is not None and shutil.which("nvcc") is not None


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11
        import torch

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        prefix = ";".join([torch.utils.cmake_prefix_path, pybind11.get_cmake_dir()])
        cfg = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={prefix}",
            f"-DRLKERN_CPU_ARCH={os.environ.get('RLKERN_CPU_ARCH', 'native')}",
            f"-DRLKERN_WITH_CUDA={'ON' if _want_cuda() else 'OFF'}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if shutil.which("ninja"):
            cfg.append("-GNinja")
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", str(ROOT), *cfg], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "-j", jobs], cwd=build_dir, check=True)


setup(
    packages=["rlkern", "rlkern.kernels"]
    + [f"rlkern.{p}" for p in find_packages(str(ROOT / "python" / "rlkern"))],
    package_dir={"rlkern": "python/rlkern", "rlkern.kernels": "kernels"},
    ext_modules=[CMakeExtension("rlkern._C")],
    cmdclass={"build_ext": CMakeBuild},
)
