// Layouts of the logprobs family (ALGORITHMS.md §1), defined once (rlkern/layout.h) and
// exported through rlkern._C as layout("logprobs") and layout("linear_logprobs").
//
//   logprobs.outputs        the per-row outputs of token logprobs, in the order of the compiled
//                           ops' `outputs` / `grad_outputs` lists (logprobs_fwd_out,
//                           logprobs_bwd_out, linear_logprobs_finish_out, ..._tile_bwd_), of
//                           the Python op rlkern::logprobs_fwd's results and of the output
//                           arguments of the Triton launcher kernels/logprobs.py:logprobs_fwd.
//   linear_logprobs.stats   the per-row running state of the fused linear op (the columns of
//                           linear_logprobs_tile_fwd_'s (n, kNumStats) float64 `stats`).
//
// Torch-free, host + device.
#pragma once

#include <initializer_list>

#include "rlkern/layout.h"

// lse, logprobs = z_y − lse, entropy = lse − Σp z are differentiable; self_certainty and
// sum_p_sq (Σp²) are statistics computed together (return_stats) and are not.
#define RLKERN_LOGPROBS_OUTPUTS(X)    \
  X(kLogprobs, "logprobs")            \
  X(kLse, "lse")                      \
  X(kEntropy, "entropy")              \
  X(kSelfCertainty, "self_certainty") \
  X(kSumPSq, "sum_p_sq")

// The online-softmax summary of the columns seen so far (rlkern/online_softmax.h), natural
// units: m = max z, s = Σ exp(z − m), t = Σ exp(z − m)(z − m), and x_y = the raw label logit
// once the tile holding it has been seen (NaN before, and for a label in no tile).
#define RLKERN_LINEAR_LOGPROBS_STATS(X) \
  X(kStatMax, "m")                      \
  X(kStatSum, "s")                      \
  X(kStatMoment, "t")                   \
  X(kStatLabelLogit, "x_y")

namespace rlkern::logprobs {

enum Output : int { RLKERN_LOGPROBS_OUTPUTS(RLKERN_LAYOUT_ENUM) kNumOutputs };
RLKERN_LAYOUT_NAMES(kOutputNames, RLKERN_LOGPROBS_OUTPUTS);

// Whether autograd can flow through output `o` (the backward's grad_outputs may hold it).
constexpr bool differentiable(int o) { return o == kLogprobs || o == kLse || o == kEntropy; }

inline constexpr std::initializer_list<LayoutTable> kLayout = {
    layout_table("outputs", kOutputNames)};

// A backward takes p_v = exp(z_v − lse) from the forward's lse while |lse| < kBwdLseBound: the
// float lse then pins p down to |lse|·2^-24 relatively. A row with a larger (or infinite) lse
// (huge logits, a tiny temperature) recomputes its max and normaliser from the logits and
// works in max-shifted coordinates instead, so that its gradient stays exact.
inline constexpr double kBwdLseBound = 256.0;

// What a backward reads per row, as raw arrays of the accumulation dtype (nullptr: absent):
// the forward's lse (and its entropy, needed for an entropy gradient) and the upstream
// gradients of the differentiable outputs (an absent gradient is 0).
struct GradInputs {
  const void* lse;
  const void* entropy;
  const void* grad_logprobs;
  const void* grad_entropy;
  const void* grad_lse;
};

}  // namespace rlkern::logprobs

namespace rlkern::linear_logprobs {

enum Stat : int { RLKERN_LINEAR_LOGPROBS_STATS(RLKERN_LAYOUT_ENUM) kNumStats };
RLKERN_LAYOUT_NAMES(kStatNames, RLKERN_LINEAR_LOGPROBS_STATS);

inline constexpr std::initializer_list<LayoutTable> kLayout = {
    layout_table("stats", kStatNames)};

}  // namespace rlkern::linear_logprobs
