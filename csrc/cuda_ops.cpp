// CUDA implementations of the rlkern ops: thin glue from tensors and the current stream to the
// torch-free launchers of csrc/cuda/*.cu (declared in rlkern/cuda_launchers.h). The schemas
// are defined once, in ops.cpp (TORCH_LIBRARY); this file only registers CUDA kernels for
// them. Built only when RLKERN_WITH_CUDA (a CUDA toolkit and a CUDA build of torch).
//
// The checks mirror the CPU implementations in ops.cpp so that both backends reject the same
// inputs with the same messages; the launchers re-check sizes and pointers and return an error
// code, turned into an exception here.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <optional>

#include "cuda/advantages_ops.h"
#include "rlkern/cuda_launchers.h"

namespace rlkern {
namespace {

int cuda_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return RLKERN_DTYPE_FP32;
    case at::kHalf: return RLKERN_DTYPE_FP16;
    case at::kBFloat16: return RLKERN_DTYPE_BF16;
    default:
      TORCH_CHECK_TYPE(false, "logits: the CUDA kernels take bfloat16, float16 or float32, got ",
                       t.scalar_type(), " (for float64 use backend='triton' or 'torch')");
  }
}

void check_launch(int code, const char* op) {
  TORCH_CHECK(code == RLKERN_CUDA_OK, op, " (CUDA) failed: ", rlkern_cuda_error_string(code));
}

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& logits) {
  TORCH_CHECK(t.device() == logits.device(), name, ": expected device ", logits.device(),
              ", got ", t.device());
}

void check_rows_out(const at::Tensor& out, const char* name, int64_t rows,
                    const at::Tensor& logits) {
  TORCH_CHECK(out.numel() == rows && out.is_contiguous(), name,
              ": expected a contiguous tensor of ", rows, " elements, got shape ", out.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == at::kFloat, name, ": expected dtype float32, got ",
                   out.scalar_type());
  check_same_device(out, name, logits);
}

void check_logits(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.is_cuda(), "logits: expected a CUDA tensor, got device ", logits.device());
  TORCH_CHECK(logits.dim() == 3, "logits: expected a (B, L, V) view, got ", logits.dim(),
              " dims");
  TORCH_CHECK(logits.size(2) <= 1 || logits.stride(2) == 1,
              "logits: the vocab (last) dim must be contiguous, got stride ", logits.stride(2));
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "labels: expected int64, got ",
                   labels.scalar_type());
  TORCH_CHECK(labels.is_contiguous() && labels.numel() == logits.size(0) * logits.size(1),
              "labels: expected a contiguous (B, L) tensor matching logits ", logits.sizes());
  check_same_device(labels, "labels", logits);
}

float* maybe_out(const std::optional<at::Tensor>& t, const char* name, int64_t rows,
                 const at::Tensor& logits) {
  if (!t.has_value()) return nullptr;
  check_rows_out(*t, name, rows, logits);
  return t->data_ptr<float>();
}

const float* maybe_in(const std::optional<at::Tensor>& t, const char* name, int64_t rows,
                      const at::Tensor& logits) {
  if (!t.has_value()) return nullptr;
  check_rows_out(*t, name, rows, logits);
  return t->const_data_ptr<float>();
}

