// CPU epilogues of the fused linear logprobs op (ALGORITHMS.md §1, "Fused linear form").
//
// The matmul of a tile of logits, x = h Wᵀ (+ b), is done by ATen (oneDNN, AMX on bf16);
// these functions fold one tile (n rows × vt vocab columns, columns [vocab_offset,
// vocab_offset + vt) of the full vocabulary) into the per-row running statistics, finish the
// statistics into logprobs / lse / entropy, and turn a recomputed tile into its gradient in
// place. Torch-free interface: raw pointers, sizes and strides.
#pragma once

#include <array>
#include <cstdint>

#include "cpu/logprobs.h"

namespace rlkern::cpu {

struct LinearTileArgs {
  const void* tile;  // (n, vt), column stride 1, row stride `stride_row`
  void* grad_tile;   // backward: where dZ goes (may alias tile)
  DType dtype;
  int64_t n, vt, stride_row, grad_stride_row;
  int64_t vocab_offset;  // global vocab index of column 0
  const int64_t* labels;  // (n,) global vocab ids or ignore_index
  int64_t ignore_index;
  double temperature;
  // c > 0: the row math sees z = c·tanh(x/c) (logit soft-capping, Gemma 2); 0: z = x
  double softcap;
  bool with_entropy;
  // forward: (n, linear_logprobs::kNumStats) running state (rlkern/logprobs.h), updated in place
  double* stats;
  // backward: per-row arrays (n,), float32 or float64 like the outputs
  logprobs::GradInputs in;
  // backward, nullable: (n, kNumStats) complete row summaries; rows whose m is not NaN take the
  // exact, max-shifted path from them instead of the forward's lse
  const double* exact_stats;
};

void linear_logprobs_tile_fwd(const LinearTileArgs& a);
void linear_logprobs_tile_bwd(const LinearTileArgs& a);

// stats → the per-row outputs: outputs[o] as in LogprobsFwdArgs (logprobs and lse required,
// entropy nullable, no self_certainty / sum_p_sq), float32 or, when `f64`, float64.
void linear_logprobs_finish(const double* stats, const int64_t* labels, int64_t n,
                            int64_t ignore_index, double temperature, bool f64,
                            const std::array<void*, logprobs::kNumOutputs>& outputs);

}  // namespace rlkern::cpu
