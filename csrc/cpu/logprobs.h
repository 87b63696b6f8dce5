// CPU kernels for token log-probabilities and entropy (ALGORITHMS.md §1). Torch-free
// interface: raw pointers, sizes and strides; cpu/logprobs_ops.cpp adapts tensors to it.
#pragma once

#include <array>
#include <cstdint>

#include "rlkern/logprobs.h"

namespace rlkern::cpu {

enum class DType { kFloat32, kFloat16, kBFloat16, kFloat64 };

// Rows are the (b, l) pairs of a (B, L, V) view whose vocab dim is contiguous; row (b, l)
// starts at element b * stride_0 + l * stride_1. One definition for every op that reads
// logit rows by (b, l) (logprobs); cpu/glue.h's logits_layout fills it.
struct LogitsLayout {
  const void* logits;
  DType dtype;
  int64_t B, L, V;
  int64_t stride_0, stride_1;
};

// The first logit of row r = b * L + l, of storage type T.
template <typename T>
const T* row_start(const LogitsLayout& a, int64_t r) {
  return static_cast<const T*>(a.logits) + (r / a.L) * a.stride_0 + (r % a.L) * a.stride_1;
}

// Per-row arrays (labels, outputs, grads) are contiguous (B * L), in float32, or float64 for
// float64 logits.
struct LogitsRows : LogitsLayout {
  const int64_t* labels;
  double temperature;
  int64_t ignore_index;
};

// outputs[o]: the per-row output o (rlkern::logprobs::Output); logprobs and lse are required,
// the others nullptr when not asked for (self_certainty and sum_p_sq together).
struct LogprobsFwdArgs : LogitsRows {
  std::array<void*, logprobs::kNumOutputs> outputs;
};

struct LogprobsBwdArgs : LogitsRows {
  logprobs::GradInputs in;
  void* grad_logits;  // (B, L, V), vocab contiguous, same dtype as logits; may alias logits
  int64_t grad_stride_0, grad_stride_1;
};

void logprobs_fwd(const LogprobsFwdArgs& args);
void logprobs_bwd(const LogprobsBwdArgs& args);

}  // namespace rlkern::cpu