// logprobs_fwd_out(Tensor logits, Tensor labels, float temperature, int ignore_index,
//   Tensor(a!) logprobs, Tensor(b!) lse, Tensor(c!)? entropy, Tensor(d!)? self_certainty,
//   Tensor(e!)? sum_p_sq) -> ()
void logprobs_fwd_out_cuda(const at::Tensor& logits, const at::Tensor& labels,
                           double temperature, int64_t ignore_index, const at::Tensor& logprobs,
                           const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
                           const std::optional<at::Tensor>& self_certainty,
                           const std::optional<at::Tensor>& sum_p_sq) {
  check_logits(logits, labels);
  TORCH_CHECK(temperature > 0, "temperature: expected > 0, got ", temperature);
  TORCH_CHECK(self_certainty.has_value() == sum_p_sq.has_value(),
              "self_certainty and sum_p_sq are computed together: pass both or neither");
  const int64_t rows = logits.size(0) * logits.size(1);
  check_rows_out(logprobs, "logprobs", rows, logits);
  check_rows_out(lse, "lse", rows, logits);
  float* entropy_ptr = maybe_out(entropy, "entropy", rows, logits);
  float* self_certainty_ptr = maybe_out(self_certainty, "self_certainty", rows, logits);
  float* sum_p_sq_ptr = maybe_out(sum_p_sq, "sum_p_sq", rows, logits);
  if (rows == 0) return;
  const int dtype = cuda_dtype(logits);

  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  check_launch(
      rlkern_logprobs_fwd_cuda(logits.const_data_ptr(), dtype, logits.size(0), logits.size(1),
                               logits.size(2), logits.stride(0), logits.stride(1),
                               labels.const_data_ptr<int64_t>(), static_cast<float>(temperature),
                               ignore_index, logprobs.data_ptr<float>(), lse.data_ptr<float>(),
                               entropy_ptr, self_certainty_ptr, sum_p_sq_ptr, stream),
      "rlkern::logprobs_fwd_out");
}

// logprobs_bwd_out(Tensor logits, Tensor labels, Tensor lse, Tensor? entropy,
//   Tensor? grad_logprobs, Tensor? grad_entropy, Tensor? grad_lse, float temperature,
//   int ignore_index, Tensor(a!) grad_logits) -> ()
// grad_logits may be logits itself (in-place backward).
void logprobs_bwd_out_cuda(const at::Tensor& logits, const at::Tensor& labels,
                           const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
                           const std::optional<at::Tensor>& grad_logprobs,
                           const std::optional<at::Tensor>& grad_entropy,
                           const std::optional<at::Tensor>& grad_lse, double temperature,
                           int64_t ignore_index, const at::Tensor& grad_logits) {
  check_logits(logits, labels);
  TORCH_CHECK(temperature > 0, "temperature: expected > 0, got ", temperature);
  TORCH_CHECK(grad_logits.sizes() == logits.sizes(), "grad_logits: expected shape ",
              logits.sizes(), ", got ", grad_logits.sizes());
  TORCH_CHECK_TYPE(grad_logits.scalar_type() == logits.scalar_type(),
                   "grad_logits: expected dtype ", logits.scalar_type());
  TORCH_CHECK(grad_logits.size(2) <= 1 || grad_logits.stride(2) == 1,
              "grad_logits: the vocab (last) dim must be contiguous");
  check_same_device(grad_logits, "grad_logits", logits);
  TORCH_CHECK(!grad_entropy.has_value() || entropy.has_value(),
              "entropy: required when grad_entropy is given");
  const int64_t rows = logits.size(0) * logits.size(1);
  if (rows == 0 || logits.size(2) == 0) return;
  const int dtype = cuda_dtype(logits);
  const float* lse_ptr = maybe_in(lse, "lse", rows, logits);
  const float* entropy_ptr = maybe_in(entropy, "entropy", rows, logits);
  const float* grad_logprobs_ptr = maybe_in(grad_logprobs, "grad_logprobs", rows, logits);
  const float* grad_entropy_ptr = maybe_in(grad_entropy, "grad_entropy", rows, logits);
  const float* grad_lse_ptr = maybe_in(grad_lse, "grad_lse", rows, logits);

  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  check_launch(
      rlkern_logprobs_bwd_cuda(logits.const_data_ptr(), dtype, logits.size(0), logits.size(1),
                               logits.size(2), logits.stride(0), logits.stride(1),
                               labels.const_data_ptr<int64_t>(), lse_ptr, entropy_ptr,
                               grad_logprobs_ptr, grad_entropy_ptr, grad_lse_ptr,
                               static_cast<float>(temperature), ignore_index,
                               grad_logits.data_ptr(), grad_logits.stride(0),
                               grad_logits.stride(1), stream),
      "rlkern::logprobs_bwd_out");
}

// Array checks of the glue below (the advantage ops' glue is in cuda/advantages_ops.cpp).

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

