// RLKERN_HOST_DEVICE: the qualifier of the torch-free numerics in csrc/include/rlkern, which the
// host compiler (CPU kernels) and nvcc (CUDA kernels) both compile.
#pragma once

#ifndef RLKERN_HOST_DEVICE
#if defined(__CUDACC__) || defined(__HIPCC__)
#define RLKERN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RLKERN_HOST_DEVICE inline
#endif
#endif
