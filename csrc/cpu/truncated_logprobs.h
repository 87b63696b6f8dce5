// CPU token log-probs under the sampler's truncated distribution (ALGORITHMS.md §4, §1): for
// each row the kept set of top-k / top-p / min-p is found by the sampler's own code
// (kept_set.h), and
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
#include "rlkern/truncated_logprobs.h"

namespace rlkern::cpu {

// The per-row arrays and outputs (rlkern/truncated_logprobs.h) and the logits.
struct TruncatedLogprobsArgs : truncated_logprobs::Rows {
  const void* logits;
  DType dtype;
};

void truncated_logprobs_fwd(const TruncatedLogprobsArgs& args);
void truncated_logprobs_bwd(const TruncatedLogprobsArgs& args);

}  // namespace rlkern::cpu
