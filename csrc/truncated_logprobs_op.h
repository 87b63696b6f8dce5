// Token log-probs under the sampler's truncated distribution as the binding layer sees them:
// the op schemas (defined in csrc/ops.cpp) and the argument checks, shared by the CPU glue
// (cpu/truncated_logprobs_ops.cpp) and the CUDA glue (cuda/truncated_logprobs_ops.cpp), so
// that both backends reject the same inputs with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "checks.h"
#include "op_schema.h"
#include "rlkern/truncated_logprobs.h"

namespace rlkern::truncated_logprobs {

// logits (B, L, V) with a unit vocab stride; labels and the per-row arrays have B·L entries
// (temperature float64, top_k int64, top_p / min_p float64; a filter is None when off for
// every row); `joint` is filter_order == joint (rlkern/sample.h). Outputs fp32, B·L entries.
#define RLKERN_TRUNC_ROW_ARGS                                                                 \
  "Tensor logits, Tensor labels, Tensor temperature, Tensor? top_k, Tensor? top_p, "         \
  "Tensor? min_p, bool joint, int ignore_index, "

inline constexpr OpSchema kFwdOut{
    "truncated_logprobs_fwd_out",
    "truncated_logprobs_fwd_out(" RLKERN_TRUNC_ROW_ARGS
    "Tensor(a!) logprobs, Tensor(b!)? entropy, Tensor(c!) lse) -> ()"};

// grad_logits: contiguous, the logits' shape and dtype.
inline constexpr OpSchema kBwdOut{
    "truncated_logprobs_bwd_out",
    "truncated_logprobs_bwd_out(" RLKERN_TRUNC_ROW_ARGS
    "Tensor? grad_logprobs, Tensor? grad_entropy, Tensor? grad_lse, "
    "Tensor(a!) grad_logits) -> ()"};

// The CPU backend's forward as one call (python/rlkern/ops/truncated_logprobs.py takes it for
// CPU tensors): the arguments of kFwdOut, labels int32 or int64; the outputs allocated, of
// labels' shape in the accumulation dtype (entropy empty unless with_entropy), and with
// check_data the label range and all −inf row checks of logprobs_fwd_cpu (logprobs_op.h).
inline constexpr OpSchema kFwdCpu{
    "truncated_logprobs_fwd_cpu",
    "truncated_logprobs_fwd_cpu(" RLKERN_TRUNC_ROW_ARGS
    "bool with_entropy, bool check_data) -> (Tensor, Tensor, Tensor)"};
#undef RLKERN_TRUNC_ROW_ARGS

inline constexpr OpSchema kOps[] = {kFwdOut, kBwdOut, kFwdCpu};

// The checked arguments of either op as raw pointers (rlkern/truncated_logprobs.h; the
// logits' pointer and dtype are the backend's to take).
inline Rows check_rows(const at::Tensor& logits, const at::Tensor& labels,
                       const at::Tensor& temperature, const std::optional<at::Tensor>& top_k,
                       const std::optional<at::Tensor>& top_p,
                       const std::optional<at::Tensor>& min_p, bool joint,
                       int64_t ignore_index) {
  TORCH_CHECK(logits.dim() == 3, "logits: expected (B, L, V), got ", logits.sizes());
  TORCH_CHECK(logits.size(2) <= 1 || logits.stride(2) == 1,
              "logits: the vocab (last) dim must be contiguous");
  Rows a{};
  a.B = logits.size(0);
  a.L = logits.size(1);
  a.V = logits.size(2);
  a.stride_0 = logits.stride(0);
  a.stride_1 = logits.stride(1);
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

// The C++ signatures of the two ops, written once for both backends: the shared checks, then
// Launch(logits, const Rows&) with the backend's part (m.impl(kFwdOut.name, &fwd_out<&f>)).
template <auto Launch>
void fwd_out(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& temperature,
             const std::optional<at::Tensor>& top_k, const std::optional<at::Tensor>& top_p,
             const std::optional<at::Tensor>& min_p, bool joint, int64_t ignore_index,
             const at::Tensor& logprobs, const std::optional<at::Tensor>& entropy,
             const at::Tensor& lse) {
  Rows a = check_rows(logits, labels, temperature, top_k, top_p, min_p, joint, ignore_index);
  const int64_t N = a.B * a.L;
  checks::array(logprobs, "logprobs", N, at::kFloat, logits);
  checks::array(lse, "lse", N, at::kFloat, logits);
  a.logprobs = logprobs.data_ptr<float>();
  a.entropy = checks::maybe_out<float>(entropy, "entropy", N, at::kFloat, logits);
  a.lse = lse.data_ptr<float>();
  Launch(logits, a);
}

template <auto Launch>
void bwd_out(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& temperature,
             const std::optional<at::Tensor>& top_k, const std::optional<at::Tensor>& top_p,
             const std::optional<at::Tensor>& min_p, bool joint, int64_t ignore_index,
             const std::optional<at::Tensor>& grad_logprobs,
             const std::optional<at::Tensor>& grad_entropy,
             const std::optional<at::Tensor>& grad_lse, const at::Tensor& grad_logits) {
  Rows a = check_rows(logits, labels, temperature, top_k, top_p, min_p, joint, ignore_index);
  const int64_t N = a.B * a.L;
  a.grad_logprobs = checks::maybe_array<float>(grad_logprobs, "grad_logprobs", N, at::kFloat,
                                               logits);
  a.grad_entropy = checks::maybe_array<float>(grad_entropy, "grad_entropy", N, at::kFloat,
                                              logits);
  a.grad_lse = checks::maybe_array<float>(grad_lse, "grad_lse", N, at::kFloat, logits);
  checks::array(grad_logits, "grad_logits", N * a.V, logits.scalar_type(), logits);
  a.grad_logits = grad_logits.data_ptr();
  Launch(logits, a);
}

}  // namespace rlkern::truncated_logprobs
