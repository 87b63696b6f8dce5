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

#include "cuda/advantages_ops.h"
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

// Array checks of the policy-loss glue below.

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
  register_advantages_cuda(m);  // cuda/advantages_ops.cpp
  m.impl("policy_loss_fwd_out", &policy_loss_fwd_out_cuda);
  m.impl("policy_loss_bwd_out", &policy_loss_bwd_out_cuda);
  m.impl("kl_penalty_fwd_out", &kl_penalty_fwd_out_cuda);
  m.impl("kl_penalty_bwd_out", &kl_penalty_bwd_out_cuda);
  cuda::impl_sample_ops(m);
}

}  // namespace rlkern
