// CUDA implementations of the rlkern ops: the TORCH_LIBRARY_IMPL(rlkern, CUDA) block. The
// schemas are defined once (ops.cpp registers them); each family's glue — thin, from tensors
// and the current stream to the torch-free launchers of csrc/cuda/*.cu (declared in
// rlkern/cuda_launchers.h) — lives in cuda/<family>_ops.cpp, with the argument checks it shares
// with the CPU glue. Built only when RLKERN_WITH_CUDA (a CUDA toolkit and a CUDA build of torch).
//
// The launchers re-check sizes and pointers and return an error code, turned into an exception
// by cuda::check_launch (cuda/glue.h).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <optional>

#include "cuda/glue.h"
#include "cuda/logprobs_ops.h"
#include "cuda/sample_ops.h"
#include "rlkern/cuda_launchers.h"

namespace rlkern {
namespace {

using cuda::check_launch;

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& logits) {
  TORCH_CHECK(t.device() == logits.device(), name, ": expected device ", logits.device(),
              ", got ", t.device());
}

// ------------------------------------------------------------- group advantages (§2, §2.1)
// The GPU pipeline is orchestrated by python/rlkern/ops/advantages_segmented.py; these ops are
// its two passes (schemas in cpu/advantages_ops.cpp) and the discounted returns.

void check_cuda_array(const at::Tensor& t, const char* name, int64_t numel,
                      at::ScalarType dtype, const at::Tensor& like) {
  TORCH_CHECK(t.is_contiguous() && t.numel() == numel, name, ": expected a contiguous tensor of ",
              numel, " elements, got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, ": expected ", dtype, ", got ",
                   t.scalar_type());
  check_same_device(t, name, like);
}

template <typename T>
T* opt_ptr(const std::optional<at::Tensor>& t, const char* name, int64_t numel,
           at::ScalarType dtype, const at::Tensor& like) {
  if (!t.has_value()) return nullptr;
  check_cuda_array(*t, name, numel, dtype, like);
  return static_cast<T*>(t->data_ptr());
}

bool score_dtype_f64(const at::Tensor& scores) {
  TORCH_CHECK_TYPE(scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble,
                   "scores: expected float32 or float64, got ", scores.scalar_type());
  return scores.scalar_type() == at::kDouble;
}

void group_segment_stats_out_cuda(
    const at::Tensor& scores, const std::optional<at::Tensor>& perm,
    const std::optional<at::Tensor>& offsets, int64_t group_size, int64_t num_groups,
    const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& loglik,
    const at::Tensor& params, bool unlikely, bool weighted, bool with_loglik, bool top,
    const at::Tensor& ms, const std::optional<at::Tensor>& mx, const std::optional<at::Tensor>& ext,
    const std::optional<at::Tensor>& xr) {
  TORCH_CHECK(scores.is_cuda(), "scores: expected a CUDA tensor, got device ", scores.device());
  const int64_t n = scores.numel();
  const bool f64 = score_dtype_f64(scores);
  check_cuda_array(scores, "scores", n, scores.scalar_type(), scores);
  check_cuda_array(params, "params", 8, at::kDouble, scores);
  check_cuda_array(ms, "ms", num_groups * 5, at::kDouble, scores);
  const c10::cuda::CUDAGuard guard(scores.device());
  check_launch(
      rlkern_group_segment_stats_cuda(
          scores.const_data_ptr(), f64, opt_ptr<const int64_t>(perm, "perm", n, at::kLong, scores),
          opt_ptr<const int64_t>(offsets, "offsets", num_groups + 1, at::kLong, scores),
          group_size, num_groups, opt_ptr<const double>(weights, "weights", n, at::kDouble, scores),
          opt_ptr<const double>(loglik, "loglik", n, at::kDouble, scores),
          params.const_data_ptr<double>(), unlikely, weighted, with_loglik, top,
          ms.data_ptr<double>(), opt_ptr<double>(mx, "mx", num_groups * 5, at::kDouble, scores),
          opt_ptr<double>(ext, "ext", num_groups * 7, at::kDouble, scores),
          opt_ptr<double>(xr, "xr", n, at::kDouble, scores),
          at::cuda::getCurrentCUDAStream().stream()),
      "rlkern::group_segment_stats_out");
}

void group_rows_finish_out_cuda(
    const at::Tensor& scores, const std::optional<at::Tensor>& xr,
    const std::optional<at::Tensor>& loglik, const std::optional<at::Tensor>& row_group,
    int64_t group_size, const at::Tensor& ms, const at::Tensor& mx,
    const std::optional<at::Tensor>& ext, const at::Tensor& params, int64_t estimator,
    int64_t std_mode, bool batch_scope, bool singleton_verl, const at::Tensor& advantages,
    const at::Tensor& group_mean, const at::Tensor& group_std,
    const at::Tensor& zero_variance_mask) {
  TORCH_CHECK(scores.is_cuda(), "scores: expected a CUDA tensor, got device ", scores.device());
  const int64_t n = scores.numel();
  const bool f64 = score_dtype_f64(scores);
  const auto out_dtype = advantages.scalar_type();
  TORCH_CHECK_TYPE(out_dtype == at::kFloat || out_dtype == at::kDouble,
                   "advantages: expected float32 or float64, got ", out_dtype);
  check_cuda_array(scores, "scores", n, scores.scalar_type(), scores);
  check_cuda_array(advantages, "advantages", n, out_dtype, scores);
  check_cuda_array(group_mean, "group_mean", n, out_dtype, scores);
  check_cuda_array(group_std, "group_std", n, out_dtype, scores);
  check_cuda_array(zero_variance_mask, "zero_variance_mask", n, at::kBool, scores);
  check_cuda_array(params, "params", 8, at::kDouble, scores);
  TORCH_CHECK(ms.dim() == 2 && ms.size(1) == 5 && ms.sizes() == mx.sizes(),
              "ms, mx: expected two (K, 5) tables, got ", ms.sizes(), " and ", mx.sizes());
  const int64_t k = ms.size(0);
  check_cuda_array(ms, "ms", k * 5, at::kDouble, scores);
  check_cuda_array(mx, "mx", k * 5, at::kDouble, scores);
  const c10::cuda::CUDAGuard guard(scores.device());
  check_launch(
      rlkern_group_rows_finish_cuda(
          scores.const_data_ptr(), f64, opt_ptr<const double>(xr, "xr", n, at::kDouble, scores),
          opt_ptr<const double>(loglik, "loglik", n, at::kDouble, scores),
          opt_ptr<const int64_t>(row_group, "row_group", n, at::kLong, scores), group_size, n,
          ms.const_data_ptr<double>(), mx.const_data_ptr<double>(),
          opt_ptr<const double>(ext, "ext", k * 7, at::kDouble, scores),
          params.const_data_ptr<double>(), static_cast<int>(estimator),
          static_cast<int>(std_mode), batch_scope, singleton_verl, advantages.data_ptr(),
          group_mean.data_ptr(), group_std.data_ptr(),
          reinterpret_cast<uint8_t*>(zero_variance_mask.data_ptr<bool>()),
          out_dtype == at::kDouble, at::cuda::getCurrentCUDAStream().stream()),
      "rlkern::group_rows_finish_out");
}

void discounted_returns_out_cuda(const at::Tensor& rewards, const std::optional<at::Tensor>& reset,
                                 double gamma, const at::Tensor& out) {
  TORCH_CHECK(rewards.is_cuda() && rewards.dim() == 2, "rewards: expected a (N, T) CUDA tensor");
  const bool f64 = score_dtype_f64(rewards);
  check_cuda_array(rewards, "rewards", rewards.numel(), rewards.scalar_type(), rewards);
  check_cuda_array(out, "out", rewards.numel(), rewards.scalar_type(), rewards);
  const bool* r = opt_ptr<const bool>(reset, "reset", rewards.numel(), at::kBool, rewards);
  const c10::cuda::CUDAGuard guard(rewards.device());
  check_launch(rlkern_discounted_returns_cuda(rewards.const_data_ptr(), f64, rewards.size(0),
                                              rewards.size(1),
                                              reinterpret_cast<const uint8_t*>(r), gamma,
                                              out.data_ptr(),
                                              at::cuda::getCurrentCUDAStream().stream()),
               "rlkern::discounted_returns_out");
}

// ---------------------------------------------------------------------- policy losses (§3)
// Schemas in cpu/policy_loss_ops.cpp; the checks mirror the CPU glue there. float32 only.

void check_pl_bt(const at::Tensor& t, const char* name, const at::Tensor& lp,
                 at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 2 && t.sizes() == lp.sizes(), name, ": expected shape ", lp.sizes(),
              ", got ", t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, name, ": expected unit stride along T");
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, ": expected ", dtype, ", got ",
                   t.scalar_type());
  check_same_device(t, name, lp);
}

