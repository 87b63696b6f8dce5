// CPU kernels of the policy-loss family (ALGORITHMS.md §3): torch-free interface (raw pointers,
// sizes, row strides). csrc/cpu/policy_loss_ops.cpp adapts tensors to it; the per-token math
// is in rlkern/policy_loss.h.
#pragma once

#include <cstdint>

#include "rlkern/policy_loss.h"

namespace rlkern::cpu {

using PolicyLossArgs = policy_loss::Args;

void policy_loss_fwd(const PolicyLossArgs& args);
// Reads the forward's row_stats (the per-row sequence values it saved).
void policy_loss_bwd(const PolicyLossArgs& args);

// The fused path (args.token_grad set; policy_loss_fused_ok): the forward also writes each
// token's ∂(row sums)/∂logp; this backward scales them in place by grad_rows into the gradient,
// bitwise what policy_loss_bwd would write.
void policy_loss_fused_bwd(const PolicyLossArgs& args);

// lens[b] = the number of nonzero bytes of mask row b (B rows of T, row stride `stride`).
void policy_loss_lens(const uint8_t* mask, int64_t B, int64_t T, int64_t stride, double* lens);

using KlArgs = policy_loss::KlArgs;
void kl_penalty(const KlArgs& args);

}  // namespace rlkern::cpu
