// CPU implementations of the policy-loss ops (schemas defined once, here, and registered in
// csrc/ops.cpp): thin glue from tensors to the torch-free kernels of cpu/policy_loss.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace rlkern {

extern const char* const kPolicyLossFwdOutSchema;
extern const char* const kPolicyLossBwdOutSchema;
extern const char* const kKlPenaltyFwdOutSchema;
extern const char* const kKlPenaltyBwdOutSchema;

void policy_loss_fwd_out_cpu(const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                             const at::Tensor& advantages, const at::Tensor& mask,
                             const std::optional<at::Tensor>& ref_logprobs,
                             const std::optional<at::Tensor>& rollout_logprobs,
                             const std::optional<at::Tensor>& entropy,
                             const std::optional<at::Tensor>& token_weights,
                             const std::optional<at::Tensor>& entropy_threshold,
                             at::IntArrayRef flags, at::ArrayRef<double> hparams,
                             const at::Tensor& row_stats);

void policy_loss_bwd_out_cpu(const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                             const at::Tensor& advantages, const at::Tensor& mask,
                             const std::optional<at::Tensor>& ref_logprobs,
                             const std::optional<at::Tensor>& rollout_logprobs,
                             const std::optional<at::Tensor>& entropy,
                             const std::optional<at::Tensor>& token_weights,
                             const std::optional<at::Tensor>& entropy_threshold,
                             const at::Tensor& row_stats, const at::Tensor& grad_rows,
                             at::IntArrayRef flags, at::ArrayRef<double> hparams,
                             const at::Tensor& grad_logprobs,
                             const std::optional<at::Tensor>& grad_entropy);

void kl_penalty_fwd_out_cpu(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                            int64_t kind, bool straight_through, double log_clamp,
                            double value_clamp, const at::Tensor& out);

void kl_penalty_bwd_out_cpu(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                            const at::Tensor& grad, int64_t kind, bool straight_through,
                            double log_clamp, double value_clamp, const at::Tensor& out);

}  // namespace rlkern
