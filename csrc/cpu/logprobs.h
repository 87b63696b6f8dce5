// CPU kernels for token log-probabilities and entropy (ALGORITHMS.md §1). Torch-free
// interface: raw pointers, sizes and strides; csrc/ops.cpp adapts tensors to it.
#pragma once

#include <cstdint>

namespace rlkern::cpu {

enum class DType { kFloat32, kFloat16, kBFloat16, kFloat64 };

// Rows are (b, l) pairs of a (B, L, V) view whose vocab dim is contiguous; row (b, l) starts
// at element b * stride_0 + l * stride_1. Per-row arrays (labels, outputs, grads) are
// contiguous (B * L). Outputs are float32, or float64 for float64 logits. Optional outputs
// and grads are nullptr when absent.
struct LogprobsFwdArgs {
  const void* logits;
  DType dtype;
  int64_t B, L, V;
  int64_t stride_0, stride_1;
  const int64_t* labels;
  double temperature;
  int64_t ignore_index;
  void* logprobs;
  void* lse;
  void* entropy;         // nullable
  void* self_certainty;  // nullable (set together with sum_p_sq)
  void* sum_p_sq;        // nullable
};

struct LogprobsBwdArgs {
  const void* logits;
  DType dtype;
  int64_t B, L, V;
  int64_t stride_0, stride_1;
  const int64_t* labels;
  const void* lse;
  const void* entropy;        // needed when grad_entropy is given
  const void* grad_logprobs;  // nullable
  const void* grad_entropy;   // nullable
  const void* grad_lse;       // nullable
  double temperature;
  int64_t ignore_index;
  void* grad_logits;  // (B, L, V), vocab contiguous, same dtype as logits; may alias logits
  int64_t grad_stride_0, grad_stride_1;
};

void logprobs_fwd(const LogprobsFwdArgs& args);
void logprobs_bwd(const LogprobsBwdArgs& args);

}  // namespace rlkern::cpu
