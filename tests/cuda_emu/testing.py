"""What the test files that run ``csrc/cuda/*.cu`` in the emulator share (pytest-aware; the rest
of this package is not): one build per library and session, the launchers' codes, ctypes
shorthands, and output buffers inside guard bands.

A test module covering a ``.cu`` file::

    from cuda_emu.testing import CSRC, Guarded, emulated

    @pytest.fixture(scope="module")
    def emu():
        return emulated(CSRC / "cuda" / "advantages.cu")  # skip / fail as described there
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import pytest
import torch

from .build import CudaEmuError, EmulatedLibrary, build_library, find_compiler

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"

# ctypes shorthands for the launchers' argument lists (rlkern/cuda_launchers.h).
P, I64, I32, INT, F32, F64 = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int,
                              ctypes.c_float, ctypes.c_double)
# RLKERN_DTYPE_* and the launchers' return codes RLKERN_CUDA_* (rlkern/cuda_launchers.h).
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
OK, ERR_DTYPE, ERR_INVALID_ARGUMENT, ERR_NULL_POINTER = 0, -1, -2, -3
LAUNCH_FAILURE = 719  # cudaErrorLaunchFailure: how the emulator reports a kernel's misuse

NO_COMPILER = ("no host C++ compiler (g++ not on PATH, CUDA_EMU_CXX not set): the CUDA kernels "
               "cannot be executed by the CPU emulator")

def emulated(*sources: Path, include_dirs: Sequence[Path] = (CSRC / "include",)
             ) -> EmulatedLibrary:
    """The library of ``sources`` built for the emulator and loaded, once per session (the
    build itself is cached by content across sessions).

    Skips the test, with the reason, when there is no host C++ compiler; fails it when the
    build fails (a compile error is a bug, not a reason to skip).
    """
    if find_compiler() is None:
        pytest.skip(reason=NO_COMPILER)
    try:
        return _load(tuple(sources), tuple(include_dirs))
    except CudaEmuError as e:
        names = ", ".join(s.name for s in sources)
        pytest.fail(f"building {names} for the CUDA emulator failed:\n{e}", pytrace=False)


@cache
def _load(sources: tuple[Path, ...], include_dirs: tuple[Path, ...]) -> EmulatedLibrary:
    return EmulatedLibrary(build_library(sources, include_dirs=include_dirs))


def bind(emu: EmulatedLibrary, name: str, argtypes: list, restype=ctypes.c_int):
    """The library's function ``name`` with its ctypes signature set."""
    fn = getattr(emu.lib, name)
    fn.argtypes, fn.restype = argtypes, restype
    return fn


def ptr(t: torch.Tensor | None) -> int | None:
    """A tensor's data pointer, or null for an absent optional tensor."""
    return None if t is None else t.data_ptr()


class Guarded:
    """An output inside a buffer with guard bands of ``pad`` elements that must stay untouched;
    it starts filled with a sentinel that every element must have replaced."""

    SENTINEL = 12345.0

    def __init__(self, shape, dtype: torch.dtype = torch.float32, pad: int = 16):
        n = math.prod(shape)
        self.pad = pad
        self.buffer = torch.full((n + 2 * pad,), self.SENTINEL, dtype=dtype)
        self.view = self.buffer[pad : pad + n].view(shape)

    def ptr(self) -> int:
        return self.view.data_ptr()

    def untouched(self) -> bool:
        """Whether the guard bands still hold the sentinel (nothing was written outside)."""
        pads = torch.cat([self.buffer[: self.pad], self.buffer[-self.pad :]])
        return bool(torch.all(pads == self.SENTINEL))

    def written(self) -> bool:
        """Whether every element was written (none still holds the sentinel)."""
        return not bool(torch.any(self.view == self.SENTINEL))

    def check(self, name: str) -> None:
        assert self.untouched(), f"{name}: written outside its rows"
        assert self.written(), f"{name}: some rows were not written"