const float* pl_opt(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& lp,
                    int64_t* stride) {
  *stride = 0;
  if (!t.has_value()) return nullptr;
  check_pl_bt(*t, name, lp, at::kFloat);
  *stride = t->stride(0);
  return t->const_data_ptr<float>();
}

RlkernPolicyLossInputs pl_inputs(const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                                 const at::Tensor& advantages, const at::Tensor& mask,
                                 const std::optional<at::Tensor>& ref_logprobs,
                                 const std::optional<at::Tensor>& rollout_logprobs,
                                 const std::optional<at::Tensor>& entropy,
                                 const std::optional<at::Tensor>& token_weights,
                                 const std::optional<at::Tensor>& entropy_threshold,
                                 at::IntArrayRef flags, at::ArrayRef<double> hparams) {
  TORCH_CHECK(logprobs.is_cuda() && logprobs.dim() == 2, "logprobs: expected a (B, T) CUDA "
              "tensor, got ", logprobs.sizes(), " on ", logprobs.device());
  TORCH_CHECK_TYPE(logprobs.scalar_type() == at::kFloat, "logprobs: the CUDA kernels take "
                   "float32, got ", logprobs.scalar_type(), " (for float64 use backend='triton' "
                   "or 'torch')");
  TORCH_CHECK(flags.size() == 7 && hparams.size() == 13, "flags / hparams: expected 7 / 13 "
              "values, got ", flags.size(), " / ", hparams.size());
  RlkernPolicyLossInputs in{};
  in.B = logprobs.size(0);
  in.T = logprobs.size(1);
  check_pl_bt(logprobs, "logprobs", logprobs, at::kFloat);
  check_pl_bt(old_logprobs, "old_logprobs", logprobs, at::kFloat);
  check_pl_bt(mask, "mask", logprobs, at::kBool);
  in.logp = logprobs.const_data_ptr<float>();
  in.stride_logp = logprobs.stride(0);
  in.old = old_logprobs.const_data_ptr<float>();
  in.stride_old = old_logprobs.stride(0);
  in.mask = reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
  in.stride_mask = mask.stride(0);
  if (advantages.dim() == 2) {
    check_pl_bt(advantages, "advantages", logprobs, at::kFloat);
    in.adv_per_token = 1;
    in.stride_adv = advantages.stride(0);
  } else {
    check_cuda_array(advantages, "advantages", in.B, at::kFloat, logprobs);
  }
  in.adv = advantages.const_data_ptr<float>();
  in.ref = pl_opt(ref_logprobs, "ref_logprobs", logprobs, &in.stride_ref);
  in.rollout = pl_opt(rollout_logprobs, "rollout_logprobs", logprobs, &in.stride_rollout);
  in.entropy = pl_opt(entropy, "entropy", logprobs, &in.stride_entropy);
  in.token_weights = pl_opt(token_weights, "token_weights", logprobs, &in.stride_token_weights);
  in.entropy_threshold = opt_ptr<const float>(entropy_threshold, "entropy_threshold", 1,
                                              at::kFloat, logprobs);
  return in;
}

