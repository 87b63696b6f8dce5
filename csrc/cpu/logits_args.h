// Tensor-level helpers of the CPU one-call logprobs ops (logprobs_fwd_cpu / logprobs_bwd_cpu in
// cpu/logprobs_ops.cpp, truncated_logprobs_fwd_cpu in cpu/truncated_logprobs_ops.cpp): the
// user's logits and per-row tensors as the kernels read them, and the data checks that the
// Python layer (python/rlkern/ops/logprobs.py) makes for the other backends, with its messages.
#pragma once

#include <ATen/TensorUtils.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <optional>

namespace rlkern::cpu {

// The user's (..., V) logits as (B, L, V) without a copy: (N, V) → (1, N, V), (B, L, V) as it
// is, more leading dims merged where their strides allow it.
inline at::Tensor rows3d(const at::Tensor& logits) {
  TORCH_CHECK_VALUE(logits.dim() >= 2, "logits: expected (N, V) or (B, L, V), got shape ",
                    logits.sizes());
  if (logits.dim() == 2) return logits.unsqueeze(0);
  if (logits.dim() == 3) return logits;
  int64_t lead = 1;
  for (int64_t d = 0; d < logits.dim() - 2; ++d) lead *= logits.size(d);
  const std::array<int64_t, 3> shape{lead, logits.size(-2), logits.size(-1)};
  const auto merged = at::detail::computeStride(logits.sizes(), logits.strides(),
                                                at::IntArrayRef(shape));
  TORCH_CHECK_VALUE(merged.has_value(), "logits of shape ", logits.sizes(), " with strides ",
                    logits.strides(), ": the leading dims cannot be merged without a copy; "
                    "pass a (N, V) or (B, L, V) tensor");
  return logits.view(shape);
}

// A per-row tensor (labels, lse, gradients: any strides) as the contiguous array of `rows`
// values the kernels read; no copy where it is one already.
inline at::Tensor row_array(const at::Tensor& t, const char* name, int64_t rows,
                            at::ScalarType want) {
  TORCH_CHECK_VALUE(t.numel() == rows, name, ": expected ", rows, " values (one a row), got "
                    "shape ", t.sizes());
  return t.reshape({rows}).to(want).contiguous();
}

inline at::Tensor label_array(const at::Tensor& labels, int64_t rows) {
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt,
                   "labels: expected int32 or int64, got ", labels.scalar_type());
  return row_array(labels, "labels", rows, at::kLong);
}

inline std::optional<at::Tensor> row_array(const std::optional<at::Tensor>& t, const char* name,
                                           int64_t rows, at::ScalarType want) {
  if (!t.has_value() || t->numel() == 0) return std::nullopt;  // empty: not computed
  return row_array(*t, name, rows, want);
}

// Labels in [0, V) or ignore_index; the message names the first one that is not (the same
// as the Python layer's, python/rlkern/ops/logprobs.py _validate_labels).
inline void check_label_range(const int64_t* labels, int64_t rows, int64_t V,
                              int64_t ignore_index) {
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t y = labels[i];
    TORCH_CHECK_VALUE((y >= 0 && y < V) || y == ignore_index, "labels: value ", y,
                      " at flat position ", i, " is outside [0, ", V,
                      ") and is not ignore_index=", ignore_index);
  }
}

// A row of all −inf logits: lse = −inf *and* a NaN logprob (a finite row can have lse = −inf
// too, with a finite logprob); python/rlkern/ops/logprobs.py _validate_rows has the reason.
template <typename Acc>
void check_neginf_rows(const Acc* lse, const Acc* logprobs, const int64_t* labels, int64_t rows,
                       int64_t ignore_index) {
  for (int64_t i = 0; i < rows; ++i) {
    TORCH_CHECK_VALUE(!(std::isinf(lse[i]) && lse[i] < 0 && std::isnan(logprobs[i]) &&
                        labels[i] != ignore_index),
                      "logits: row ", i, " (flat index over the leading dims) is all -inf, so "
                      "its softmax is undefined");
  }
}

}  // namespace rlkern::cpu
