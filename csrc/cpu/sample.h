// CPU sampler (ALGORITHMS.md §4): temperature, top-k → top-p → min-p (or joint) filtering and
// an exact draw from the filtered distribution, with counter-based randomness (rlkern/philox.h).
// Torch-free interface: raw pointers and sizes; csrc/ops.cpp adapts tensors to it.
#pragma once

#include <cstdint>

#include "cpu/logprobs.h"  // DType

namespace rlkern::cpu {

// Output row i draws from logits row r = indices ? indices[i] : i, which starts at element
// r * stride_row of `logits` (vocab contiguous). Per-output-row parameters are contiguous
// arrays of length N; top_k / top_p / min_p are nullptr when that filter is off for all rows
// (per row: top_k >= V, top_p >= 1 and min_p <= 0 also switch it off).
struct SampleArgs {
  const void* logits;
  DType dtype;
  int64_t R, V, stride_row;
  int64_t N;
  const int64_t* indices;     // nullable
  const double* temperature;  // (N,)
  const int64_t* top_k;       // nullable
  const double* top_p;        // nullable
  const double* min_p;        // nullable
  const int64_t* seeds;       // (N,)
  const int64_t* steps;       // (N,)
  bool joint;                 // filters act on the unfiltered distribution
  bool raw_temperature;       // raw logprob uses z = x / T (true) or x (false)
  int64_t* tokens;            // (N,) ; -1 for a row whose logits are NaN or all -inf
  float* raw_logprobs;        // (N,)
  float* processed_logprobs;  // (N,)
  float* entropy;             // (N,) nullable
  float* lse;                 // (N,) log Σ exp(z): NaN / -inf flag bad rows to the caller
};

void sample(const SampleArgs& args);

}  // namespace rlkern::cpu
