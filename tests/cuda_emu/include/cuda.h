// Stand-in for the CUDA toolkit's <cuda.h> in emulated builds (tests/cuda_emu/README.md):
// everything the emulator provides is in cuda_emu.h, which every emulated build force-includes.
#pragma once
#include "cuda_emu.h"
