// Stand-in for the CUDA toolkit's <cuda_fp16.h> in emulated builds (tests/cuda_emu/README.md):
// everything the emulator provides is in cuda_emu.h, which every emulated build force-includes.
#pragma once
#include "cuda_emu.h"