std::array<int32_t, 7> pl_flags(at::IntArrayRef flags) {
  std::array<int32_t, 7> f{};
  for (int i = 0; i < 7; ++i) f[i] = static_cast<int32_t>(flags[i]);
  return f;
}

void policy_loss_fwd_out_cuda(const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                              const at::Tensor& advantages, const at::Tensor& mask,
                              const std::optional<at::Tensor>& ref_logprobs,
                              const std::optional<at::Tensor>& rollout_logprobs,
                              const std::optional<at::Tensor>& entropy,
                              const std::optional<at::Tensor>& token_weights,
                              const std::optional<at::Tensor>& entropy_threshold,
                              at::IntArrayRef flags, at::ArrayRef<double> hparams,
                              const at::Tensor& row_stats) {
  const RlkernPolicyLossInputs in =
      pl_inputs(logprobs, old_logprobs, advantages, mask, ref_logprobs, rollout_logprobs,
                entropy, token_weights, entropy_threshold, flags, hparams);
  check_cuda_array(row_stats, "row_stats", 20 * in.B, at::kDouble, logprobs);
  const auto f = pl_flags(flags);
  const c10::cuda::CUDAGuard guard(logprobs.device());
  check_launch(rlkern_policy_loss_fwd_cuda(&in, f.data(), hparams.data(),
                                           row_stats.data_ptr<double>(),
                                           at::cuda::getCurrentCUDAStream().stream()),
               "rlkern::policy_loss_fwd_out");
}

