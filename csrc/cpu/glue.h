// Tensor → kernel-argument helpers shared by the CPU glue of the ops that read logits
// (cpu/logprobs_ops.cpp, cpu/truncated_logprobs_ops.cpp, cpu/linear_logprobs_ops.cpp,
// cpu/sample_ops.cpp, cpu/eager16_ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "cpu/logprobs.h"  // DType, LogitsLayout

namespace rlkern::cpu {

// The storage type of a floating tensor as the CPU kernels name it.
inline DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    default:
      TORCH_CHECK_TYPE(false, name, ": expected bfloat16, float16, float32 or float64, got ",
                       t.scalar_type());
  }
}

// The row layout of (B, L, V) logits (the caller has checked the 3 dims and a contiguous
// vocab dim): the data pointer, storage type, sizes and the strides of B and L.
inline LogitsLayout logits_layout(const at::Tensor& logits) {
  // In LogitsLayout's field order: logits, dtype, B, L, V, stride_0, stride_1.
  return {logits.const_data_ptr(), dtype_of(logits, "logits"), logits.size(0), logits.size(1),
          logits.size(2), logits.stride(0), logits.stride(1)};
}

}  // namespace rlkern::cpu