// ------------------------------------------------------------------------------ sampler (§4)
// sample_out(Tensor logits, Tensor? indices, Tensor temperature, Tensor? top_k, Tensor? top_p,
//   Tensor? min_p, Tensor seeds, Tensor steps, bool joint, bool raw_temperature,
//   Tensor(a!) tokens, Tensor(b!) raw_logprobs, Tensor(c!) processed_logprobs,
//   Tensor(d!)? entropy, Tensor(e!) lse) -> ()   (schema in cpu/sample_ops.cpp; the checks
// mirror sample_out_cpu there, except that indices are range-checked by the Python layer:
// reading them here would synchronise the stream).

void sample_out_cuda(const at::Tensor& logits, const std::optional<at::Tensor>& indices,
                     const at::Tensor& temperature, const std::optional<at::Tensor>& top_k,
                     const std::optional<at::Tensor>& top_p, const std::optional<at::Tensor>& min_p,
                     const at::Tensor& seeds, const at::Tensor& steps, bool joint,
                     bool raw_temperature, const at::Tensor& tokens, const at::Tensor& raw_logprobs,
                     const at::Tensor& processed_logprobs, const std::optional<at::Tensor>& entropy,
                     const at::Tensor& lse) {
  TORCH_CHECK(logits.is_cuda(), "logits: expected a CUDA tensor, got device ", logits.device());
  TORCH_CHECK(logits.dim() == 2, "logits: expected (R, V), got ", logits.sizes());
  TORCH_CHECK(logits.size(1) <= 1 || logits.stride(1) == 1,
              "logits: the vocab (last) dim must be contiguous");
  const int dtype = cuda_dtype(logits);
  const int64_t R = logits.size(0), V = logits.size(1), N = tokens.numel();
  TORCH_CHECK(V > 0 || N == 0, "logits: empty vocabulary");
  TORCH_CHECK(indices.has_value() || N == R, "tokens: expected ", R,
              " rows without indices, got ", N);
  check_cuda_array(tokens, "tokens", N, at::kLong, logits);
  check_cuda_array(raw_logprobs, "raw_logprobs", N, at::kFloat, logits);
  check_cuda_array(processed_logprobs, "processed_logprobs", N, at::kFloat, logits);
  check_cuda_array(lse, "lse", N, at::kFloat, logits);
  check_cuda_array(temperature, "temperature", N, at::kDouble, logits);
  check_cuda_array(seeds, "seeds", N, at::kLong, logits);
  check_cuda_array(steps, "steps", N, at::kLong, logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  check_launch(
      rlkern_sample_cuda(
          logits.const_data_ptr(), dtype, R, V, R > 1 ? logits.stride(0) : V, N,
          opt_ptr<const int64_t>(indices, "indices", N, at::kLong, logits),
          temperature.const_data_ptr<double>(),
          opt_ptr<const int64_t>(top_k, "top_k", N, at::kLong, logits),
          opt_ptr<const double>(top_p, "top_p", N, at::kDouble, logits),
          opt_ptr<const double>(min_p, "min_p", N, at::kDouble, logits),
          seeds.const_data_ptr<int64_t>(), steps.const_data_ptr<int64_t>(), joint ? 1 : 0,
          raw_temperature ? 1 : 0, tokens.data_ptr<int64_t>(), raw_logprobs.data_ptr<float>(),
          processed_logprobs.data_ptr<float>(),
          opt_ptr<float>(entropy, "entropy", N, at::kFloat, logits), lse.data_ptr<float>(),
          at::cuda::getCurrentCUDAStream().stream()),
      "rlkern::sample_out");
}

}  // namespace

TORCH_LIBRARY_IMPL(rlkern, CUDA, m) {
  m.impl("logprobs_fwd_out", &logprobs_fwd_out_cuda);
  m.impl("logprobs_bwd_out", &logprobs_bwd_out_cuda);
  register_advantages_cuda(m);  // cuda/advantages_ops.cpp
  m.impl("policy_loss_fwd_out", &policy_loss_fwd_out_cuda);
  m.impl("policy_loss_bwd_out", &policy_loss_bwd_out_cuda);
  m.impl("kl_penalty_fwd_out", &kl_penalty_fwd_out_cuda);
  m.impl("kl_penalty_bwd_out", &kl_penalty_bwd_out_cuda);
  m.impl("sample_out", &sample_out_cuda);
}

}  // namespace rlkern
