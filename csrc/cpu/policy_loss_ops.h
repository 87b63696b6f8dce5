// The policy-loss ops (ALGORITHMS.md §3): their schemas (defined once, here; TORCH_LIBRARY in
// csrc/ops.cpp) and their CPU implementations (csrc/policy_loss_checks.h bodies running the
// torch-free kernels of cpu/policy_loss.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "policy_loss_checks.h"

namespace torch {
class Library;
}

namespace rlkern {

extern const char* const kPolicyLossFwdOutSchema;
extern const char* const kPolicyLossBwdOutSchema;
extern const char* const kPolicyLossFusedFwdOutSchema;
extern const char* const kPolicyLossFusedBwdSchema;
extern const char* const kPolicyLossLensOutSchema;
extern const char* const kPolicyLossFusedLinearSchema;
extern const char* const kPolicyLossLinearGradRowsSchema;
extern const char* const kPolicyLossMetricsSchema;
extern const char* const kKlPenaltyFwdOutSchema;
extern const char* const kKlPenaltyBwdOutSchema;

// m.impl(...) of the family's CPU kernels, inside TORCH_LIBRARY_IMPL(rlkern, CPU, m).
void impl_policy_loss_cpu(torch::Library& m);
// ... of the fused linear aggregate's ops (cpu/policy_loss_linear.cpp); called by the above.
void impl_policy_loss_linear_cpu(torch::Library& m);

// The bodies of policy_loss_fused_fwd_out and policy_loss_lens_out, which the fused linear
// op also runs; an undefined token_grad runs the forward alone (no factors, as
// policy_loss_fwd_out).
void policy_loss_fused_fwd_out(const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                               const at::Tensor& advantages, const at::Tensor& mask,
                               const policy_loss::InputList& inputs, at::IntArrayRef flags,
                               at::ArrayRef<double> hparams, const at::Tensor& row_stats,
                               const at::Tensor& token_grad,
                               const std::optional<at::Tensor>& token_grad_kl,
                               const std::optional<at::Tensor>& grad_rows);
void policy_loss_lens_out(const at::Tensor& mask, const at::Tensor& lens);

}  // namespace rlkern
