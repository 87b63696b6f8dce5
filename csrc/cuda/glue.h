// Tensor → launcher helpers shared by the CUDA glue of every family (csrc/cuda/*_ops.cpp and
// csrc/cuda_ops.cpp): the launchers' dtype code of a logits tensor, the current stream, and
// the turn of a launcher's error code (rlkern/cuda_launchers.h) into an exception.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include "rlkern/cuda_launchers.h"

namespace rlkern::cuda {

// RLKERN_DTYPE_* of a floating tensor the CUDA kernels read (float64 has no CUDA kernels).
inline int dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return RLKERN_DTYPE_FP32;
    case at::kHalf: return RLKERN_DTYPE_FP16;
    case at::kBFloat16: return RLKERN_DTYPE_BF16;
    default:
      TORCH_CHECK_TYPE(false, name, ": the CUDA kernels take bfloat16, float16 or float32, got ",
                       t.scalar_type(), " (for float64 use backend='triton' or 'torch')");
  }
}

inline void check_launch(int code, const char* op) {
  TORCH_CHECK(code == RLKERN_CUDA_OK, op, " (CUDA) failed: ", rlkern_cuda_error_string(code));
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The first argument of a CUDA op must live on a CUDA device (the others are checked against
// its device by csrc/checks.h).
inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got device ", t.device());
}

}  // namespace rlkern::cuda
