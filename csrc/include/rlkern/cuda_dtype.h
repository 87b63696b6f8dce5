// The element type behind a launcher's `dtype` code (RLKERN_DTYPE_*, rlkern/cuda_launchers.h),
// for the CUDA sources (csrc/cuda/*.cu): one switch instead of one per launcher.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "rlkern/cuda_launchers.h"

namespace rlkern {

template <typename T>
struct TypeTag {
  using type = T;
};

inline bool valid_dtype(int dtype) {
  return dtype == RLKERN_DTYPE_FP32 || dtype == RLKERN_DTYPE_FP16 || dtype == RLKERN_DTYPE_BF16;
}

// f(TypeTag<T>{}) for the element type T of `dtype`; the caller has checked valid_dtype.
template <typename F>
int dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case RLKERN_DTYPE_FP32: return f(TypeTag<float>{});
    case RLKERN_DTYPE_FP16: return f(TypeTag<__half>{});
    default: return f(TypeTag<__nv_bfloat16>{});
  }
}

}  // namespace rlkern
