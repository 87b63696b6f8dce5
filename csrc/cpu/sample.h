// CPU sampler (ALGORITHMS.md §4): temperature, top-k → top-p → min-p (or joint) filtering and
// an exact draw from the filtered distribution, with counter-based randomness (rlkern/philox.h).
// Torch-free interface: raw pointers and sizes; cpu/sample_ops.cpp adapts tensors to it.
#pragma once

#include <cstdint>

#include "cpu/logprobs.h"  // DType
#include "rlkern/sample.h"

namespace rlkern::cpu {

// Logits row r starts at element r * stride_row of `logits` (vocab contiguous). Each of the
// N / num_samples source rows i has its parameters at i in the arrays of sample::RowArrays
// (indices, temperature, filters, seeds, steps) and its num_samples draws at the output rows
// i·num_samples + j (tokens, log-probs, entropy, lse); draw j uses Philox index j.
struct SampleArgs : sample::RowArrays {
  const void* logits;
  DType dtype;
  int64_t R, V, stride_row;
  int64_t N;            // output rows
  int64_t num_samples;  // draws per source row (≥ 1)
  bool joint;            // filter_order == sample::kJoint: each filter sees the unfiltered p
  bool raw_temperature;  // raw logprob uses z = x / T (true) or x (false)
};

void sample(const SampleArgs& args);

}  // namespace rlkern::cpu
