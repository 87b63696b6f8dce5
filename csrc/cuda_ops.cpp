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

#include <optional>

#include "cuda/policy_loss_ops.h"
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
  m.impl("group_segment_stats_out", &group_segment_stats_out_cuda);
  m.impl("group_rows_finish_out", &group_rows_finish_out_cuda);
  m.impl("discounted_returns_out", &discounted_returns_out_cuda);
  impl_policy_loss_cuda(m);  // policy_loss_{fwd,bwd}_out, kl_penalty_{fwd,bwd}_out
  m.impl("sample_out", &sample_out_cuda);
}

}  // namespace rlkern
