// CPU kernels of the policy-loss family (ALGORITHMS.md §3): torch-free interface (raw pointers,
// sizes, row strides). csrc/cpu/policy_loss_ops.cpp adapts tensors to it; the per-token math
// is in rlkern/policy_loss.h.
#pragma once

#include <cstdint>

#include "rlkern/policy_loss.h"

namespace rlkern::cpu {

// A (B, T) array of the compute dtype (float32, or float64 when f64), unit stride along T and
// `stride` elements between rows. `p == nullptr`: absent.
struct RowArray {
  const void* p;
  int64_t stride;
};

struct PolicyLossArgs {
  int64_t B, T;
  bool f64;                 // compute dtype of every float input / gradient
  RowArray logp, old, ref, rollout, entropy, token_weights;
  const void* adv;          // (B,) or (B, T) (row stride adv_stride)
  bool adv_per_token;
  int64_t adv_stride;
  const uint8_t* mask;      // (B, T) bool, row stride mask_stride
  int64_t mask_stride;
  const void* entropy_threshold;  // one value of the compute dtype, or nullptr (no entropy mask)
  policy_loss::Flags flags;
  policy_loss::HParams hp;
  // forward
  double* row_stats;        // (kNumRowStats, B), contiguous: statistic-major
  // backward
  const double* grad_rows;  // (kNumRowGrads, B), contiguous
  void* grad_logp;          // (B, T) contiguous
  void* grad_entropy;       // (B, T) contiguous, nullable
};

void policy_loss_fwd(const PolicyLossArgs& args);
// Reads the forward's row_stats (the per-row sequence values it saved).
void policy_loss_bwd(const PolicyLossArgs& args);

// Elementwise KL estimator (rlkern/policy_loss.h kl_term) over n contiguous values: the value,
// or grad · ∂value/∂logp when `grad` is given.
struct KlArgs {
  int64_t n;
  bool f64;
  const void* logp;
  const void* ref;
  const void* grad;  // nullable
  int kind;
  bool straight_through;
  double log_clamp, value_clamp;
  void* out;
};

void kl_penalty(const KlArgs& args);

}  // namespace rlkern::cpu
