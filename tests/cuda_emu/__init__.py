"""Run CUDA C++ kernels on the CPU: an emulation layer for testing csrc/cuda/*.cu without a GPU.

See README.md in this folder for what it catches and what it cannot; :mod:`cuda_emu.testing`
holds what the test files share.
"""

from .build import (
    CudaEmuError,
    EmulatedLibrary,
    build_library,
    find_compiler,
    load_library,
    rewrite_cuda_source,
)

__all__ = [
    "CudaEmuError",
    "EmulatedLibrary",
    "build_library",
    "find_compiler",
    "load_library",
    "rewrite_cuda_source",
]
