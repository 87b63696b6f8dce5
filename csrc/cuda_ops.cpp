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

}  // namespace

TORCH_LIBRARY_IMPL(rlkern, CUDA, m) {
  m.impl("logprobs_fwd_out", &logprobs_fwd_out_cuda);
  m.impl("logprobs_bwd_out", &logprobs_bwd_out_cuda);
}

}  // namespace rlkern
