// CPU implementations of the advantage ops (schemas in csrc/ops.cpp): thin glue from tensors to
// the torch-free kernels of advantages.h and token_advantages.h. Each `*_out` op checks its
// tensors, fills caller-provided outputs, and turns a kernel Status into a ValueError.
#pragma once

#include <ATen/core/Tensor.h>
#include <string_view>

#include <optional>

namespace rlkern {

// Schemas, one per op, so ops.cpp and the implementations cannot drift apart.
extern const char* const kGroupAdvantagesOutSchema;
extern const char* const kGroupMomentsOutSchema;
extern const char* const kGroupFinishOutSchema;
extern const char* const kDiscountedReturnsOutSchema;
extern const char* const kPositionBaselineOutSchema;
extern const char* const kGtpoWeightsOutSchema;
extern const char* const kGigpoAdvantagesOutSchema;
extern const char* const kEmpgModulateOutSchema;
extern const char* const kGroupSegmentStatsOutSchema;  // CUDA only
extern const char* const kGroupRowsFinishOutSchema;    // CUDA only

void group_advantages_out_cpu(const at::Tensor& scores, const std::optional<at::Tensor>& group_ids,
                              int64_t group_size, const std::optional<at::Tensor>& weights,
                              const std::optional<at::Tensor>& loglik, std::string_view estimator,
                              double eps, std::string_view std, std::string_view std_scope,
                              std::string_view singleton, std::string_view nan_policy,
                              double r_max, double lam, double kappa,
                              const at::Tensor& advantages, const at::Tensor& group_mean,
                              const at::Tensor& group_std, const at::Tensor& zero_variance_mask);

void group_moments_out_cpu(const at::Tensor& scores, const std::optional<at::Tensor>& group_ids,
                           int64_t group_size, std::string_view nan_policy,
                           const at::Tensor& keys, const at::Tensor& moments,
                           const at::Tensor& num_groups);

void group_finish_out_cpu(const at::Tensor& scores, const at::Tensor& row_group,
                          const at::Tensor& moments, std::string_view estimator, double eps,
                          std::string_view std, std::string_view std_scope,
                          std::string_view singleton, std::string_view nan_policy, double r_max,
                          double batch_std, double gpg_alpha, const at::Tensor& advantages,
                          const at::Tensor& group_mean, const at::Tensor& group_std,
                          const at::Tensor& zero_variance_mask);

void discounted_returns_out_cpu(const at::Tensor& rewards, const std::optional<at::Tensor>& reset,
                                double gamma, const at::Tensor& out);

void position_baseline_out_cpu(const at::Tensor& returns, const at::Tensor& mask,
                               const std::optional<at::Tensor>& group_ids, int64_t group_size,
                               const at::Tensor& out);

void gtpo_weights_out_cpu(const at::Tensor& entropy, const at::Tensor& mask,
                          const std::optional<at::Tensor>& group_ids, int64_t group_size,
                          double eps, const at::Tensor& weight, const at::Tensor& inverse_weight);

void gigpo_advantages_out_cpu(const at::Tensor& episode_returns, const at::Tensor& step_returns,
                              const at::Tensor& state_keys, const at::Tensor& group_ids,
                              double omega, std::string_view mode, std::string_view step_mode,
                              double eps, const at::Tensor& advantages,
                              const at::Tensor& episode_advantages,
                              const at::Tensor& step_advantages);

void empg_modulate_out_cpu(const at::Tensor& advantages, const at::Tensor& step_entropy,
                           const at::Tensor& next_step_entropy, double k, double k_f, double zeta,
                           const at::Tensor& out);

}  // namespace rlkern
