// The per-row arguments of the token log-probs under the sampler's truncated distribution
// (ALGORITHMS.md §4, §1), shared by the op glue (csrc/truncated_logprobs_op.h), the CPU kernel
// (csrc/cpu/truncated_logprobs.h) and the CUDA kernels (csrc/cuda/truncated_logprobs.cu).
//
// Torch-free, host + device.
#pragma once

#include <cstdint>

namespace rlkern::truncated_logprobs {

// Row r = b·L + l of the (B, L, V) logits starts at b·stride_0 + l·stride_1 elements (vocab
// contiguous); every per-row array has B·L entries. A filter is nullptr when it is off for
// every row (per row: top_k ≥ V, top_p ≥ 1 and min_p ≤ 0 are off too).
struct Rows {
  int64_t B, L, V, stride_0, stride_1;
  const int64_t* labels;
  int64_t ignore_index;
  const double* temperature;
  const int64_t* top_k;  // nullable (off)
  const double* top_p;   // nullable
  const double* min_p;   // nullable
  bool joint;            // filter_order == joint (rlkern/sample.h)
  // Forward outputs (fp32; entropy nullable).
  float* logprobs;
  float* entropy;
  float* lse;
  // Backward: upstream gradients (nullable: 0) and the contiguous (B·L, V) gradient of the
  // logits' dtype.
  const float* grad_logprobs;
  const float* grad_entropy;
  const float* grad_lse;
  void* grad_logits;
};

}  // namespace rlkern::truncated_logprobs
