// CPU token log-probs under the sampler's truncated distribution (ALGORITHMS.md §4, §1): for
// each row the kept set of top-k / top-p / min-p is found by the sampler's own code
// (sample_row.h), and
//
//   logprobs = log q_y,  q_v = [v ∈ K] w_v / Σ_K w,  w = exp(z), z = (x − max x)/T
//              (−inf for a label outside K; bitwise the sampler's processed log-prob)
//   entropy  = log Σ_K w − Σ_K w z / Σ_K w           (the entropy of q)
//   lse      = max x / T + log Σ_v w_v               (the whole row's, as the sampler's)
//
// Backward (K fixed: it is piecewise constant in x), with E = Σ_K q z:
//   ∂/∂x_v = ( g_lse p_v + [v ∈ K] q_v (g_ent (E − z_v) − g_lp') + [v = y] g_lp' ) / T,
//   g_lp' = g_lp when y ∈ K, else 0 (a −inf log-prob is constant).
// Torch-free interface; cpu/truncated_logprobs_ops.cpp adapts tensors to it.
#pragma once

#include <cstdint>

#include "cpu/logprobs.h"  // DType

namespace rlkern::cpu {

// Row r of the (B, L, V) logits starts at (r / L)·stride_0 + (r % L)·stride_1 (vocab
// contiguous); every per-row array has B·L entries.
struct TruncatedLogprobsArgs : LogitsLayout {
  const int64_t* labels;
  int64_t ignore_index;
  const double* temperature;
  const int64_t* top_k;  // nullable (off); per row ≥ V is off
  const double* top_p;   // nullable; ≥ 1 is off
  const double* min_p;   // nullable; ≤ 0 is off
  bool joint;            // filter_order == joint
  // Forward outputs (fp32; entropy nullable).
  float* logprobs;
  float* entropy;
  float* lse;
  // Backward: upstream gradients (nullable: 0) and the contiguous (B·L, V) gradient.
  const float* grad_logprobs;
  const float* grad_entropy;
  const float* grad_lse;
  void* grad_logits;
};

void truncated_logprobs_fwd(const TruncatedLogprobsArgs& args);
void truncated_logprobs_bwd(const TruncatedLogprobsArgs& args);

}  // namespace rlkern::cpu
