// Glue from tensors to the CPU truncated log-probs (schemas in truncated_logprobs_ops.h). The
// Python layer (python/rlkern/ops/truncated_logprobs.py) validates the user's arguments with
// friendly messages; these checks guard the raw pointers against any other caller.
#include "cpu/truncated_logprobs_ops.h"

#include "checks.h"
#include "cpu/glue.h"
#include "cpu/truncated_logprobs.h"

namespace rlkern::cpu {
namespace {

TruncatedLogprobsArgs row_args(const at::Tensor& logits, const at::Tensor& labels,
                               const at::Tensor& temperature,
                               const std::optional<at::Tensor>& top_k,
                               const std::optional<at::Tensor>& top_p,
                               const std::optional<at::Tensor>& min_p, bool joint,
                               int64_t ignore_index) {
  TORCH_CHECK(logits.dim() == 3, "logits: expected (B, L, V), got ", logits.sizes());
  TORCH_CHECK(logits.size(2) <= 1 || logits.stride(2) == 1,
              "logits: the vocab (last) dim must be contiguous");
  TruncatedLogprobsArgs a{};
  static_cast<LogitsLayout&>(a) = logits_layout(logits);
  const int64_t N = a.B * a.L;
  TORCH_CHECK(a.V > 0 || N == 0, "logits: empty vocabulary");
  checks::array(labels, "labels", N, at::kLong, logits);
  checks::array(temperature, "temperature", N, at::kDouble, logits);
  a.labels = labels.const_data_ptr<int64_t>();
  a.ignore_index = ignore_index;
  a.temperature = temperature.const_data_ptr<double>();
  a.top_k = checks::maybe_array<int64_t>(top_k, "top_k", N, at::kLong, logits);
  a.top_p = checks::maybe_array<double>(top_p, "top_p", N, at::kDouble, logits);
  a.min_p = checks::maybe_array<double>(min_p, "min_p", N, at::kDouble, logits);
  a.joint = joint;
  return a;
}

void fwd_out(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& temperature,
             const std::optional<at::Tensor>& top_k, const std::optional<at::Tensor>& top_p,
             const std::optional<at::Tensor>& min_p, bool joint, int64_t ignore_index,
             const at::Tensor& logprobs, const std::optional<at::Tensor>& entropy,
             const at::Tensor& lse) {
  TruncatedLogprobsArgs a =
      row_args(logits, labels, temperature, top_k, top_p, min_p, joint, ignore_index);
  const int64_t N = a.B * a.L;
  checks::array(logprobs, "logprobs", N, at::kFloat, logits);
  checks::array(lse, "lse", N, at::kFloat, logits);
  a.logprobs = logprobs.data_ptr<float>();
  a.entropy = checks::maybe_out<float>(entropy, "entropy", N, at::kFloat, logits);
  a.lse = lse.data_ptr<float>();
  truncated_logprobs_fwd(a);
}

void bwd_out(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& temperature,
             const std::optional<at::Tensor>& top_k, const std::optional<at::Tensor>& top_p,
             const std::optional<at::Tensor>& min_p, bool joint, int64_t ignore_index,
             const std::optional<at::Tensor>& grad_logprobs,
             const std::optional<at::Tensor>& grad_entropy,
             const std::optional<at::Tensor>& grad_lse, const at::Tensor& grad_logits) {
  TruncatedLogprobsArgs a =
      row_args(logits, labels, temperature, top_k, top_p, min_p, joint, ignore_index);
  const int64_t N = a.B * a.L;
  a.grad_logprobs = checks::maybe_array<float>(grad_logprobs, "grad_logprobs", N, at::kFloat,
                                               logits);
  a.grad_entropy = checks::maybe_array<float>(grad_entropy, "grad_entropy", N, at::kFloat,
                                              logits);
  a.grad_lse = checks::maybe_array<float>(grad_lse, "grad_lse", N, at::kFloat, logits);
  checks::array(grad_logits, "grad_logits", N * a.V, logits.scalar_type(), logits);
  a.grad_logits = grad_logits.data_ptr();
  truncated_logprobs_bwd(a);
}

}  // namespace

void impl_truncated_logprobs_ops(torch::Library& m) {
  m.impl(truncated_logprobs::kFwdOut.name, &fwd_out);
  m.impl(truncated_logprobs::kBwdOut.name, &bwd_out);
}

}  // namespace rlkern::cpu