void policy_loss_bwd_out_cuda(const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                              const at::Tensor& advantages, const at::Tensor& mask,
                              const std::optional<at::Tensor>& ref_logprobs,
                              const std::optional<at::Tensor>& rollout_logprobs,
                              const std::optional<at::Tensor>& entropy,
                              const std::optional<at::Tensor>& token_weights,
                              const std::optional<at::Tensor>& entropy_threshold,
                              const at::Tensor& row_stats, const at::Tensor& grad_rows,
                              at::IntArrayRef flags, at::ArrayRef<double> hparams,
                              const at::Tensor& grad_logprobs,
                              const std::optional<at::Tensor>& grad_entropy) {
  const RlkernPolicyLossInputs in =
      pl_inputs(logprobs, old_logprobs, advantages, mask, ref_logprobs, rollout_logprobs,
                entropy, token_weights, entropy_threshold, flags, hparams);
  check_cuda_array(row_stats, "row_stats", 20 * in.B, at::kDouble, logprobs);
  check_cuda_array(grad_rows, "grad_rows", 4 * in.B, at::kDouble, logprobs);
  check_cuda_array(grad_logprobs, "grad_logprobs", in.B * in.T, at::kFloat, logprobs);
  float* ge = opt_ptr<float>(grad_entropy, "grad_entropy", in.B * in.T, at::kFloat, logprobs);
  const auto f = pl_flags(flags);
  const c10::cuda::CUDAGuard guard(logprobs.device());
  check_launch(rlkern_policy_loss_bwd_cuda(&in, f.data(), hparams.data(),
                                           row_stats.const_data_ptr<double>(),
                                           grad_rows.const_data_ptr<double>(),
                                           grad_logprobs.data_ptr<float>(), ge,
                                           at::cuda::getCurrentCUDAStream().stream()),
               "rlkern::policy_loss_bwd_out");
}

void kl_penalty_out_cuda(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                         const at::Tensor* grad, int64_t kind, bool straight_through,
                         double log_clamp, double value_clamp, const at::Tensor& out,
                         const char* op) {
  TORCH_CHECK(logprobs.is_cuda(), "logprobs: expected a CUDA tensor");
  const int64_t n = logprobs.numel();
  check_cuda_array(logprobs, "logprobs", n, at::kFloat, logprobs);
  check_cuda_array(ref_logprobs, "ref_logprobs", n, at::kFloat, logprobs);
  check_cuda_array(out, "out", n, at::kFloat, logprobs);
  if (grad) check_cuda_array(*grad, "grad", n, at::kFloat, logprobs);
  const c10::cuda::CUDAGuard guard(logprobs.device());
  check_launch(rlkern_kl_penalty_cuda(logprobs.const_data_ptr<float>(),
                                      ref_logprobs.const_data_ptr<float>(),
                                      grad ? grad->const_data_ptr<float>() : nullptr,
                                      out.data_ptr<float>(), n, static_cast<int>(kind),
                                      straight_through ? 1 : 0, log_clamp, value_clamp,
                                      at::cuda::getCurrentCUDAStream().stream()),
               op);
}

void kl_penalty_fwd_out_cuda(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                             int64_t kind, bool straight_through, double log_clamp,
                             double value_clamp, const at::Tensor& out) {
  kl_penalty_out_cuda(logprobs, ref_logprobs, nullptr, kind, straight_through, log_clamp,
                      value_clamp, out, "rlkern::kl_penalty_fwd_out");
}

void kl_penalty_bwd_out_cuda(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                             const at::Tensor& grad, int64_t kind, bool straight_through,
                             double log_clamp, double value_clamp, const at::Tensor& out) {
  kl_penalty_out_cuda(logprobs, ref_logprobs, &grad, kind, straight_through, log_clamp,
                      value_clamp, out, "rlkern::kl_penalty_bwd_out");
}

}  // namespace

TORCH_LIBRARY_IMPL(rlkern, CUDA, m) {
  cuda::impl_logprobs_ops(m);
  m.impl("group_segment_stats_out", &group_segment_stats_out_cuda);
  m.impl("group_rows_finish_out", &group_rows_finish_out_cuda);
  m.impl("discounted_returns_out", &discounted_returns_out_cuda);
  m.impl("policy_loss_fwd_out", &policy_loss_fwd_out_cuda);
  m.impl("policy_loss_bwd_out", &policy_loss_bwd_out_cuda);
  m.impl("kl_penalty_fwd_out", &kl_penalty_fwd_out_cuda);
  m.impl("kl_penalty_bwd_out", &kl_penalty_bwd_out_cuda);
  cuda::impl_sample_ops(m);
}

}  // namespace rlkern
