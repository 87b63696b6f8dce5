// Layouts of the sampler (ALGORITHMS.md §4), defined once (rlkern/layout.h) and exported
// through rlkern._C as layout("sample").
//
//   sample.filter_order   how top-k, top-p and min-p combine (rlkern.sample's filter_order):
//       top_k_first   each filter acts on the distribution the previous ones left,
//                     renormalised (top-k → top-p → min-p; the HF / vLLM order);
//       joint         each filter acts on the unfiltered distribution; the kept set is the
//                     intersection.
//                     The kernels take `joint` = (filter_order == kJoint).
//
// Torch-free, host + device.
#pragma once

#include <cstdint>
#include <initializer_list>

#include "rlkern/layout.h"

#define RLKERN_SAMPLE_FILTER_ORDERS(X) \
  X(kTopKFirst, "top_k_first")         \
  X(kJoint, "joint")

namespace rlkern::sample {

enum FilterOrder : int { RLKERN_SAMPLE_FILTER_ORDERS(RLKERN_LAYOUT_ENUM) kNumFilterOrders };
RLKERN_LAYOUT_NAMES(kFilterOrderNames, RLKERN_SAMPLE_FILTER_ORDERS);

inline constexpr std::initializer_list<LayoutTable> kLayout = {
    layout_table("filter_order", kFilterOrderNames)};

// The per-output-row arrays of a sampler call, N entries each: parameters in, results out.
// Output row i draws from logits row indices ? indices[i] : i. A nullable filter is nullptr
// when it is off for every row (per row: top_k ≥ V, top_p ≥ 1 and min_p ≤ 0 are off too).
struct RowArrays {
  const int64_t* indices;     // nullable
  const double* temperature;
  const int64_t* top_k;       // nullable
  const double* top_p;        // nullable
  const double* min_p;        // nullable
  const int64_t* seeds;       // Philox key of the row (rlkern/philox.h)
  const int64_t* steps;       // Philox counter of the row
  int64_t* tokens;            // −1 for a row whose logits are NaN or all −inf
  float* raw_logprobs;
  float* processed_logprobs;
  float* entropy;             // nullable
  float* lse;                 // log Σ exp(z): NaN / −inf flag the rows that cannot be sampled
};

}  // namespace rlkern::sample
