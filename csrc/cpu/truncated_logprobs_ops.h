// Token log-probs under the sampler's truncated distribution as the binding layer sees them:
// the op schemas (defined in csrc/ops.cpp) and the CPU glue (truncated_logprobs_ops.cpp).
#pragma once

#include <torch/library.h>

#include "op_schema.h"

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

#undef RLKERN_TRUNC_ROW_ARGS

inline constexpr OpSchema kOps[] = {kFwdOut, kBwdOut};

}  // namespace rlkern::truncated_logprobs

namespace rlkern::cpu {

// m.impl() of the ops above (inside TORCH_LIBRARY_IMPL(rlkern, CPU)).
void impl_truncated_logprobs_ops(torch::Library& m);

}  // namespace rlkern::cpu
